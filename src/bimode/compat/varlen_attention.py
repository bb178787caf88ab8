"""Variable-length attention for packed rows without flash-attention: each row's tokens attend within the row,
computed row by row with PyTorch's SDPA, so a pack costs the sum of its rows' attention instead of the whole
pack's (`bimode_varlen_sdpa`).

transformers reads a packed sequence (positions restarting per row, no attention mask) as a block-diagonal
causal mask on SDPA, which computes every score of the pack and masks most of them; flash-attention's
variable-length kernel skips them, but it has no CPU build. This registers one attention function and its mask
function through transformers' public `AttentionInterface` / `AttentionMaskInterface` (the documented way to add
an attention implementation): the mask function builds nothing, the attention function splits the pack at the
positions' restarts and runs SDPA causally on each row. The positions it reads are the (1, T) ones the attention
layers receive: for Qwen-VL, the text row of the packed (4, 1, T) positions (transformers hands the layers
`text_position_ids` and the rotary embedding the other three), which restarts per row as 1-D positions do. Each
row is plainly causal: no sliding window, no image tokens attending both ways (why packing refuses Gemma 3). Anything
else (a padded batch, a cache, several rows a batch) goes to transformers' own SDPA unchanged. Used by packed
annealing on machines without flash-attention (train/packing.py); tests/unit/test_packing.py checks it against the
padded batch, loss and gradients.
"""

from __future__ import annotations

import torch

NAME = "bimode_varlen_sdpa"


def row_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each row of a packed (1, T) sequence whose positions restart at 0 per row."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], position_ids.shape[1]]))


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (attention_mask is None and position_ids is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] == position_ids.shape[-1])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      dropout=dropout, scaling=scaling, is_causal=True, **rest)[0]
               for a, b in row_bounds(position_ids.reshape(1, -1))]
    return torch.cat(outputs, dim=1), None  # (1, T, heads, head_dim), as SDPA's forward returns it


def packed_or_sdpa_mask(*args, **kwargs):
    """The mask function: none for a batch without an attention mask (a packed sequence: the attention function
    finds its rows from the positions), SDPA's own mask otherwise (a padded batch)."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make `NAME` an attention implementation transformers accepts; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_or_sdpa_mask)
    return NAME
