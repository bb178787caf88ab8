"""Load any local Hugging Face image-text-to-text checkpoint and make it bi-mode ready.

- `<think>` / `</think>` exist as single tokens (added, with embeddings resized, when missing);
- `\\n\\n` is one token, so the thinking suffix is not a prefix of the non-thinking one (added when the
  tokenizer splits it, e.g. Llama's SentencePiece);
- the chat template takes `thinking_mode`: the bimode ChatML template is attached when the model's own has
  no thinking control, or when asked, with the model's own image placeholder.
A PEFT adapter folder loads with its base (`load_model`'s docstring).
Nothing is downloaded: paths must be local. Custom model code runs only with trust_remote_code=True.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bimode.compat.transformers_api import build_processor_without_video, save_without_video
from bimode.errors import MissingInputError, OutputExistsError, UsageError
from bimode.models.layout import use_ecosystem_layout
from bimode.modes import THINK_CLOSE, THINK_OPEN, MODE_SUFFIXES, ThinkingMode
from bimode.templates import chat_template

log = logging.getLogger(__name__)


def _check_local(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").exists():
        raise MissingInputError(
            f"{path}: not a local model directory with a config.json, nor a PEFT adapter folder "
            "(bimode loads only local checkpoints; download once with `hf download` and pass the folder)")
    return path


def needs_remote_code(path: str | Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return bool(config.get("auto_map"))


def image_placeholder(processor) -> str:
    """What one image looks like in the prompt text for this processor's family."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    start = getattr(processor, "vision_start_token", None)
    if start is None and "image_pad" in image_token:  # Qwen2-VL / Qwen2.5-VL / Qwen3-VL
        start, end = "<|vision_start|>", "<|vision_end|>"
    else:
        end = getattr(processor, "vision_end_token", None)
    return f"{start}{image_token}{end}" if start and end else image_token


def bimode_template_for(processor) -> str:
    placeholder = image_placeholder(processor)
    template = chat_template()
    return template if placeholder == "<image>" else template.replace("'<image>'", repr(placeholder))


def has_thinking_control(template: str | None) -> bool:
    return bool(template) and "thinking_mode" in template


def ensure_think_tokens(tokenizer, model=None) -> list[str]:
    """Add what the bi-mode format needs as single tokens; resize the model's embeddings. Returns added."""
    from tokenizers import AddedToken

    added = []
    vocab = tokenizer.get_vocab()
    for tag in (THINK_OPEN, THINK_CLOSE):
        if tag not in vocab or len(tokenizer.encode(tag, add_special_tokens=False)) != 1:
            added.append(tag)
    if added:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    think = tokenizer.encode(MODE_SUFFIXES[ThinkingMode.THINK], add_special_tokens=False)
    no_think = tokenizer.encode(MODE_SUFFIXES[ThinkingMode.NO_THINK], add_special_tokens=False)
    if no_think[: len(think)] == think:
        log.warning("tokenizer splits '\\n\\n'; adding it as one token so the two mode suffixes differ")
        tokenizer.add_tokens([AddedToken("\n\n", normalized=False, special=False)])
        added.append("\n\n")
    if added and model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return added


