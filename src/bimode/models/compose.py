"""A LLaVA-style checkpoint from a vision encoder and a language model (`bimode compose`): R-4B's architecture
(a SigLIP tower, a 2-layer MLP projector with GELU, a Qwen3 language model) from any such pair of parts.

The encoder's and the language model's weights are copied unchanged; the projector is fresh (transformers'
initialisation, its output rescaled to the text embeddings' norm so image tokens do not start 60x louder than
text, which makes a model learn to ignore the image: docs/embedded_default.md, trap 1). The tokenizer gains the
image placeholder and the think tags (as `load_model` adds them), the processor bimode's chat template, and image
size and image-token count come from the encoder's config. The result is a plain LLaVA checkpoint, written in the
layout vLLM reads (models/layout.py), so every bimode command, transformers' Auto classes and vLLM load it.

Encoders: SigLIP (fixed-resolution SigLIP2 checkpoints are SigLIP models) and CLIP, saved as the whole two-tower
model or the vision model alone. SigLIP2's variable-resolution (NaFlex) models need per-image patch masks that
LLaVA's forward does not pass: refused with that reason. Language models: Qwen3, Qwen2 / Qwen2.5, Llama.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bimode.errors import MissingInputError, UsageError

IMAGE_TOKEN = "<image>"
VISION_TYPES = {"siglip_vision_model": "SigLIP", "clip_vision_model": "CLIP"}
LANGUAGE_TYPES = {"qwen3": "Qwen3", "qwen2": "Qwen2 / Qwen2.5", "llama": "Llama"}


def _config(path: Path, part: str):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise MissingInputError(f"{part} {path}: no config.json (a saved Hugging Face model folder is expected)")
    return AutoConfig.from_pretrained(path)


def vision_config_of(path: Path):
    """The encoder's vision config (a two-tower SigLIP / CLIP checkpoint gives its vision half)."""
    config = _config(path, "vision encoder")
    if config.model_type in ("siglip2", "siglip2_vision_model"):
        raise UsageError(f"vision encoder {path}: SigLIP2 with variable resolution (NaFlex, model_type "
                         f"{config.model_type}) needs per-image patch masks that LLaVA's forward does not pass; use a "
                         "fixed-resolution SigLIP2 checkpoint (those are SigLIP models, model_type siglip)")
    vision = getattr(config, "vision_config", None) if config.model_type in ("siglip", "clip") else config
    if vision is None or vision.model_type not in VISION_TYPES:
        raise UsageError(f"vision encoder {path}: model_type {config.model_type!r} is not a vision encoder bimode "
                         f"composes ({', '.join(VISION_TYPES.values())})")
    size, patch, hidden = (getattr(vision, k, None) for k in ("image_size", "patch_size", "hidden_size"))
    if not (isinstance(hidden, int) and hidden > 0):
        raise UsageError(f"vision encoder {path}: hidden_size {hidden!r}: the projector has no input width to map")
    if not (size and patch) or size % patch:
        raise UsageError(f"vision encoder {path}: image_size {size} is not a whole number of {patch}-pixel patches")
    return vision


def text_config_of(path: Path):
    config = _config(path, "language model")
    if config.model_type not in LANGUAGE_TYPES:
        raise UsageError(f"language model {path}: model_type {config.model_type!r} is not a language model bimode "
                         f"composes ({', '.join(LANGUAGE_TYPES.values())})")
    if not (isinstance(config.hidden_size, int) and config.hidden_size > 0):
        raise UsageError(f"language model {path}: hidden_size {config.hidden_size!r}: nothing for the projector "
                         "to map to")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):  # transformers would build an empty one
        raise MissingInputError(f"language model {path}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise MissingInputError(f"language model {path}: no tokenizer could be loaded from it ({exc})") from exc


def _image_processor(path: Path, vision):
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise MissingInputError(f"vision encoder {path}: no image processor (preprocessor_config.json) could be "
                                f"loaded ({exc})") from exc
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge")
    if side and side != vision.image_size:
        raise UsageError(f"vision encoder {path}: its image processor makes {side}-pixel images, its model takes "
                         f"{vision.image_size}")
    return processor


def _vision_weights(path: Path) -> dict[str, torch.Tensor]:
    """The vision tower's state dict with transformers 5's in-memory names (no `vision_model.` level)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    tower = getattr(model, "vision_model", model)  # two-tower model: its vision half
    tower = getattr(tower, "vision_model", tower) if not hasattr(tower, "embeddings") else tower
    return tower.state_dict()


@torch.no_grad()
def compose(vision_dir: str | Path, llm_dir: str | Path, out: str | Path, *, seed: int = 0,
            vision_feature_layer: int = -1) -> Path:
    """Write a LLaVA checkpoint composed of the two parts to `out`; returns it."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from bimode.models.layout import use_ecosystem_layout
    from bimode.models.loading import prepare_processor

    vision_dir, llm_dir, out = Path(vision_dir), Path(llm_dir), Path(out)
    vision, text = vision_config_of(vision_dir), text_config_of(llm_dir)
    tokenizer = _tokenizer(llm_dir)
    image_processor = _image_processor(vision_dir, vision)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    is_clip = vision.model_type == "clip_vision_model"
    strategy = "default" if is_clip else "full"  # CLIP's CLS token is dropped; SigLIP has none
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=patches,
                         vision_feature_select_strategy=strategy, vision_feature_layer=vision_feature_layer,
                         projector_hidden_act="gelu", tie_word_embeddings=bool(text.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(_vision_weights(vision_dir), strict=True)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    if llm.generation_config is not None:
        model.generation_config = llm.generation_config
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=int(is_clip),
                               image_token=IMAGE_TOKEN)
    model.resize_token_embeddings(len(tokenizer))  # the image placeholder; the think tags are added next
    prepare_processor(processor, model, template="bimode")
    _scale_projector(model, processor)
    use_ecosystem_layout(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _scale_projector(model, processor) -> float:
    """The fresh projector's output at the text embeddings' norm, measured on a few plain images."""
    from PIL import Image

    size = model.config.vision_config.image_size
    images = [Image.new("RGB", (size, size), (40 * i, 255 - 40 * i, 128)) for i in range(4)]
    return scale_projector_to_text(model, processor.image_processor(images, return_tensors="pt")["pixel_values"])


@torch.no_grad()
def scale_projector_to_text(model, pixel_values: torch.Tensor) -> float:
    """Rescale a LLaVA projector's last layer so the image tokens of `pixel_values` come out at the mean norm of
    the text embeddings (trap 1: at default initialisation they are ~60x larger and the model learns to ignore
    the image). The fix lives in the weights, so it survives save_pretrained. Returns the factor applied."""
    features = model.get_image_features(pixel_values=pixel_values)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    features = getattr(features, "pooler_output", features)
    image_norm = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).norm(dim=-1).mean()
    factor = float(model.get_input_embeddings().weight.norm(dim=-1).mean() / image_norm)
    projector = model.model.multi_modal_projector
    projector.linear_2.weight.mul_(factor)
    if projector.linear_2.bias is not None:
        projector.linear_2.bias.mul_(factor)
    return factor
