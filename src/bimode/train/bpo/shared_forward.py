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
states of the pass that made them), for 1 extra token per row. Positions are column indices, as in TRL's
forward (the model's default without `position_ids`), so the per-row pass takes columns P-1 .. L-1; the
attention mask is TRL's own (B, L) mask, pads of the prompt included, so left pads stay masked.

What must hold, checked by `call_unsupported` (and `architecture_unsupported`) (anything else takes TRL's own per-row path):
- 1-D positions that a cache offset continues: an allow-list of model types (LLaVA, LLaVA-NeXT, and the
  plain Qwen2/Qwen3/Llama LMs), full attention in every layer. Qwen2-VL/2.5-VL/3-VL (multi-axis rotary
  positions computed from the whole sequence with `rope_deltas`), Gemma 3 (sliding windows, bidirectional
  image attention from `token_type_ids`) and everything not listed fall back.
- images given per image (`pixel_values` (n_images, ...) with `num_images` per row, `image_sizes` for
  LLaVA-NeXT), none in the per-row part (the completion and the prompt's last token): they go to the prefix
  pass only.
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
from bimode.models.positions import flat_positions_unsupported

# TRL's multimodal arguments this path handles; any other one that is set means fallback.
HANDLED_IMAGE_ARGS = ("pixel_values", "image_sizes", "num_images")
OTHER_IMAGE_ARGS = ("image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")


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
    return flat_positions_unsupported(model, "shared-prefix")


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
    pixel_values, num_images = image_args.get("pixel_values"), image_args.get("num_images")
    if pixel_values is not None and (num_images is None or pixel_values.size(0) != sum(num_images)):
        return "pixel_values not given per image"
    prompt_length = input_ids.size(1) - logits_to_keep
    if logits_to_keep < 1 or prompt_length < 2:
        return f"prompt of {prompt_length} and completion of {logits_to_keep} columns"
    inner = base_model(model)
    image_token = getattr(inner.config, "image_token_id", getattr(inner.config, "image_token_index", None))
    if image_token is not None and bool((input_ids[:, prompt_length - 1:] == image_token).any()):
        return "an image token in the per-row part (completion or the prompt's last token)"
    if torch.is_grad_enabled() and any(is_reentrant(m) for m in checkpointing_layers(model)):
        return "reentrant gradient checkpointing (the prompt's cached keys would get no gradient)"
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


def _image_rows(num_images: list[int] | None) -> list[range]:
    """Per row, the indices of its images in TRL's flat per-image tensors."""
    if num_images is None:
        return []
    starts = [0]
    for n in num_images:
        starts.append(starts[-1] + n)
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def find_prefix_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                       pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                       num_images: list[int] | None = None) -> PrefixGroups:
    """Group rows with the same prompt: ids and mask of the P = L - K prompt columns and identical images.

    input_ids, attention_mask: (B, L); pixel_values: (n_images, ...) with num_images[b] images for row b;
    image_sizes: (n_images, 2) or None. Rows of a group need not be adjacent (TRL shuffles rollouts).
    """
    prompt_length = input_ids.size(1) - logits_to_keep
    prompts = torch.cat([input_ids[:, :prompt_length], attention_mask[:, :prompt_length].to(input_ids.dtype)], 1)
    _, same_text = torch.unique(prompts, dim=0, return_inverse=True)
    images = _image_rows(num_images)

    def same_images(a: int, b: int) -> bool:
        if pixel_values is None or not images:
            return True
        ia, ib = images[a], images[b]
        if len(ia) != len(ib):
            return False
        for i, j in zip(ia, ib):
            if not torch.equal(pixel_values[i], pixel_values[j]):
                return False
            if image_sizes is not None and not torch.equal(image_sizes[i], image_sizes[j]):
                return False
        return True

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


def _prefix_images(rows: list[int], pixel_values, image_sizes, num_images) -> dict:
    """The image arguments of `rows` (per-image slices of TRL's flat tensors), or {} without images."""
    if pixel_values is None:
        return {}
    per_row = _image_rows(num_images)
    index = [i for r in rows for i in per_row[r]]
    if not index:
        return {}
    index_t = torch.tensor(index, device=pixel_values.device)
    out = {"pixel_values": pixel_values.index_select(0, index_t)}
    if image_sizes is not None:
        out["image_sizes"] = image_sizes.index_select(0, index_t.to(image_sizes.device))
    return out


def _run_prefixes(model, input_ids, attention_mask, groups: PrefixGroups, batch_size: int,
                  pixel_values=None, image_sizes=None, num_images=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct prompt's columns [0, P-1) once, in chunks of batch_size prompts.

    Returns per layer (keys, values), each (U, kv_heads, P-1, head_dim), still attached to the graph.
    """
    cut = groups.prompt_length - 1
    layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    reps = groups.representatives
    for start in range(0, len(reps), batch_size):
        rows = reps[start:start + batch_size]
        index = torch.tensor(rows, device=input_ids.device)
        cache = cache_growing_layers_of(RecordingLayer)
        # logits_to_keep=1: the prefix's logits are not needed (the per-row pass re-runs its last token)
        model(input_ids=input_ids.index_select(0, index)[:, :cut],
              attention_mask=attention_mask.index_select(0, index)[:, :cut],
              **_prefix_images(rows, pixel_values, image_sizes, num_images),
              **with_cache(model, cache), use_cache=True, logits_to_keep=1)
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
    (K = logits_to_keep columns); model_kwargs: pixel_values (n_images, ...), num_images (B ints), image_sizes
    (n_images, 2), as TRL passes them (only to the prefix pass). batch_size: rows per forward, as TRL's
    chunking (prefix passes take that many distinct prompts). fused_lm_head: the model carries TRL's fused
    head (`trl.trainer.utils.add_fused_lm_head`, which holds the temperature); otherwise the logits are
    divided by `temperature` here. groups: `find_prefix_groups`' result if already computed.

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
    batch_size = batch_size or input_ids.size(0)
    prefix = _run_prefixes(model, input_ids, attention_mask, groups, batch_size, **images)
    cut = groups.prompt_length - 1
    length = input_ids.size(1)
    positions = torch.arange(cut, length, device=input_ids.device).unsqueeze(0)  # TRL's column positions
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        end = min(start + batch_size, input_ids.size(0))
        select = groups.group_of[start:end]
        # the group's prompt, one copy per row (differentiable: index_select)
        cache = cache_of_layers([ReadOnlyPrefixLayer(k.index_select(0, select), v.index_select(0, select))
                                 for k, v in prefix])
        inputs = {"input_ids": input_ids[start:end, cut:], "attention_mask": attention_mask[start:end],
                  "position_ids": positions, **with_cache(model, cache)}
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


__all__ = ["PrefixGroups", "ReadOnlyPrefixLayer", "RecordingLayer", "architecture_unsupported", "base_model", "call_unsupported", "find_prefix_groups",
           "grouped_completion_logps"]
