"""Which models take positions that a cache offset or a restart continues, and the positions a model gives a batch.

Three paths rely on it: the generation engine's shared-prefix decoder (a prompt prefilled once, its cache
continued per sample), BPO's shared-prefix forward (the same for training) and packed annealing (rows
concatenated with positions restarting per row). Two kinds of rotary positions are handled:
- 1-D (LLaVA over Qwen3 / Qwen2 / Llama): a token's position is its index among the row's real tokens.
- multi-axis (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: mrope): three axes (time, height, width); text tokens carry the same
  value on all three, image tokens their grid place, computed from the whole prompt by the model's own
  `get_rope_index`. Every token after the prompt is text, so it continues on all axes from the prompt's largest
  position + 1 (what the model's `rope_deltas` encode): `next_positions`.
Both need full attention in every layer and images that only replace placeholder embeddings
(`flat_positions_unsupported`); a path that does not handle multi-axis positions yet passes `multi_axis=False`,
and one that leaves the attention masks to the model (the shared-prefix training forward) passes
`sliding_window=True`, which lets Gemma 3 (sliding layers, two-way image attention) through.
"""

from __future__ import annotations

import torch

from bimode.compat.transformers_api import base_model

# Top-level model types whose language model takes 1-D positions and whose images only replace placeholder
# embeddings (the vision tower sees pixels, never text).
FLAT_MODEL_TYPES = frozenset({"llava", "llava_next"})
FLAT_TEXT_TYPES = frozenset({"qwen3", "qwen2", "llama"})
# Qwen-VL: multi-axis positions from `get_rope_index`, images replacing placeholders (Qwen3-VL also adds deepstack
# features to the image tokens' hidden states in early layers: still only at the image tokens).
MULTI_AXIS_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
MULTI_AXIS_TEXT_TYPES = frozenset({"qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text"})
# Gemma 3: 1-D positions, but sliding-window layers and image tokens that attend to each other both ways (by
# token_type_ids): a path that reuses a prompt's cache as transformers' own masks read it holds (the shared-prefix
# training forward, measured equal), one that builds its own row masks does not (packing, measured wrong).
SLIDING_WINDOW_MODEL_TYPES = frozenset({"gemma3"})
SLIDING_WINDOW_TEXT_TYPES = frozenset({"gemma3_text"})


def multi_axis_positions(model) -> bool:
    """Whether the model computes multi-axis rotary positions from the whole sequence (Qwen-VL's mrope, found by
    the `get_rope_index` its inner model carries): positions fed by hand as a cache offset need `rope_positions`."""
    inner = base_model(model)
    return hasattr(getattr(inner, "model", inner), "get_rope_index")


def flat_positions_unsupported(model, path: str, multi_axis: bool = False, sliding_window: bool = False
                               ) -> str | None:
    """Why `path` (the feature's name, for the message) cannot run on this model (None: it can). multi_axis: the
    path handles multi-axis positions (`rope_positions`), so the Qwen-VL families are allowed too; sliding_window:
    the path leaves the attention masks to the model (Gemma 3 allowed, sliding layers and all)."""
    inner = base_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        return f"{type(inner).__name__} has no transformers config"
    model_type = getattr(config, "model_type", None)
    text = config.get_text_config()
    allowed, allowed_text = set(FLAT_MODEL_TYPES | FLAT_TEXT_TYPES), set(FLAT_TEXT_TYPES)
    if multi_axis:
        allowed |= MULTI_AXIS_MODEL_TYPES
        allowed_text |= MULTI_AXIS_TEXT_TYPES
    if sliding_window:
        allowed |= SLIDING_WINDOW_MODEL_TYPES
        allowed_text |= SLIDING_WINDOW_TEXT_TYPES
    if multi_axis_positions(inner) and not multi_axis:
        return "multi-axis rotary positions (get_rope_index)"
    if model_type not in allowed:
        return f"model type {model_type!r} is not on the {path} allow-list ({', '.join(sorted(allowed))})"
    if text.model_type not in allowed_text:
        return f"language model type {text.model_type!r} is not on the {path} allow-list"
    if sliding_window and model_type in SLIDING_WINDOW_MODEL_TYPES:
        return None if getattr(text, "final_logit_softcapping", None) is None else "final logit softcapping"
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layers other than full attention ({sorted(set(layer_types))})"
    if getattr(text, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(text, "final_logit_softcapping", None) is not None:
        return "final logit softcapping"
    return None


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1-D positions of a left-padded batch: each real token's index among its row's real tokens (pads 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   mm_token_type_ids: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """The rotary positions the model itself gives a (left-padded) batch: (B, L) for 1-D models, (3, B, L) for
    multi-axis ones, from the model's own `get_rope_index` (mm_token_type_ids: the processor's, text 0 / image 1 /
    video 2; None: all text). Pads get 0, as transformers gives them."""
    if not multi_axis_positions(model):
        return text_positions(attention_mask)
    inner = base_model(model)
    inner = getattr(inner, "model", inner)
    if mm_token_type_ids is None:
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
    positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                        attention_mask=attention_mask)
    return positions


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """(B,) the position of the first token after each row of `positions` ((B, L) or (3, B, L)): one past the
    row's largest on any axis (for 1-D left-padded rows that is the last real token's + 1)."""
    if positions.dim() == 3:
        return positions.amax(dim=(0, 2)) + 1
    return positions.amax(dim=-1) + 1


def positions_from(start: torch.Tensor, length: int, multi_axis: bool) -> torch.Tensor:
    """Positions of `length` text tokens per row starting at start (B,): (B, length), or (3, B, length) with the
    same value on every axis for a multi-axis model."""
    flat = start.unsqueeze(1) + torch.arange(length, device=start.device)
    return flat.unsqueeze(0).expand(3, -1, -1) if multi_axis else flat


def shares_multi_axis_prefix(model) -> bool:
    """Whether the model is a multi-axis family whose `get_rope_index` bimode calls (`rope_positions`) and tests."""
    return getattr(getattr(base_model(model), "config", None), "model_type", None) in MULTI_AXIS_MODEL_TYPES
