"""TRL: what bimode relies on beyond TRL's public API (TRL 1.16, pinned to its minor; docs/internals.md).

- Private methods BPOTrainer overrides (`GRPOTrainer._generate_and_score_completions`,
  `_get_per_token_logps_and_entropies`): checked against TRL's by `bimode.compat.overrides.check_overrides`.
- `GRPOTrainer._metrics[mode][key]`, the lists TRL averages into each logged step.
- the generation batch's examples, into which `_generate_and_score_completions` merges a `rollout_func`'s extra
  fields (its documented use of them is to pass them to the reward functions).
- `VLLMGeneration._fix_param_name_to_vllm(name, extra_prefixes)`, which names each parameter for the weight sync
  (overridden by bimode's subclass, checked by `check_overrides`), and the VLLMGeneration GRPOTrainer builds
  inline, which takes bimode's subclass by `adopt_vllm_generation`.
- `trl.generation.vllm_generation.LLM`, the class TRL's colocated mode builds its engine with.
- `trl.trainer.utils.selective_log_softmax` and `entropy_from_logits` (not exported by `trl`), so a forward of
  bimode's scores tokens exactly as TRL's does.
- `GRPOTrainer._generate` and `_generate_and_score_completions`, the phases of a step a bench times
  (`step_phase_methods`).
- `SFTTrainer._total_train_tokens` and its `num_tokens` metric: TRL 1.16 counts a padding-free batch as
  `position_ids.size(1)` tokens, the batch axis of Qwen-VL's (4, 1, T) packed positions (`count_packed_tokens`).
- `GRPOTrainer._get_per_token_logps_and_entropies` called as the trainer scores rollouts for its loss
  (`completion_logps`) and as TRL's own implementation (`trl_completion_logps`), so tests compare the two.
- `GRPOTrainer._compute_loss` scoring the policy through `_get_per_token_logps_and_entropies` once per call, with
  gradients, one column per completion token (`LossLogps`: the decision terms reuse that forward's log-probs).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial


def selective_log_softmax(logits, index):
    """log_softmax(logits) at `index`, as TRL computes its per-token log-probs (`trl.trainer.utils`)."""
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    return trl_selective_log_softmax(logits, index)


def entropy_from_logits(logits):
    """Per-position entropy, as TRL logs it (`trl.trainer.utils`)."""
    from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits

    return trl_entropy_from_logits(logits)


def completion_logps(trainer, model, input_ids, attention_mask, logits_to_keep, **kwargs):
    """(per-token log-probs, entropies, ...) of the last `logits_to_keep` tokens as `trainer` scores rollouts for
    its loss: BPOTrainer's shared-prefix forward where it applies, TRL's per-row forward otherwise."""
    return trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs)


def trl_completion_logps(trainer, model, input_ids, attention_mask, logits_to_keep, **kwargs):
    """The same by TRL's own GRPOTrainer implementation, whatever `trainer`'s class overrides; its profiling
    wrapper is skipped, so `trainer` needs only what the forward reads (`accelerator.autocast`)."""
    import inspect

    from trl import GRPOTrainer

    method = inspect.unwrap(GRPOTrainer._get_per_token_logps_and_entropies)
    return method(trainer, model, input_ids, attention_mask, logits_to_keep, **kwargs)


def vllm_param_name(generation, name: str) -> str:
    """The name `generation` (TRL's VLLMGeneration or bimode's subclass) gives parameter `name` in the weight
    sync: TRL's `_fix_param_name_to_vllm` with bimode's override applied."""
    return generation._fix_param_name_to_vllm(name)


def step_phase_methods() -> dict[str, str]:
    """Per phase of a GRPOTrainer step, the trainer method it runs in (TRL 1.16), for a bench that times them:
    the rollout alone, and the rollout with its scoring (rewards, old and reference log-probs)."""
    from trl import GRPOTrainer

    phases = {"rollout": "_generate", "generate_and_score": "_generate_and_score_completions"}
    missing = [name for name in phases.values() if not hasattr(GRPOTrainer, name)]
    if missing:
        raise RuntimeError(f"TRL's GRPOTrainer has no {', '.join(missing)} any more: this TRL release changed an "
                           "internal bimode's benches time (docs/internals.md)")
    return phases


def log_metric(trainer, key: str, value: float, mode: str = "train") -> None:
    """Add a value to what TRL averages and logs as `key` at the next logging step."""
    trainer._metrics[mode][key].append(value)


def logged_metric(trainer, key: str, mode: str = "train") -> list[float]:
    """The values collected for `key` since the last logging step."""
    return trainer._metrics[mode][key]


def count_packed_tokens(trainer, position_ids) -> None:
    """After SFTTrainer's `compute_loss` on a padding-free training batch with multi-axis positions (4, 1, T): add
    what TRL's token count missed (it read size(1) = 1 token, not T), so `num_tokens` counts every packed token."""
    if position_ids.dim() != 3:
        return
    import torch

    missed = torch.tensor(position_ids.size(-1) - position_ids.size(1), device=position_ids.device)
    trainer._total_train_tokens += trainer.accelerator.gather_for_metrics(missed).sum().item() // trainer._tp_size
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