def prepare_processor(processor, model=None, template: str = "auto") -> object:
    """Make a loaded processor (and model) bi-mode ready in place; see the module docstring.

    template: "auto" attaches ours when the current one has no thinking control, "bimode" always,
    "keep" never.
    """
    if template not in ("auto", "bimode", "keep"):
        raise UsageError(f"template must be auto, bimode or keep, not {template!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    ensure_think_tokens(tokenizer, model)
    current = getattr(processor, "chat_template", None)
    if template == "bimode" or template == "auto" and not has_thinking_control(current):
        text = bimode_template_for(processor)
        processor.chat_template = text
        if tokenizer is not processor:
            tokenizer.chat_template = text
    return processor


def load_image_only_processor(path: str | Path, **kwargs):
    """Qwen-VL-style processors without their video part, for machines without torchvision.

    transformers' video processors need torchvision, which has no CPU build matching every torch; images
    and text need only the tokenizer and the (PIL) image processor. Videos are then unsupported.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    path = Path(path)
    config = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).exists():
            config = {**json.loads((path / name).read_text()), **config}
    class_name = config.get("processor_class")
    processor_class = getattr(transformers, class_name, None) if class_name else None
    if processor_class is None:
        raise ImportError(f"{path}: the processor needs torchvision and names no processor_class to build "
                          "an image-only one; install torchvision")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    log.warning("%s: torchvision is missing; using %s without its video processor (images and text only)",
                path, class_name)
    processor = build_processor_without_video(processor_class, image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=getattr(tokenizer, "chat_template", None))
    # saved as a hub repository holds it, the video settings kept for a machine with torchvision
    return save_without_video(processor, _video_config(path, config))


def _video_config(path: Path, config: dict) -> dict | None:
    """The video processor's settings where the checkpoint has them: its own file (hub Qwen3-VL) or nested in
    processor_config.json (transformers 5's save); None when derived from the image processor's (hub Qwen2.5-VL)."""
    if (path / "video_preprocessor_config.json").exists():
        return json.loads((path / "video_preprocessor_config.json").read_text())
    nested = config.get("video_processor")
    return nested if isinstance(nested, dict) else None


def adapter_base(path: str | Path) -> Path | None:
    """The base model of a PEFT adapter folder (adapter_config.json, no config.json); None for a full model."""
    path = Path(path)
    if (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    candidates = [Path(base), path / base] if base else []  # as written, else relative to the adapter folder
    for candidate in candidates:
        if (candidate / "config.json").exists():
            return candidate
    raise MissingInputError(
        f"{path / 'adapter_config.json'}: base_model_name_or_path {base!r} is not a local model directory with a "
        "config.json; point it at the base model the adapter was trained on")


def _load_processor(path: Path, kwargs: dict):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except ImportError as exc:
        if "orchvision" not in str(exc):
            raise
        return load_image_only_processor(path, **kwargs)


def load_model(path: str | Path, *, trust_remote_code: bool = False, dtype="auto", device_map=None,
               template: str = "auto", attn_implementation: str | None = None, quantization_config=None,
               merge_adapter: bool = False):
    """(model, processor) from a local image-text-to-text checkpoint, bi-mode ready.

    `path` may be a PEFT adapter folder (what `bimode anneal` / `bimode bpo` save with use_peft): its base
    (adapter_config.json's base_model_name_or_path) is loaded with the adapter on top, and the processor is
    the adapter folder's own when saved there (it carries the added think tokens and chat template). The
    model is then a PeftModel, or the merged plain model with merge_adapter=True.
    """
    from transformers import AutoModelForImageTextToText

    base = adapter_base(path)
    adapter = Path(path) if base is not None else None
    # absolute, so that an adapter trained on this model records a base_model_name_or_path valid from anywhere
    path = _check_local(base or path).resolve()
    if needs_remote_code(path) and not trust_remote_code:
        raise UsageError(
            f"{path} ships its own model code (auto_map in config.json), as R-4B does; "
            "pass trust_remote_code=True (--trust-remote-code) if you trust it")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    has_processor = adapter is not None and any((adapter / f).exists() for f in ("tokenizer_config.json",
                                                                                 "processor_config.json"))
    processor = _load_processor(adapter if has_processor else path, kwargs)
    model_kwargs = dict(kwargs, dtype=dtype)
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    model = use_ecosystem_layout(AutoModelForImageTextToText.from_pretrained(path, **model_kwargs))
    prepare_processor(processor, model, template=template)
    if adapter is not None:
        model = _attach_adapter(model, processor, adapter, merge_adapter)
    return model, processor


def _attach_adapter(model, processor, adapter: Path, merge: bool):
    """The adapter on its base; the base's vocabulary first grown to the adapter tokenizer's (think tokens)."""
    from peft import PeftModel

    tokenizer = getattr(processor, "tokenizer", processor)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, adapter)
    return model.merge_and_unload() if merge else model


def export_merged(adapter: str | Path, out: str | Path, *, dtype="auto", trust_remote_code: bool = False,
                  overwrite: bool = False) -> Path:
    """Merge a PEFT adapter folder into its base and save a plain checkpoint (model, processor with the think
    tokens and chat template, generation config) that transformers' Auto classes load; SigLIP / CLIP towers
    keep the ecosystem layout (models/layout.py)."""
    out = Path(out)
    if adapter_base(adapter) is None:
        raise UsageError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json, or a config.json beside it)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite to replace its files")
    model, processor = load_model(adapter, trust_remote_code=trust_remote_code, dtype=dtype, merge_adapter=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
