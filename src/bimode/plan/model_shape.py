"""A model's counts read on the meta device: no weights loaded (`bimode plan`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bimode.errors import MissingInputError, UsageError
from bimode.train.components import split_parameters


@dataclass
class ModelShape:
    config: object  # the checkpoint's transformers config
    params: dict[str, int]  # per component: vision, projector, llm (tied weights once)
    largest_layer_params: int  # accelerate's largest layer (what ZeRO-3 gathers at once)
    image_tokens: int  # prompt tokens one image takes (0 where the config does not say)
    model: torch.nn.Module  # on the meta device: counts, LoRA targets
    # Qwen-VL: patches per side (height, width) of the image the plan counts (image_grid_thw's h and w), and
    # the tower's class (measured with the patches of that grid, plan/activations.py); None for fixed-size towers
    image_grid: tuple[int, int] | None = None
    vision_class: type | None = None

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def text_config(self):
        return getattr(self.config, "text_config", None) or self.config

    @property
    def vision_config(self):
        return getattr(self.config, "vision_config", None)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        t = self.text_config
        heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return 2 * t.num_hidden_layers * heads * head_dim * dtype_bytes


def read_shape(model_dir: str | Path) -> ModelShape:
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{path}: no config.json (bimode plan reads a model directory's config; no weights "
                                "are loaded)")
    config = AutoConfig.from_pretrained(path)
    try:
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError as exc:
        raise UsageError(f"{path}: not a vision-language model transformers' Auto classes build ({exc})") from exc
    model.tie_weights()  # on the meta device the output layer is its own tensor until tied: count it once
    params = {c: sum(p.numel() for _, p in group) for c, group in split_parameters(model).items()}
    _, (largest, _) = calculate_maximum_sizes(model)
    bytes_per_param = next(model.parameters()).element_size()
    image_tokens = getattr(config, "image_seq_length", 0) or 0
    vision = getattr(config, "vision_config", None)
    grid = image_grid(path, vision) if vision is not None else None
    tower = None
    if grid is not None:
        image_tokens = grid[0] * grid[1] // vision.spatial_merge_size ** 2
        tower = next(type(m) for m in model.modules() if m is not model and isinstance(
            getattr(m, "config", None), type(vision)))
    return ModelShape(config, params, largest // bytes_per_param, image_tokens, model, grid, tower)


# transformers' Qwen2-VL image processor's default max_pixels, for a checkpoint that saved none
QWEN_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def max_pixels(model_dir: Path) -> int:
    """The most pixels the checkpoint's Qwen-VL image processor keeps an image at (preprocessor_config.json:
    `max_pixels`, or `size.longest_edge` as transformers 5 writes it)."""
    path = model_dir / "preprocessor_config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    size = raw.get("size") or {}
    return int(raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or QWEN_DEFAULT_MAX_PIXELS)


def image_grid(model_dir: Path, vision) -> tuple[int, int] | None:
    """Qwen-VL towers take an image at (about) its own size: the image tokens are image_grid_thw's h x w / merge^2,
    set by the processor, not the config. The plan counts a square image at the processor's max_pixels (the most
    one image can cost, as it counts every row at its longest). None for towers of a fixed image size."""
    merge = getattr(vision, "spatial_merge_size", None)
    if merge is None or not hasattr(vision, "temporal_patch_size"):
        return None
    patch = vision.patch_size
    factor = patch * merge  # the processor resizes to multiples of this (smart_resize)
    side = max(math.isqrt(max_pixels(model_dir)) // factor, 1) * factor
    return side // patch, side // patch


def lora_trainable(shape: ModelShape, model_args, settings, tokenizer, frozen: set[str]) -> int:
    """Parameters a LoRA run trains: adapters, the projector in full, mode-token rows (train/adapters.py's config,
    applied by PEFT to the meta model)."""
    from peft import get_peft_model

    from bimode.train.adapters import build_peft_config

    config = build_peft_config(model_args, shape.model, tokenizer, settings, frozen)
    wrapped = get_peft_model(shape.model, config)
    try:
        return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    finally:
        wrapped.unload()
