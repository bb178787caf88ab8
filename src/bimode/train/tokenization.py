"""Records -> model inputs with a loss mask over the assistant response (the whole think block included)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bimode.data.records import Record
from bimode.errors import UsageError
from bimode.modes import MODE_SUFFIXES, ThinkingMode

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list  # PIL images, in order of their <image> placeholders
    # per-token inputs the processor returns next to input_ids (Qwen3-VL's mm_token_type_ids, Gemma 3's
    # token_type_ids): the model needs them to place image tokens
    token_features: dict[str, list[int]] = field(default_factory=dict)


def response_text(record: Record, mode: str, eos: str = "<|im_end|>") -> str:
    """The assistant turn as the template renders it, from `<think>` through the end-of-turn token."""
    from bimode.modes import format_target

    message = record.target_message(mode)
    return format_target(message["content"], message["reasoning_content"]) + eos


class ImageTokens:
    """Prompt tokens the processor expands one image into, from its size alone: measured once per size with a
    blank image of that size, and where two very different sizes give the same count (LLaVA: a fixed number)
    no image is opened at all; otherwise (LLaVA-NeXT's tiles, Qwen-VL's grid) only each image's header is read
    for its size. 1 where the processor names no image token or cannot expand the placeholder alone (the
    placeholder then counts as one token, as before images were counted)."""

    PROBES = ((64, 64), (896, 448))

    def __init__(self, processor):
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", processor)
        token = getattr(processor, "image_token", None)
        self.token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        self.by_size: dict[tuple[int, int], int] = {}
        counts = {self.count(size) for size in self.PROBES}
        self.fixed = counts.pop() if len(counts) == 1 else None

    def count(self, size: tuple[int, int]) -> int:
        if self.token_id is None:
            return 1
        if size not in self.by_size:
            from PIL import Image

            from bimode.models.loading import image_placeholder

            try:  # the placeholder as bimode's template writes it, which the processor expands
                ids = self.processor(images=[Image.new("RGB", size)], text=[image_placeholder(self.processor)])
                self.by_size[size] = max(sum(1 for i in ids["input_ids"][0] if i == self.token_id), 1)
            except (ValueError, TypeError):
                self.by_size[size] = 1
        return self.by_size[size]

    def __call__(self, image) -> int:
        return self.fixed if self.fixed is not None else self.count(image_size(image))


def image_size(image) -> tuple[int, int]:
    """(width, height) from the image's header: nothing decoded."""
    import io

    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    try:
        with Image.open(source) as opened:
            return opened.size
    except FileNotFoundError as exc:
        raise UsageError(f"image file not found: {image}") from exc


def own_text(messages: list[dict]) -> str:
    """The conversation's own texts (system, question, reasoning, answer), without the template's tokens or images."""
    parts = []
    for m in messages:
        content = m["content"]
        parts += [content] if isinstance(content, str) else [c["text"] for c in content if c["type"] == "text"]
        parts.append(m.get("reasoning_content") or "")
    return "\n".join(parts)


def estimated_lengths(processor, pairs: list[tuple[Record, str]]) -> list[int]:
    """About how many tokens `tokenize_example` gives each (record, mode), for grouping batches by length and
    packing rows, fast enough for millions of rows: no image is decoded and no template rendered per row. The
    rows' own texts go through the tokenizer in one batched call; what the chat template adds is measured once
    per shape (mode, images, system prompt) on the first row of that shape; each image adds what the processor
    expands it into (`ImageTokens`)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_tokens = ImageTokens(processor)
    conversations = [r.messages(with_target=mode) for r, mode in pairs]
    own = [len(ids) for ids in tokenizer([own_text(c) for c in conversations], add_special_tokens=False)["input_ids"]]
    added: dict[tuple, int] = {}  # template tokens and one placeholder per image, per shape
    lengths = []
    for (record, mode), conversation, n in zip(pairs, conversations, own):
        shape = (str(mode), len(record.images), bool(record.system))
        if shape not in added:
            text = processor.apply_chat_template(conversation, tokenize=False)
            added[shape] = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - n
        lengths.append(n + added[shape] + sum(image_tokens(img) - 1 for img in record.images))
    return lengths


def tokenize_example(processor, record: Record, mode: str, mask_empty_think: bool = False,
                     images: list | None = None) -> Example:
    """Tokenize prompt + target; labels are -100 outside the response. images: the record's images already
    decoded (default: decoded here).

    mask_empty_think: the paper's non-thinking loss masking; a non-thinking target keeps its empty think
    block `<think>\n\n</think>\n\n` in the sequence, but those tokens carry no loss.

    The response starts with the special token `<think>`, so its ids are the same alone as in context: the
    last len(response) ids of the rendered conversation are exactly the response (checked, not assumed).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    messages = record.messages(with_target=mode)
    text = processor.apply_chat_template(messages, tokenize=False)
    images = record.load_images() if images is None else images
    features = {}
    if images:
        encoded = processor(images=images, text=[text], return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        features = {k: v[0].tolist() for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                    and isinstance(v, torch.Tensor) and v.shape == encoded["input_ids"].shape}
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):],
                     add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text(record, mode), add_special_tokens=False)["input_ids"]
    if ids[len(ids) - len(tail):] != tail or tail[: len(response)] != response:
        raise UsageError(f"record {record.id}: response tokens differ in context; check the chat template")
    start = len(ids) - len(tail)
    targets = list(response)
    if mask_empty_think and mode == ThinkingMode.NO_THINK:

        block = tokenizer(MODE_SUFFIXES[ThinkingMode.NO_THINK], add_special_tokens=False)["input_ids"]
        if targets[: len(block)] != block:
            raise UsageError(f"record {record.id}: the non-thinking target does not start with the empty block")
        targets[: len(block)] = [IGNORE_INDEX] * len(block)
    labels = [IGNORE_INDEX] * start + targets + [IGNORE_INDEX] * (len(tail) - len(response))
    return Example(ids, labels, images, features)


def collate(examples: list[Example], processor, pad_id: int) -> dict:
    """Right-padded batch; pixel values in placeholder order, with every other image input the family's
    image processor returns (Qwen-VL's image_grid_thw, LLaVA-NeXT's image_sizes, ...): the model needs them."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    # 0 marks a text token in these features, so text-only examples and padding get zeros
    for key in sorted({k for e in examples for k in e.token_features}):
        values = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            if key in e.token_features:
                values[i, :len(e.input_ids)] = torch.tensor(e.token_features[key])
        batch[key] = values
    images = [img for e in examples for img in e.images]
    if images:
        batch.update(processor.image_processor(images, return_tensors="pt"))
    return batch
