"""PEFT: what bimode relies on beyond PEFT's public API (PEFT 0.21, pinned to its minor; docs/internals.md).

- `peft.utils.other.TrainableTokensWrapper` (the wrapper of `trainable_token_indices`) forwards attributes of
  the wrapped layer through `_hasattr_wrapped` / `_getattr_wrapped`; 0.21 forwards `weight` but not `bias`.
- Its parameter names: the wrapped embedding is `<layer>.token_adapter.base_layer.weight`, the trained rows
  `<layer>.token_adapter.trainable_tokens_delta.<adapter>` (and `trainable_tokens_original`);
  `merge_adapter()` writes the rows into the embedding.
"""

from __future__ import annotations

import functools


def expose_output_bias(model) -> None:
    """Let TRL read `lm_head.bias` through PEFT's token-row wrapper.

    TRL 1.16's trainers score tokens with a fused head that reads `lm_head.weight` and `lm_head.bias`;
    PEFT 0.21's TrainableTokensWrapper forwards `weight` (with the trained rows) but not `bias`. The wrappers of
    this model get a subclass that forwards `bias` too (an output layer's bias is never a token row).
    """
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if type(module) is TrainableTokensWrapper:
            module.__class__ = _token_rows_with_bias()


TOKEN_ADAPTER = ".token_adapter."
TOKEN_ROWS = "trainable_tokens_"  # the delta and original rows of a token-row adapter


def base_param_name(name: str) -> str | None:
    """A merged PEFT model's parameter under the name its base checkpoint has, given the name after TRL's own
    PEFT clean-up (prefix, `.base_layer`, `modules_to_save.default.` removed); None for a parameter only PEFT has
    (the token rows, which `merge_adapter` has written into the embedding)."""
    if TOKEN_ROWS in name:
        return None
    return name.replace(TOKEN_ADAPTER, ".")


@functools.cache
def _token_rows_with_bias():
    from peft.utils.other import TrainableTokensWrapper

    class TokenRowsWithBias(TrainableTokensWrapper):
        def _hasattr_wrapped(self, name, modules):
            return name in ("weight", "bias")

        def _getattr_wrapped(self, name, modules):
            if name == "bias":
                return getattr(self.original_module, "bias", None)
            return super()._getattr_wrapped(name, modules)

    return TokenRowsWithBias
