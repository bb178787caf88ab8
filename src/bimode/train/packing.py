"""Packed annealing: several rows in one sequence, no padding (`pack_rows`).

Bi-mode data mixes direct answers of tens of tokens with thinking targets of thousands; padded to the batch's
longest, most of a batch is padding. Here rows are grouped into packs of up to `max_length` tokens (best-fit
decreasing on the estimated lengths, `tokenization.estimated_lengths`: within a few tokens of the real ones), and
a batch of packs is one sequence: every row's tokens, labels, per-token inputs and images in order,
`position_ids` restarting at 0 per row and no attention mask. transformers reads restarting positions without a
mask as packed rows and keeps attention within each row: a block-diagonal causal mask on SDPA / eager
(masking_utils' `find_packed_sequence_indices`), the variable-length kernel from the same positions with
flash-attention; TRL's SFTTrainer counts the tokens of such batches by their positions (its own padding-free
format). Where the language model runs SDPA (no flash-attention: CPUs), the block mask would cost a whole pack's
attention scores, so it runs `bimode_varlen_sdpa` instead (compat/varlen_attention.py): SDPA row by row, the same
result. The loss pairs a row's last token with the next row's first label, which is a prompt token and so always
ignored (-100): the loss and gradients are the padded batch's (tests/unit/test_packing.py).

Multi-axis models (Qwen2.5-VL, Qwen3-VL: mrope) take each row's rotary positions from the model's own
`get_rope_index` on that row alone (its tokens, mm_token_type_ids and image grids), so they restart at the row's
start as the padded batch has them, in the layout transformers reads for packed Qwen-VL batches: position_ids
(4, 1, T), the 1-D text positions restarting per row above the three rotary axes. The text row is what the mask,
the variable-length kernel and `bimode_varlen_sdpa` find the rows by (the attention layers receive it alone).

Only for the models `positions.flat_positions_unsupported` allows (multi_axis=True); others train padded, with
the reason logged (`packing_unsupported`). Gemma 3 is refused with what packing it was measured to get wrong
(`MEASURED_REFUSALS`; tests/unit/test_packing.py). A row longer than `max_length` is a pack of its own, kept whole
(nothing is cut or dropped).
"""

from __future__ import annotations

import torch

from bimode.compat.transformers_api import attention_implementation, base_model
from bimode.models.positions import flat_positions_unsupported, multi_axis_positions, rope_positions
from bimode.train.tokenization import IGNORE_INDEX, Example

# Models whose rows packing gets wrong, with what it gets wrong (tests/unit/test_packing.py measures it).
MEASURED_REFUSALS = {
    "gemma3": "Gemma 3's image tokens attend to each other both ways and its sliding-window layers see a window, "
              "which bimode's row-by-row attention (each row plainly causal) drops, and transformers 5.25's own "
              "mask for a pack gets wrong in the sliding layers (each row's image tokens looked up at the first "
              "row's places): measured, the packed loss and gradients differ from the padded batch's",
}


class _RoomIndex:
    """Counts of packs by free room (0 .. max_length) in a segment tree: the smallest room of at least n in
    O(log max_length), so planning a million rows stays fast."""

    def __init__(self, max_length: int):
        self.size = 1 << max_length.bit_length()
        self.count = [0] * (2 * self.size)
        self.packs: dict[int, list[int]] = {}

    def add(self, room: int, pack: int) -> None:
        self.packs.setdefault(room, []).append(pack)
        self._count(room, 1)

    def take(self, room: int) -> int:
        """A pack with exactly this room, no longer indexed."""
        self._count(room, -1)
        return self.packs[room].pop()

    def _count(self, room: int, step: int) -> None:
        i = room + self.size
        while i:
            self.count[i] += step
            i //= 2

    def smallest_at_least(self, n: int) -> int | None:
        """The smallest room >= n some pack has, or None."""
        def find(node: int, lo: int, hi: int) -> int | None:
            if hi < n or self.count[node] == 0:
                return None
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            left = find(2 * node, lo, mid)
            return left if left is not None else find(2 * node + 1, mid + 1, hi)
        return find(1, 0, self.size - 1)


def plan_packs(lengths: list[int], max_length: int) -> list[list[int]]:
    """Row indices grouped into packs of at most `max_length` tokens: best-fit decreasing (each row, longest
    first, goes to the pack it fills most; a row longer than max_length alone). Deterministic."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive to pack rows, got {max_length}")
    packs: list[list[int]] = []
    index = _RoomIndex(max_length)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        room = index.smallest_at_least(n) if n <= max_length else None
        if room is None:
            packs.append([i])
            room_left = max(max_length - n, 0)
        else:
            pack = index.take(room)
            packs[pack].append(i)
            room_left = room - n
        if room_left > 0:
            index.add(room_left, len(packs) - 1 if room is None else pack)
    return packs


def packing_unsupported(model) -> str | None:
    """Why rows of this model cannot be packed (None: they can)."""
    refused = MEASURED_REFUSALS.get(getattr(getattr(base_model(model), "config", None), "model_type", None))
    return refused or flat_positions_unsupported(model, "packed annealing", multi_axis=True)


def use_varlen_attention(model) -> None:
    """SDPA row by row for the language model of a model trained on packs (flash-attention is left as it is:
    its variable-length kernel already skips other rows)."""
    from bimode.compat.varlen_attention import register

    text = model.config.get_text_config()
    if attention_implementation(text) == "sdpa":
        model.set_attn_implementation({"text_config": register()} if text is not model.config else register())


def collate_packed(examples: list[Example], processor, model=None) -> dict:
    """One sequence (1, total tokens) of the examples in order: ids, labels, positions restarting per example,
    per-token inputs (0: text, for rows without them), and their images in placeholder order with every other
    input the image processor returns. model: the model trained; a multi-axis one gets (4, 1, T) positions
    (`row_rope_positions`)."""
    ids, labels, positions = [], [], []
    for e in examples:
        ids += e.input_ids
        # the previous row's last token predicts this row's first label: ignored, whatever it is
        labels += [IGNORE_INDEX] + e.labels[1:]
        positions += range(len(e.input_ids))
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions])}
    for key in sorted({k for e in examples for k in e.token_features}):
        batch[key] = torch.tensor([[v for e in examples for v in e.token_features.get(key, [0] * len(e.input_ids))]])
    images = [img for e in examples for img in e.images]
    if images:
        batch.update(processor.image_processor(images, return_tensors="pt"))
    if model is not None and multi_axis_positions(model):
        rope = row_rope_positions(model, examples, batch.get("image_grid_thw"))
        batch["position_ids"] = torch.cat([batch["position_ids"][None], rope])
    return batch


def row_rope_positions(model, examples: list[Example], image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """(3, 1, T): each example's multi-axis positions from the model's own get_rope_index on that example alone
    (what the padded batch gives its row), its image grids the next len(images) of the batch's."""
    rows, first = [], 0
    for e in examples:
        grids = image_grid_thw[first:first + len(e.images)] if e.images else None
        first += len(e.images)
        ids = torch.tensor([e.input_ids])
        types = e.token_features.get("mm_token_type_ids")
        rows.append(rope_positions(model, ids, torch.ones_like(ids), None if types is None else torch.tensor([types]),
                                   image_grid_thw=grids))
    return torch.cat(rows, dim=-1)
