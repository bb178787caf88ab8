"""The embedded tiny VLM: LLaVA layout with a SigLIP tower and a Qwen3 language model (R-4B's family).

Built offline, sized to train in minutes on 2 CPU cores (docs/embedded_default.md): 32x32 images in 8x8 patches
(16 image tokens, one per grid cell), a 1-layer SigLIP of width 64, a 4-layer Qwen3 of width 128 with tied
embeddings, and a byte-level BPE tokenizer trained on the synthetic world's text. The saved directory is a
plain transformers checkpoint: AutoProcessor + AutoModelForImageTextToText load it without bimode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from bimode.data import synthetic
from bimode.models.layout import use_ecosystem_layout
from bimode.modes import THINK_CLOSE, THINK_OPEN
from bimode.templates import chat_template

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_OPEN, THINK_CLOSE, IMAGE_TOKEN]
# Qwen2/Qwen3's pre-tokenizer split: whitespace runs before a newline stay one piece, so "\n\n" is a
# single token and the thinking suffix "<think>\n" is never a prefix of the non-thinking one (trap 2).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class TinyConfig:
    vocab_size: int = 320
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    vision_mlp: int = 128
    image_size: int = synthetic.IMAGE_PX
    patch_size: int = synthetic.CELL_PX
    max_positions: int = 1024
    seed: int = 0


def build_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None,
                    special_tokens: list[str] = SPECIAL_TOKENS, image_token: str | None = IMAGE_TOKEN,
                    template: str | None = None):
    """A byte-level BPE with Qwen's split, ChatML specials and think tags, as a transformers tokenizer.

    special_tokens / image_token / template let tests imitate other families' tokenizers offline.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = corpus if corpus is not None else synthetic.corpus_text()
    # Chat scaffolding is text too (role names, whitespace around tags). Special tokens are cut out first:
    # the trainer sees raw text, and merges spent on "<think>" pieces would be wasted.
    corpus = corpus + ["user\n", "assistant\n", "system\n"] * 200
    special_split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + special_tokens))
    tok.train_from_iterator((piece for text in corpus for piece in special_split.split(text) if piece),
                            trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": image_token} if image_token else {},
        chat_template=template if template is not None else chat_template(),
        model_max_length=TinyConfig.max_positions,
    )


def build_processor(tokenizer, cfg: TinyConfig = TinyConfig()):
    from transformers import LlavaProcessor, SiglipImageProcessorPil  # the PIL one: torchvision is not required

    image_processor = SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,  # SigLIP has no CLS token
        image_token=IMAGE_TOKEN,
        chat_template=chat_template(),
    )


def text_config(tokenizer, cfg: TinyConfig = TinyConfig()):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=cfg.text_hidden // cfg.text_heads,
        intermediate_size=cfg.text_mlp,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def vision_config(cfg: TinyConfig = TinyConfig()):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_mlp,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )


def build_model(tokenizer, cfg: TinyConfig = TinyConfig()):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text, vision = text_config(tokenizer, cfg), vision_config(cfg)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    # its own generation limit: eval and chat default to the model's, else the paper's 8,192, which is far
    # past this model's traces (about 20 tokens) and its position table
    model.generation_config.max_new_tokens = 256
    scale_projector_to_text(model, tokenizer, cfg)
    return use_ecosystem_layout(model)


def scale_projector_to_text(model, tokenizer, cfg: TinyConfig = TinyConfig()) -> float:
    """Rescale the projector's last layer so image tokens start at the norm of text embeddings (trap 1),
    measured on the synthetic world's images. Returns the factor applied."""
    from bimode.models.compose import scale_projector_to_text as scale

    images = [s.render() for s in synthetic.generate(16, seed=cfg.seed, families=["shell"], levels=[6])]
    return scale(model, build_processor(tokenizer, cfg).image_processor(images, return_tensors="pt")["pixel_values"])


def build_tiny(out_dir: str | Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Build and save tokenizer, processor and model to out_dir (safetensors); return the path."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(cfg.vocab_size)
    processor = build_processor(tokenizer, cfg)
    model = build_model(tokenizer, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_parts(out_dir: str | Path, cfg: TinyConfig = TinyConfig()) -> tuple[Path, Path]:
    """The tiny model's two parts saved apart, as a vision encoder's and a language model's repos are (for
    `bimode compose`): a SigLIP vision model with its image processor in out_dir/vision, and a Qwen3 causal LM with
    a ChatML tokenizer that has no image placeholder and no think tags in out_dir/llm. Both random."""
    from transformers import Qwen3ForCausalLM, SiglipVisionModel

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    vision_dir = out_dir / "vision"
    SiglipVisionModel(vision_config(cfg)).save_pretrained(vision_dir)
    build_processor(build_tokenizer(cfg.vocab_size), cfg).image_processor.save_pretrained(vision_dir)
    tokenizer = build_tokenizer(cfg.vocab_size, special_tokens=SPECIAL_TOKENS[:3], image_token=None)
    llm_dir = out_dir / "llm"
    Qwen3ForCausalLM(text_config(tokenizer, cfg)).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir
