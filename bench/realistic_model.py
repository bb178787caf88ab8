"""A randomly initialised model at the shapes a real R-4B-style prompt has, built offline (issue 17).

LLaVA layout like the embedded tiny model (SigLIP tower + Qwen3 language model, bimode.models.tiny builds
both from a TinyConfig), scaled up: 336-pixel images in 14-pixel patches (576 image tokens, as LLaVA-1.5's
CLIP and R-4B's SigLIP tiles), a 6-layer SigLIP of width 384, an 8-layer Qwen3 of width 768 with GQA (12
query / 4 key-value heads): about 63M parameters. The vocabulary stays the tiny world's 320 tokens (a real
150k vocabulary would add a 115M-parameter LM head, which costs the same on both sides of a rollout bench).
A synthetic-world question then makes a prompt of about 620 tokens, 576 of them image tokens.

    .venv/bin/python -m bench.realistic_model --out runs/realistic    # prints the path and parameter count
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bimode.models.tiny import TinyConfig, build_model, build_processor, build_tokenizer

REALISTIC = TinyConfig(text_hidden=768, text_layers=8, text_heads=12, text_kv_heads=4, text_mlp=2048,
                       vision_hidden=384, vision_layers=6, vision_heads=6, vision_mlp=1536,
                       image_size=336, patch_size=14, max_positions=2048)


def build_realistic(out_dir: str | Path, cfg: TinyConfig = REALISTIC) -> Path:
    """Build (or reuse, when out_dir holds one) the realistic-shape model; returns its directory."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tokenizer = build_tokenizer(cfg.vocab_size)
    tokenizer.model_max_length = cfg.max_positions
    processor = build_processor(tokenizer, cfg)
    model = build_model(tokenizer, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/realistic")
    args = parser.parse_args()
    path = build_realistic(args.out)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    print(path, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
