"""Which models take 1-D positions that a cache offset or a restart continues like plain text.

Two paths rely on it: BPO's shared-prefix forward (a prompt's cache continued per rollout) and packed annealing
(rows concatenated with positions restarting per row). Both need a language model whose rotary positions are
the token's index alone, full attention in every layer, and images that only replace placeholder embeddings
(`flat_positions_unsupported`). The generation engine's shared-prefix decoder asks less on purpose: it prefills
each whole prompt in one forward and then feeds one token at a time with the model's own cache and mask, so
only multi-axis rotary positions stop it (`multi_axis_positions`; tests/unit/test_families.py).
"""

from __future__ import annotations

from bimode.compat.transformers_api import base_model

# Top-level model types whose language model takes 1-D positions and whose images only replace placeholder
# embeddings (the vision tower sees pixels, never text).
FLAT_MODEL_TYPES = frozenset({"llava", "llava_next"})
FLAT_TEXT_TYPES = frozenset({"qwen3", "qwen2", "llama"})


def multi_axis_positions(model) -> bool:
    """Whether the model computes multi-axis rotary positions from the whole sequence (Qwen-VL's mrope, found by
    the `get_rope_index` its inner model carries): positions fed by hand as a cache offset would be wrong."""
    inner = base_model(model)
    return hasattr(getattr(inner, "model", inner), "get_rope_index")


def flat_positions_unsupported(model, path: str) -> str | None:
    """Why `path` (the feature's name, for the message) cannot run on this model (None: it can)."""
    inner = base_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        return f"{type(inner).__name__} has no transformers config"
    model_type = getattr(config, "model_type", None)
    text = config.get_text_config()
    allowed = FLAT_MODEL_TYPES | FLAT_TEXT_TYPES
    if model_type not in allowed:
        return f"model type {model_type!r} is not on the {path} allow-list ({', '.join(sorted(allowed))})"
    if text.model_type not in FLAT_TEXT_TYPES:
        return f"language model type {text.model_type!r} is not on the {path} allow-list"
    if multi_axis_positions(inner):
        return "multi-axis rotary positions (get_rope_index)"
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layers other than full attention ({sorted(set(layer_types))})"
    if getattr(text, "final_logit_softcapping", None) is not None:
        return "final logit softcapping"
    return None
