"""A config-only model directory at R-4B's shape, for `bimode plan` (no weights: plan reads configs on the meta
device). LLaVA layout: SigLIP2-So400m-like tower (27 layers, width 1152, 384-pixel tiles in 14-pixel patches:
729 image tokens), 2-layer MLP projector, Qwen3-4B-like language model (36 layers, width 2560, 32 query / 8
key-value heads of 128, MLP 9728, 151,936-token vocabulary, tied embeddings). The tokenizer is the embedded
tiny one (plan reads only its mode tokens, for LoRA's trainable rows).

    .venv/bin/python -m bench.r4b_shape runs/r4b_shape
    bimode plan --recipe tiny_bpo --model runs/r4b_shape --use_peft true --gpu_gib 80
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import LlavaConfig, Qwen3Config, SiglipVisionConfig

from bimode.models.tiny import IMAGE_TOKEN, build_tokenizer


def write(out: Path) -> Path:
    tokenizer = build_tokenizer()
    text = Qwen3Config(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=9728, max_position_embeddings=40960,
                       tie_word_embeddings=True)
    vision = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                intermediate_size=4304, image_size=384, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(384 // 14) ** 2, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/r4b_shape")))
