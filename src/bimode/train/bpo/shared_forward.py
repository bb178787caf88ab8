"""The training forward with each prompt run once per group (Prefix Grouper, arXiv 2506.05433).

TRL scores a batch of rollouts (`GRPOTrainer._get_per_token_logps_and_entropies`) by running every row's
prompt + completion through the model, so a prompt shared by 2g rollouts (every BPO query) is encoded 2g
times, image encoder included, forward and backward. Here each distinct prompt runs once: its key/value
cache is kept with autograd attached, expanded to the rows that share it (`index_select` on the batch
dimension, differentiable), and the completions run attending to it. Gradients flow into the prompt's
computation through the cached keys and values, summed over the group's rows: what TRL's per-row graph
sums too, so log-probs, entropies and gradients are the same up to float rounding (tests/
test_shared_prefix_forward.py).

The split. TRL hands over `input_ids = prompt + completion` (B, L) with the prompt left-padded to P columns
and the completion right-padded to K = `logits_to_keep` columns (P = L - K). The prefix pass runs columns
[0, P-1) of each distinct prompt (with its images) into a `DynamicCache`; the per-row pass runs columns
[P-1, L): the prompt's last token again, then the completion. Re-running that one token per row lets a
single head call score all K completion tokens with the usual shift (TRL 1.16's fused LM head scores hidden
states of the pass that made them), for 1 extra token per row. The attention mask is TRL's own (B, L) mask, pads
of the prompt included, so left pads stay masked.

Positions: what TRL's per-row forward gives each column (`pass_positions`).
- 1-D models (LLaVA, LLaVA-NeXT, the plain LMs): column indices, the model's default without `position_ids`;
  the per-row pass takes columns P-1 .. L-1.
- multi-axis (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, given images and `mm_token_type_ids`): the model runs its
  `get_rope_index` over prompt + completion with the attention mask (three axes; an image's tokens get their
  grid place, text the same value on every axis). The prefix pass gets the prompt's, computed once per distinct
  prompt with `bimode.models.positions.rope_positions`, as explicit (3, U, P-1) position_ids; the per-row pass
  continues as text from the prompt's last token (column P-1) by one per real completion token, right pads at 0,
  as get_rope_index gives them. A batch without images (TRL then passes no image arguments): column indices on
  every axis, the model's default then.

What must hold, checked by `call_unsupported` (and `architecture_unsupported`) (anything else takes TRL's own per-row path):
- positions the two passes can be given: an allow-list of model types (LLaVA, LLaVA-NeXT, the plain
  Qwen2/Qwen3/Llama LMs, and the multi-axis Qwen2-VL/2.5-VL/3-VL), full attention in every layer; and Gemma 3,
  whose sliding-window layers and two-way image attention (`token_type_ids`) its own masks apply in both passes:
  the prompt's token types go to the prefix pass, the row pass (text) is masked by the model over the prompt's
  cache (tested equal with a window shorter than the prompt). Everything not listed falls back.
- images given per image: `pixel_values` (n_images, ...) with `num_images` per row and `image_sizes` for
  LLaVA-NeXT, or Qwen-VL's patches (image_grid_thw[i].prod() rows of `pixel_values` per image, `image_grid_thw`
  per image) with `mm_token_type_ids` (B, L) (without them Qwen-VL would not position the images by
  get_rope_index), or Gemma 3's with `token_type_ids` (B, L). None in the per-row part (the completion and the
  prompt's last token, by token id and by the token types): images, their per-token types and Qwen3-VL's
  deepstack features (added to the image tokens' hidden states in early layers) go to the prefix pass only; the
  per-row pass gets no image argument.
- gradient checkpointing, while gradients are taken, only non-reentrant (TRL's default). transformers drops
  the cache inside checkpointed layers, since a `DynamicCache` written again by the backward replay would
  grow twice; here the prefix pass records into a cache whose replay overwrites what it recorded, the row
  pass reads one it never writes, and the layers are told to keep them for the two calls. Reentrant
  checkpointing runs the layer without autograd, so the recorded keys would carry no gradient: it falls
  back. Passes without gradients (TRL's old and reference log-probs) share either way.
- no MoE auxiliary loss (`compute_aux_loss`).
Dropout: the supported models have none by default (attention_dropout 0). Where some is active in train mode
(LoRA's `lora_dropout`), the prompt's dropout mask is drawn once per group instead of once per rollout: the
same expected gradient, not the same random draw.

Library internals (the cache's argument name, which changed inside the supported transformers range, the
checkpointing switches, and the cache's layers) are reached through bimode.compat.transformers_api; BPOTrainer's override follows TRL
1.16's signature of `_get_per_token_logps_and_entropies`. tests/unit/test_compat.py and this module's tests run at
both ends of the transformers range (5.17 in vLLM's environment, 5.25; docs/internals.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bimode.compat.transformers_api import (base_model, cache_growing_layers_of, cache_of_layers, cache_tensors,
                                            checkpointing_layers, dynamic_layer_class, is_reentrant,
                                            keep_cache_under_checkpointing, with_cache)
from bimode.models.positions import flat_positions_unsupported, multi_axis_positions, rope_positions

# TRL's multimodal arguments this path handles; any other one that is set means fallback. image_grid_thw and
# mm_token_type_ids only with multi-axis positions (Qwen-VL), where they make the model's get_rope_index positions;
# token_type_ids (Gemma 3: its image tokens attend to each other both ways) go with the prompt to the prefix pass.
HANDLED_IMAGE_ARGS = ("pixel_values", "image_sizes", "num_images", "image_grid_thw", "mm_token_type_ids",
                      "token_type_ids")
OTHER_IMAGE_ARGS = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_position_ids")
# Per-token arguments (B, L): the prompt's columns go to the prefix pass; the per-row part must be all text (0).
TOKEN_TYPE_ARGS = ("mm_token_type_ids", "token_type_ids")


DynamicLayer = dynamic_layer_class()  # transformers' cache layer, the base of the two below


class RecordingLayer(DynamicLayer):
    """Prefix pass: keeps the keys/values (batch, kv_heads, P-1, head_dim) of an empty cache's one update.
    A second update (gradient checkpointing replaying the layer in backward) overwrites them with the same
    values instead of appending, so the replay sees the shapes the forward saw."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class ReadOnlyPrefixLayer(DynamicLayer):
    """Row pass: the group's prompt keys/values expanded to the rows (n, kv_heads, P-1, head_dim). Each update
    returns prompt + new along the sequence and stores nothing, so a replay returns the same."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def architecture_unsupported(model) -> str | None:
    """Why this model's architecture cannot share the prompt's cache (None: it can). Static per model."""
    return flat_positions_unsupported(model, "shared-prefix", multi_axis=True, sliding_window=True)


def call_unsupported(model, input_ids: torch.Tensor, logits_to_keep: int, compute_aux_loss: bool = False,
                     **image_args) -> str | None:
    """Why this call cannot share (None: it can): architecture, arguments, gradient checkpointing."""
    reason = architecture_unsupported(model)
    if reason:
        return reason
    if compute_aux_loss:
        return "MoE auxiliary loss requested"
    others = [k for k in OTHER_IMAGE_ARGS if image_args.get(k) is not None]
    if others:
        return f"image arguments this path does not slice: {others}"
    unknown = set(image_args) - set(HANDLED_IMAGE_ARGS) - set(OTHER_IMAGE_ARGS)
    if unknown:
        return f"unknown arguments {sorted(unknown)}"
    reason = _image_layout_unsupported(model, **{k: image_args.get(k) for k in HANDLED_IMAGE_ARGS})
    if reason:
        return reason
    prompt_length = input_ids.size(1) - logits_to_keep
    if logits_to_keep < 1 or prompt_length < 2:
        return f"prompt of {prompt_length} and completion of {logits_to_keep} columns"
    inner = base_model(model)
    image_token = getattr(inner.config, "image_token_id", getattr(inner.config, "image_token_index", None))
    if image_token is not None and bool((input_ids[:, prompt_length - 1:] == image_token).any()):
        return "an image token in the per-row part (completion or the prompt's last token)"
    for name in TOKEN_TYPE_ARGS:
        token_types = image_args.get(name)
        if token_types is not None and bool(token_types[:, prompt_length - 1:].any()):
            return f"{name} marks an image or video token in the per-row part"
    if torch.is_grad_enabled() and any(is_reentrant(m) for m in checkpointing_layers(model)):
        return "reentrant gradient checkpointing (the prompt's cached keys would get no gradient)"
    return None


def _image_layout_unsupported(model, pixel_values, image_sizes, num_images, image_grid_thw,
                              mm_token_type_ids, token_type_ids) -> str | None:
    """Why TRL's image tensors cannot be cut per prompt here (None: they can)."""
    multi_axis = multi_axis_positions(model)
    if not multi_axis and (image_grid_thw is not None or mm_token_type_ids is not None):
        return "image_grid_thw / mm_token_type_ids for a model without multi-axis positions"
    if multi_axis and image_grid_thw is not None and mm_token_type_ids is None:
        # without them the model does not run get_rope_index (Qwen2.5-VL: column positions; Qwen3-VL: an error)
        return "image_grid_thw without mm_token_type_ids"
    if pixel_values is None:
        return None
    if num_images is None:
        return "pixel_values not given per image"
    if image_grid_thw is not None:  # Qwen-VL: image_grid_thw per image, its patches flattened into pixel_values
        if image_grid_thw.size(0) != sum(num_images) or pixel_values.size(0) != int(image_grid_thw.prod(-1).sum()):
            return "pixel_values / image_grid_thw not given per image"
    elif pixel_values.size(0) != sum(num_images):
        return "pixel_values not given per image"
    return None