def rollout_extra_field(inputs: list[dict], key: str):
    """A `rollout_func`'s extra field `key`, read back from the examples TRL's `_generate_and_score_completions`
    was given: TRL 1.16 merges the rollout's extra fields into them to hand them to the reward functions."""
    if not inputs or key not in inputs[0]:
        raise RuntimeError(f"TRL did not merge the rollout's field {key!r} into the generation batch's examples: "
                           "this TRL release changed an internal bimode relies on (docs/internals.md); install the "
                           "versions pyproject.toml names")
    return inputs[0][key]


def adopt_vllm_generation(generation, subclass: type) -> None:
    """Make the `VLLMGeneration` GRPOTrainer built (inline in its `__init__`: TRL 1.16 takes no class to build)
    an instance of bimode's `subclass` of it, so bimode's fixes are overrides rather than patched methods. Only a
    plain VLLMGeneration is adopted, by a subclass that adds behaviour, not state TRL's constructor sets."""
    from trl.generation.vllm_generation import VLLMGeneration

    if type(generation) is not VLLMGeneration or not issubclass(subclass, VLLMGeneration):
        raise RuntimeError(f"expected TRL's VLLMGeneration and a subclass of it, got {type(generation).__name__} and "
                           f"{subclass.__name__}: this TRL release changed an internal bimode relies on "
                           "(docs/internals.md)")
    generation.__class__ = subclass


@contextmanager
def colocated_llm_arguments(**kwargs):
    """While TRL builds its colocated vLLM engine, add `kwargs` to the `LLM(...)` call."""
    import trl.generation.vllm_generation as trl_vllm

    llm_class = trl_vllm.LLM
    trl_vllm.LLM = partial(llm_class, **kwargs)
    try:
        yield
    finally:
        trl_vllm.LLM = llm_class


class LossLogps:
    """The per-token log-probs GRPOTrainer's loss scored the policy with. TRL 1.16's `_compute_loss` calls
    `_get_per_token_logps_and_entropies` once, with gradients (the old and reference log-probs are scored earlier, in
    `_generate_and_score_completions`); BPOTrainer's override hands each result to `saw`, which keeps it only while
    `watching()`, and `taken()` is the one the loss used, refusing any other count."""

    def __init__(self):
        self._watching: list | None = None
        self._kept: list = []

    def saw(self, logps) -> None:
        if self._watching is not None:
            self._watching.append(logps)

    @contextmanager
    def watching(self):
        self._watching = []
        try:
            yield
        finally:
            self._kept, self._watching = self._watching, None

    def taken(self):
        """The log-probs kept by the last `watching()`, handed over once (so their graph is not held after)."""
        kept, self._kept = self._kept, []
        if len(kept) != 1:
            raise RuntimeError(f"TRL's loss scored the policy {len(kept)} times, where TRL 1.16 scores it once "
                               "through _get_per_token_logps_and_entropies: this TRL release changed an internal "
                               "bimode's decision terms rely on (docs/internals.md)")
        return kept[0]