@dataclass
class PrefixGroups:
    """Rows that share a prompt. prompt_length: P (columns of the left-padded prompt); group_of: (B,) long,
    each row's distinct prompt; representatives: U rows, the first row of each distinct prompt."""

    prompt_length: int
    group_of: torch.Tensor
    representatives: list[int]

    @property
    def shared(self) -> bool:
        """Whether some prompt serves more than one row."""
        return len(self.representatives) < self.group_of.numel()


@dataclass
class ImageLayout:
    """Where TRL's flat image tensors put each row's images. images[b]: row b's image indices (num_images);
    pixels[i]: image i's rows of pixel_values, one per image, or image_grid_thw[i].prod() patches (Qwen-VL)."""

    images: list[range]
    pixels: list[range]

    @classmethod
    def of(cls, num_images: list[int] | None, image_grid_thw: torch.Tensor | None = None) -> "ImageLayout":
        if num_images is None:
            return cls([], [])
        sizes = image_grid_thw.prod(-1).tolist() if image_grid_thw is not None else [1] * sum(num_images)
        return cls(_ranges(num_images), _ranges(sizes))

    def pixel_rows(self, rows: list[int]) -> list[int]:
        """The pixel_values rows of `rows`' images, in order."""
        return [p for r in rows for i in self.images[r] for p in self.pixels[i]]

    def image_index(self, rows: list[int]) -> list[int]:
        return [i for r in rows for i in self.images[r]]


def _ranges(counts: list[int]) -> list[range]:
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def find_prefix_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                       pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                       num_images: list[int] | None = None, image_grid_thw: torch.Tensor | None = None,
                       mm_token_type_ids: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None) -> PrefixGroups:
    """Group rows with the same prompt: ids, mask (and the token types) of the P = L - K prompt columns and
    identical images.

    input_ids, attention_mask: (B, L); pixel_values: num_images[b] images for row b, one row per image, or for
    Qwen-VL each image's image_grid_thw.prod() patch rows; image_sizes / image_grid_thw: (n_images, 2 / 3) or
    None. Rows of a group need not be adjacent (TRL shuffles rollouts).
    """
    prompt_length = input_ids.size(1) - logits_to_keep
    columns = [input_ids, attention_mask] + [t for t in (mm_token_type_ids, token_type_ids) if t is not None]
    prompts = torch.cat([c[:, :prompt_length].to(input_ids.dtype) for c in columns], 1)
    _, same_text = torch.unique(prompts, dim=0, return_inverse=True)
    layout = ImageLayout.of(num_images, image_grid_thw)

    def same_image(i: int, j: int) -> bool:
        return all(t is None or torch.equal(t[i], t[j]) for t in (image_sizes, image_grid_thw)) and torch.equal(
            pixel_values[layout.pixels[i].start:layout.pixels[i].stop],
            pixel_values[layout.pixels[j].start:layout.pixels[j].stop])

    def same_images(a: int, b: int) -> bool:
        if pixel_values is None or not layout.images:
            return True
        ia, ib = layout.images[a], layout.images[b]
        return len(ia) == len(ib) and all(same_image(i, j) for i, j in zip(ia, ib))

    representatives: list[int] = []
    by_text: dict[int, list[int]] = {}  # text id -> group indices
    group_of = []
    for row, text in enumerate(same_text.tolist()):
        for g in by_text.get(text, []):
            if same_images(representatives[g], row):
                group_of.append(g)
                break
        else:
            by_text.setdefault(text, []).append(len(representatives))
            group_of.append(len(representatives))
            representatives.append(row)
    return PrefixGroups(prompt_length, torch.tensor(group_of, device=input_ids.device), representatives)


def _prefix_images(rows: list[int], layout: ImageLayout, pixel_values=None, image_sizes=None, image_grid_thw=None,
                   num_images=None, **_token_types) -> dict:
    """The image arguments of `rows` (their slices of TRL's flat tensors), or {} without images. The token types
    are per token and cut with the prompt's columns by the caller."""
    if pixel_values is None:
        return {}
    images = layout.image_index(rows)
    if not images:
        return {}
    pixels = torch.tensor(layout.pixel_rows(rows), device=pixel_values.device)
    out = {"pixel_values": pixel_values.index_select(0, pixels)}
    for key, per_image in (("image_sizes", image_sizes), ("image_grid_thw", image_grid_thw)):
        if per_image is not None:
            out[key] = per_image.index_select(0, torch.tensor(images, device=per_image.device))
    return out


def pass_positions(model, input_ids, attention_mask, groups: PrefixGroups, layout: ImageLayout,
                   image_grid_thw=None, mm_token_type_ids=None, **_) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rotary positions TRL's per-row forward gives, split as the two passes run them: (the representatives'
    columns [0, P-1) ((3, U, P-1), or None: the model's default), every row's columns [P-1, L)).

    1-D models, and multi-axis ones given no images: column indices (the model's default without position_ids),
    (1, n) or (3, B, n). Qwen-VL with images: the model runs get_rope_index over prompt + completion with the
    attention mask; the prompt's part is the same over its own columns (positions only look back), and the
    completion, all text, continues from the prompt's last token by one per real token, pads at 0."""
    cut, length = groups.prompt_length - 1, input_ids.size(1)
    columns = torch.arange(cut, length, device=input_ids.device)
    if not multi_axis_positions(model):
        return None, columns.unsqueeze(0)
    reps = groups.representatives
    if image_grid_thw is None or mm_token_type_ids is None:  # what the model falls back to: columns on every axis
        return (torch.arange(cut, device=input_ids.device).expand(3, len(reps), -1),
                columns.expand(3, input_ids.size(0), -1))
    index = torch.tensor(reps, device=input_ids.device)
    grid = image_grid_thw.index_select(0, torch.tensor(layout.image_index(reps), dtype=torch.long,
                                                       device=image_grid_thw.device))
    prompt = rope_positions(model, *(t.index_select(0, index)[:, :cut + 1]
                                     for t in (input_ids, attention_mask, mm_token_type_ids)), image_grid_thw=grid)
    last = prompt[:, groups.group_of, cut]  # (3, B): the prompt's last token, text, the same on every axis
    mask = attention_mask[:, cut:]
    rows = (last.unsqueeze(-1) + mask.long().cumsum(-1) - 1).masked_fill(mask.unsqueeze(0) == 0, 0)
    return prompt[..., :cut], rows


def _run_prefixes(model, input_ids, attention_mask, groups: PrefixGroups, batch_size: int, layout: ImageLayout,
                  positions: torch.Tensor | None, images: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct prompt's columns [0, P-1) once, in chunks of batch_size prompts, with its images (and for
    Qwen3-VL the deepstack features they add at the image tokens: the image tokens are all in these columns).

    Returns per layer (keys, values), each (U, kv_heads, P-1, head_dim), still attached to the graph.
    """
    cut = groups.prompt_length - 1
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    reps = groups.representatives
    for start in range(0, len(reps), batch_size):
        rows = reps[start:start + batch_size]
        index = torch.tensor(rows, device=input_ids.device)
        extra = _prefix_images(rows, layout, **images)
        if positions is not None:
            extra["position_ids"] = positions[..., start:start + len(rows), :]
        for name in TOKEN_TYPE_ARGS:
            if images.get(name) is not None:
                extra[name] = images[name].index_select(0, index)[:, :cut]
        cache = cache_growing_layers_of(RecordingLayer)
        # logits_to_keep=1: the prefix's logits are not needed (the per-row pass re-runs its last token)
        model(input_ids=input_ids.index_select(0, index)[:, :cut],
              attention_mask=attention_mask.index_select(0, index)[:, :cut],
              **extra, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        layers.append(cache_tensors(cache))
    if len(layers) == 1:
        return layers[0]
    return [(torch.cat([c[i][0] for c in layers]), torch.cat([c[i][1] for c in layers])) for i in range(len(layers[0]))]


def _plain_head(model, inputs: dict, completion_ids: torch.Tensor, valid: torch.Tensor, temperature: float,
                compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) from the model's logits, for a model without TRL's fused head: logits of
    positions P-1 .. L-2 divided by the temperature, zero where the label is masked (as TRL's fused head)."""
    from bimode.compat.trl_api import entropy_from_logits, selective_log_softmax

    logits = model(**inputs, use_cache=False).logits[:, :-1].float() / temperature  # (n, K, V)
    logps = selective_log_softmax(logits, completion_ids).masked_fill(~valid, 0.0)
    entropy = entropy_from_logits(logits).masked_fill(~valid, 0.0) if compute_entropy else None
    return logps, entropy


def grouped_completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                             model_kwargs: dict | None = None, compute_entropy: bool = False, *,
                             batch_size: int | None = None, temperature: float = 1.0, fused_lm_head: bool = False,
                             groups: PrefixGroups | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the completions, each distinct prompt run once.

    input_ids, attention_mask: (B, L) = left-padded prompt (P columns) + right-padded completion
    (K = logits_to_keep columns); model_kwargs: TRL's image arguments (`HANDLED_IMAGE_ARGS`): pixel_values,
    num_images (B ints), image_sizes (n_images, 2), and for Qwen-VL image_grid_thw (n_images, 3) with the
    patches in pixel_values and mm_token_type_ids (B, L); only the prefix pass gets them. batch_size: rows per
    forward, as TRL's chunking (prefix passes take that many distinct prompts). fused_lm_head: the model carries
    TRL's fused head (`trl.trainer.utils.add_fused_lm_head`, which holds the temperature); otherwise the logits
    are divided by `temperature` here. groups: `find_prefix_groups`' result if already computed.

    Returns (log-probs (B, K), entropies (B, K) or None), zero where attention_mask is 0, like TRL 1.16's
    `_get_per_token_logps_and_entropies`. Call `call_unsupported` first: this function assumes the case holds.
    """
    with keep_cache_under_checkpointing(checkpointing_layers(model)):
        return _grouped(model, input_ids, attention_mask, logits_to_keep, model_kwargs, compute_entropy, batch_size,
                        temperature, fused_lm_head, groups)


def _grouped(model, input_ids, attention_mask, logits_to_keep, model_kwargs, compute_entropy, batch_size,
             temperature, fused_lm_head, groups):
    images = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    groups = groups or find_prefix_groups(input_ids, attention_mask, logits_to_keep, **images)
    layout = ImageLayout.of(images.get("num_images"), images.get("image_grid_thw"))
    batch_size = batch_size or input_ids.size(0)
    prefix_positions, positions = pass_positions(model, input_ids, attention_mask, groups, layout, **images)
    prefix = _run_prefixes(model, input_ids, attention_mask, groups, batch_size, layout, prefix_positions, images)
    cut = groups.prompt_length - 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        end = min(start + batch_size, input_ids.size(0))
        select = groups.group_of[start:end]
        # the group's prompt, one copy per row (differentiable: index_select)
        cache = cache_of_layers([ReadOnlyPrefixLayer(k.index_select(0, select), v.index_select(0, select))
                                 for k, v in prefix])
        # no image argument: the row part is text (Qwen3-VL gets no deepstack features, nothing to add them to)
        row_positions = positions if positions.dim() == 2 else positions[:, start:end]  # (1, n) or (3, B, n)
        inputs = {"input_ids": input_ids[start:end, cut:], "attention_mask": attention_mask[start:end],
                  "position_ids": row_positions, **with_cache(model, cache)}
        if fused_lm_head:
            out = model(**inputs, labels=labels[start:end, cut:], fused_lm_head=True)
            all_logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(out.entropy[:, -logits_to_keep:])
        else:
            valid = labels[start:end, -logits_to_keep:] != -100
            logps, entropy = _plain_head(model, inputs, input_ids[start:end, -logits_to_keep:], valid, temperature,
                                         compute_entropy)
            all_logps.append(logps)
            all_entropies.append(entropy)
    logps = torch.cat(all_logps)
    return logps, torch.cat(all_entropies) if compute_entropy else None


__all__ = ["HANDLED_IMAGE_ARGS", "ImageLayout", "PrefixGroups", "ReadOnlyPrefixLayer", "RecordingLayer",
           "architecture_unsupported", "base_model", "call_unsupported", "find_prefix_groups",
           "grouped_completion_logps", "pass_positions"]
