"""`bimode bpo`: Bi-mode Policy Optimization on TRL's GRPOTrainer (docs/r4b.md, section 6).

Every prompt is rendered in auto mode (ending in `<think>`) and rolled out `num_generations = 2g` times: the
first g rollouts are forced to think (`\\n` after `<think>`), the other g not to (`\\n\\n</think>\\n\\n`).
TRL's group normalization then runs over the mixed group of 2g, which is BPO's advantage. The forced suffix
is the start of each completion, not part of the prompt (appending it to the prompt ids would shift
Qwen-VL's multi-axis positions, which TRL recomputes from the prompt text), so `mode_token_loss` decides
what it contributes: off (no loss), on (the rollout's advantage, like any token) or a weight in between.
`rollout: auto` is plain GRPO in auto mode at the same rollout budget, the paper's baseline.

With TRL's `use_peft` (and `lora_*`) flags BPO trains LoRA adapters (train/adapters.py); TRL then takes the
KL reference (beta > 0) from the same model with the adapter switched off.

Training forward: every rollout of a query has the same prompt, so `_get_per_token_logps_and_entropies`
runs each distinct prompt (images included) once and lets its rollouts attend to its key/value cache,
forward and backward (train/bpo/shared_forward.py; `shared_prefix_forward`, on by default, falls back to
TRL's per-row forward where that is not proven equivalent, and logs which path it took).

Pinned to TRL 1.16 (pyproject): this relies on `rollout_func`, `_generate_and_score_completions`, the
(B, T) advantages `_compute_loss` accepts and the signature of `_get_per_token_logps_and_entropies`; the
private parts go through bimode.compat.trl_api (docs/internals.md), and tests/unit/test_bpo.py,
tests/unit/test_shared_prefix_forward.py and tests/unit/test_compat.py guard each.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from bimode.compat.overrides import check_overrides
from bimode.compat.peft_api import expose_output_bias
from bimode.compat.trl_api import LossLogps, log_metric, rollout_extra_field
from bimode.data.records import Record, read_records
from bimode.errors import UsageError
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import SamplingParams, token_counts
from bimode.modes import ThinkingMode
from bimode.train.adapters import AdapterFields, added_rows, build_peft_config
from bimode.train.bad_rows import BadRowsMixin, RowImages
from bimode.train.bpo.core import (MODE_OBJECTIVES, ROLLOUT_LAYOUTS, decision_advantages, mode_token_loss,
                                   parse_mode_token_loss, per_mode_stats, response_mode, rollout_modes)
from bimode.train.bpo.decision import (DECISION_LOSSES, DECISION_TARGETS, decision_cross_entropy, decision_env_mask,
                                       decision_target_weights, decoupled_decision_loss)
from bimode.train.bpo.probe import PThinkProbe, pick_probe
from bimode.train.bpo.rewards import GuardedReward, build_rewards, make_thinking_cost, weighted_rewards
from bimode.train.bpo.rollouts import ROLLOUT_FIELD, RolloutBatch, group_prompts
from bimode.train.checkpoint import StrictResumeMixin
from bimode.train.run import train_and_save
from bimode.train.start import StartFields, load_start
from bimode.train.components import freeze
from bimode.train.precision import fp32_unless_asked_on_cpu
from bimode.train.row_checks import RowCheckFields, TextLimit, checked_rows, token_counter
from bimode.train.tokenization import own_text
from bimode.train.bpo.shared_forward import (HANDLED_IMAGE_ARGS, call_unsupported, find_prefix_groups,
                                             grouped_completion_logps)
from bimode.train.bpo.vllm_fit import collapse_image_runs, fit_vllm_generation, colocated_llm_settings

MODE_CODES = {"think": 0, "no_think": 1, "malformed": 2}
# GRPO's generation fields that only TRL's own generation reads: bimode's engine (rollouts without use_vllm)
# samples with temperature, top_p, top_k and max_completion_length. {field: values that hold anyway}
ENGINE_BYPASSED_FIELDS = {"min_p": (None, 0.0), "repetition_penalty": (1.0,), "generation_kwargs": (None, {}),
                          "cache_implementation": (None,), "use_transformers_paged": (False,),
                          "use_transformers_continuous_batching": (False,)}
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's loss types with the PPO-clipped term
# the generation batch's per-rollout fields the decision terms read in compute_loss (TRL shuffles and splits every
# (B,) tensor of the batch with the rest)
DECISION_ADVANTAGES, DECISION_TARGET_WEIGHTS = "bimode_decision_advantages", "bimode_decision_target_weights"
log = logging.getLogger(__name__)


@dataclass
class BPOConfig(StartFields, RowCheckFields, AdapterFields, GRPOConfig):
    rollout: str = field(default="bimode", metadata={
        "help": "bimode: num_generations/2 rollouts forced to think and as many not to, normalized together "
                "(BPO); auto: every rollout in auto mode (plain GRPO, the paper's baseline)"})
    mode_token_loss: str = field(default="on", metadata={
        "help": "loss on the forced mode tokens: off (none; the paper's literal reading), on (the rollout's "
                "advantage, like any token) or a weight in (0, 1). Default on: measured on the embedded "
                "default (docs/bpo.md, 'BPO in miniature')"})
    mode_objective: str = field(default="bpo", metadata={
        "help": "what the forced mode tokens (the auto-mode decision) learn: bpo (the rollout's own advantage, "
                "the paper's) or decision (AdaptThink-style: +d on the direct rollouts' mode tokens and -d on "
                "the thinking ones, d = the query's direct accuracy + direct_margin - its thinking accuracy; "
                "docs/bpo.md, 'A cost of thinking'). Needs rollout bimode and mode_token_loss > 0"})
    direct_margin: float = field(default=0.0, metadata={
        "help": "decision objective: the accuracy (reward) a query may lose by answering directly and still "
                "prefer it (AdaptThink's delta)"})
    decision_scale: float = field(default=1.0, metadata={
        "help": "decision objective: the decision advantage's size against the response tokens' "
                "group-normalized advantage"})
    decision_loss: str = field(default="tokens", metadata={
        "help": "how the decision token (the forced suffix's first token) enters the loss: tokens (one completion "
                "token among the rest, BPO's) or decoupled (Thinkless' DeGRPO: its own PPO-clipped term averaged "
                "over rollouts, times decision_weight, the rest of the suffix as mode_token_loss says; docs/bpo.md, "
                "'Learning the decision per query'). Needs rollout bimode"})
    decision_weight: float = field(default=1.0, metadata={
        "help": "decoupled decision loss: its weight against the responses' loss (DeGRPO's alpha; the decision's "
                "own step size)"})
    decision_target: str = field(default="off", metadata={
        "help": "a supervised decision target from each query's forced groups, as a cross-entropy on the decision "
                "token: off, hard (think iff thinking's accuracy beats the direct answer's by more than "
                "direct_margin), soft (sigmoid((think acc - direct acc - direct_margin) / "
                "decision_target_temperature)) or majority (think iff at least half the thinking rollouts are "
                "right and fewer than half the direct ones: greedy decoding's verdicts). Needs rollout bimode"})
    decision_target_weight: float = field(default=1.0, metadata={
        "help": "decision target: the cross-entropy's weight against the responses' loss (its own step size)"})
    decision_target_temperature: float = field(default=0.1, metadata={
        "help": "soft decision target: the accuracy gap over which the target goes from direct to think"})
    thinking_cost_per_token: float = field(default=0.0, metadata={
        "help": "reward lost per thinking token, summed with the rewards before BPO's group normalization "
                "(0: none, the paper's BPO)"})
    thinking_cost_per_think: float = field(default=0.0, metadata={
        "help": "reward lost by a rollout that thinks at all (a per-mode cost; 0: none)"})
    rewards: list[str] = field(default_factory=lambda: ["accuracy"], metadata={
        "help": "reward functions: accuracy, format (a collapse risk; weight it low) or package.module:function; "
                "weights in reward_weights"})
    probe_files: list[str] = field(default_factory=list, metadata={
        "help": "records whose auto-mode p_think is logged by level every probe_steps (default: train records)"})
    probe_size: int = field(default=256, metadata={"help": "records in the p_think probe set"})
    probe_steps: int = field(default=10, metadata={"help": "probe p_think every this many steps (0: never)"})
    rollout_batch_rows: int = field(default=256, metadata={
        "help": "most rollouts decoded together by the shared-prefix engine (transformers path)"})
    shared_prefix_forward: bool = field(default=True, metadata={
        "help": "score rollouts with each prompt (images included) run once per group and its key/value cache "
                "shared by the group's rows, forward and backward (train/bpo/shared_forward.py); falls back "
                "to TRL's per-row forward where the model or the call is not supported (logged once)"})
    freeze_vision: bool = field(default=False, metadata={"help": "keep the vision tower fixed"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "where to log (tensorboard by default; 'none' to turn off, 'wandb', ...)"})

    def __post_init__(self):
        if self.chat_template_kwargs is None:
            self.chat_template_kwargs = {}
        if isinstance(self.chat_template_kwargs, dict):
            self.chat_template_kwargs.setdefault("thinking_mode", "auto")
        if self.rollout not in ROLLOUT_LAYOUTS:  # read now, not at import: a layout a user registers counts
            raise UsageError(f"rollout must be one of {tuple(ROLLOUT_LAYOUTS)}, not {self.rollout!r}")
        if self.rollout == "bimode" and self.num_generations % 2:
            raise UsageError(f"rollout bimode needs an even num_generations (2g), got {self.num_generations}")
        repeated = sorted({r for r in self.rewards if self.rewards.count(r) > 1})
        if repeated:  # each reward's values travel under its name (RolloutBatch.rewards); weight it instead
            raise UsageError(f"rewards lists {repeated} more than once: give one reward a larger reward_weights entry")
        weight = parse_mode_token_loss(self.mode_token_loss)
        if self.mode_objective not in MODE_OBJECTIVES:  # read now, so an objective registered by a user counts
            raise UsageError(f"mode_objective must be one of {tuple(MODE_OBJECTIVES)}, not {self.mode_objective!r}")
        decoupled = self.decision_loss == "decoupled"
        if self.mode_objective != "bpo" and (self.rollout != "bimode" or (weight == 0.0 and not decoupled)):
            raise UsageError(f"mode_objective {self.mode_objective} trains the forced mode tokens: it needs "
                             f"rollout bimode and mode_token_loss above 0 or decision_loss decoupled (got rollout "
                             f"{self.rollout}, mode_token_loss {self.mode_token_loss})")
        self._check_decision_options()
        for name in ("thinking_cost_per_token", "thinking_cost_per_think", "direct_margin", "decision_scale",
                     "decision_weight", "decision_target_weight", "decision_target_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name != "direct_margin" and value < 0):
                raise UsageError(f"{name} must be a finite number{'' if name == 'direct_margin' else ' >= 0'}, "
                                 f"got {value}")
        if self.decision_target_temperature == 0:
            raise UsageError("decision_target_temperature must be above 0 (a hard target is decision_target hard)")
        if not self.use_vllm:
            for name, holding in ENGINE_BYPASSED_FIELDS.items():
                if getattr(self, name) not in holding:
                    raise UsageError(f"{name} {getattr(self, name)!r}: without use_vllm bimode's own engine rolls "
                                     "out, sampling with temperature, top_p, top_k and max_completion_length only; "
                                     "leave it unset or set use_vllm (TRL's vLLM generation reads it)")
        fp32_unless_asked_on_cpu(self)
        super().__post_init__()

    def _check_decision_options(self) -> None:
        """decision_loss and decision_target (train/bpo/decision.py): known names, bimode rollouts, and for the
        decoupled loss a TRL loss_type whose per-token term is the PPO-clipped surrogate it repeats."""
        if self.decision_loss not in DECISION_LOSSES:
            raise UsageError(f"decision_loss must be one of {DECISION_LOSSES}, not {self.decision_loss!r}")
        targets = ("off", *DECISION_TARGETS)  # read now, so a target registered by a user counts
        if self.decision_target not in targets:
            raise UsageError(f"decision_target must be one of {targets}, not {self.decision_target!r}")
        for name, on in (("decision_loss", self.decision_loss != "tokens"), ("decision_target",
                                                                              self.decision_target != "off")):
            if on and self.rollout != "bimode":
                raise UsageError(f"{name} {getattr(self, name)} trains the decision from the forced groups: it "
                                 f"needs rollout bimode, got {self.rollout}")
        if self.decision_loss == "decoupled" and self.loss_type not in CLIPPED_LOSS_TYPES:
            raise UsageError(f"decision_loss decoupled repeats the PPO-clipped term of loss_type "
                             f"{'/'.join(CLIPPED_LOSS_TYPES)} for the decision token, not loss_type {self.loss_type}")

    def frozen(self) -> set[str]:
        """Components BPO keeps fixed (the projector and language model always train)."""
        return {"vision"} if self.freeze_vision else set()


class BPOTrainer(BadRowsMixin, StrictResumeMixin, GRPOTrainer):
    """GRPOTrainer with bi-mode rollouts, mode-token loss weights, guarded rewards and per-mode logging; rows whose
    images fail to decode are counted and their place given to the next row that decodes (train/bad_rows.py)."""

    def __init__(self, *, model, args: BPOConfig, records: list[Record], processor,
                 probe_records: list[Record] | None = None, origins: list[tuple[str, int]] | None = None,
                 **kwargs):
        """origins: each record's (file, row), which rejects name."""
        check_overrides(type(self))  # a TRL release that changed an overridden private method fails here
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's warning: guarded by our tests
        self.records = records
        self.row_images = RowImages(records, origins)
        self.p_think_probe = PThinkProbe(probe_records or [])
        self.mode_weight = parse_mode_token_loss(args.mode_token_loss)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.task_rewards = build_rewards(args.rewards, tokenizer)  # what the mode decision compares
        self.guarded_rewards = list(self.task_rewards)
        if args.thinking_cost_per_token or args.thinking_cost_per_think:
            cost = make_thinking_cost(args.thinking_cost_per_token, args.thinking_cost_per_think)
            self.guarded_rewards.append(GuardedReward(cost, "thinking_cost"))
            if args.reward_weights is not None and len(args.reward_weights) == len(self.task_rewards):
                args.reward_weights = [*args.reward_weights, 1.0]  # the cost's size is in its own settings
        self._engine: TransformersEngine | None = None  # built on first use, on the training model
        self.loss_logps = LossLogps()  # the log-probs TRL's loss scores the policy with, for the decision terms
        self._forward_paths_logged: set[str] = set()
        with colocated_llm_settings(args):
            super().__init__(model=model, reward_funcs=self.guarded_rewards, args=args,
                             train_dataset=datasets.Dataset.from_dict({"row": list(range(len(records)))}),
                             processing_class=processor, rollout_func=self._rollout, **kwargs)
        expose_output_bias(self.model)
        if self.use_vllm:  # names, banned media tokens, CPU weight reload: see vllm_fit
            fit_vllm_generation(self.vllm_generation, self.accelerator.unwrap_model(self.model), processor)

    # ---- rollouts -----------------------------------------------------------------------------------
    def _example(self, row: int, images: list) -> dict:
        r = self.records[row]
        return {"prompt": r.messages(), "images": images, "answer": r.answer,
                "answer_type": r.answer_type, "choices": r.choices, "level": r.level, "family": r.family,
                "record_id": r.id, "row": row}

    @contextmanager
    def generation_engine(self, gather: bool = True):
        """The shared-prefix engine (bimode.generation.engine) on the current weights (gathered under ZeRO-3
        unless `gather` is False: with vLLM generating, the engine only renders and tokenizes), in eval mode;
        what rollouts and the probe generate with."""
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=gather and self.args.ds3_gather_for_generation
                                         ) as model:
            was_training = model.training
            if self._engine is None:
                self._engine = TransformersEngine(model, self.processing_class,
                                                  max_batch_rows=self.args.rollout_batch_rows)
            self._engine.model = model.eval()
            try:
                with torch.no_grad():
                    yield self._engine
            finally:
                model.train(was_training)

    def _rollout(self, prompts: list, trainer) -> dict:
        """TRL's rollout_func: gets each prompt's messages (images in their blocks) once per rollout, the local
        slice of the generation batch; returns TRL's fields and the RolloutBatch (rollouts.py)."""
        n = len(prompts)
        modes = rollout_modes(self.accelerator.process_index * n, n, self.num_generations, self.args.rollout)
        batch = group_prompts(prompts, modes)
        with self.generation_engine(gather=not self.use_vllm) as engine:
            suffix = engine.suffix_rest
            if self.use_vllm:
                prompt_ids = [engine.prompt_ids(p) for p in batch]
                completions = self._vllm_completions(engine, batch, prompt_ids)
            else:
                groups_out = engine.generate(batch, self.sampling_params())
                # the shared-prefix path returns the prompt ids it fed; the plain path renders per mode
                prompt_ids = [group[0].prompt_token_ids or engine.prompt_ids(p) for p, group in zip(batch, groups_out)]
                # a stopped rollout ends with the token that stopped it: training must see what was sampled
                completions = [[(list(suffix[c.mode]), c.token_ids, c.stop_token_id, None, c.thinking_tokens)
                                for c in group] for group in groups_out]
            decision = engine.decision
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        suffix_lengths, generated_lengths, thinking, taken = [], [], [], []
        for ids, group in zip(prompt_ids, completions):
            for forced, generated, stop, logprobs, thinking_tokens in group:
                ended = generated + ([stop] if stop is not None else [])
                out["prompt_ids"].append(ids)
                out["completion_ids"].append(forced + ended)
                out["logprobs"].append(None if logprobs is None else [float("nan")] * len(forced) + logprobs)
                suffix_lengths.append(len(forced))
                generated_lengths.append(len(generated))
                thinking.append(thinking_tokens)
                taken.append(response_mode(forced + generated, decision.think_ids, decision.no_think_ids))
        if any(lp is None for lp in out["logprobs"]):
            out["logprobs"] = None
        if self.args.rollout == "bimode":  # TRL leaves env_mask 0 out of the loss and of its token count
            env_mask = decision_env_mask(suffix_lengths, [len(ids) for ids in out["completion_ids"]],
                                         self.mode_weight, self.args.decision_loss == "decoupled")
            if env_mask is not None:
                out["env_mask"] = env_mask
        # columns for reward functions (the forced mode, the mode taken, its thinking tokens) and the batch
        out.update(RolloutBatch(modes, suffix_lengths, generated_lengths, thinking, taken).reward_columns())
        return out

    def sampling_params(self) -> SamplingParams:
        """The transformers engine's sampling for rollouts. An auto rollout's decision token is drawn from the
        full policy (not the engine's decision-restricted default), the distribution TRL scores it under:
        restricting it would make plain GRPO, the baseline, off-policy at exactly the token that matters."""
        return SamplingParams(max_new_tokens=self.args.max_completion_length, temperature=self.args.temperature,
                              top_p=self.args.top_p, top_k=self.args.top_k or 0, constrain_decision=False,
                              seed=self.args.seed + 100_003 * self.state.global_step + self.accelerator.process_index)

    def _vllm_completions(self, engine, batch, prompt_ids):
        """vLLM (colocate or server): the forced suffix joins the prompt for vLLM only, and is returned as the
        start of the completion with NaN sampling logprobs (TRL then leaves those tokens' IS ratio at 1)."""
        flat_prompts, flat_images, forced, modes = [], [], [], []
        image_id = getattr(self.processing_class, "image_token_id", None)
        if image_id is None and any(p.images for p in batch):
            raise UsageError("vLLM rollouts with images need the processor's image_token_id")
        for p, ids in zip(batch, prompt_ids):
            vllm_ids = collapse_image_runs(ids, image_id, len(p.images)) if p.images else ids
            for mode in p.modes:
                modes.append(mode)
                flat_prompts.append(vllm_ids + engine.suffix_rest[mode])
                flat_images.append(p.images or None)
                forced.append(list(engine.suffix_rest[mode]))
        images = flat_images if any(flat_images) else None
        _, completion_ids, logprobs, _ = self.vllm_generation.generate(prompts=flat_prompts, images=images,
                                                                       num_generations=1)
        rows = iter(zip(forced, completion_ids, logprobs, modes))
        close_id = engine.decision.think_close_id
        out = []
        for p in batch:
            group = []
            for f, c, lps, mode in (next(rows) for _ in p.modes):
                c, lps = list(c), [lp[0] for lp in lps]
                stop = c.pop() if c and c[-1] in engine.eos_ids else None  # vLLM keeps the stop token
                thinking = token_counts(engine.tokenizer, mode.prompt_suffix, c, close_id).thinking
                group.append((f, c, stop, lps, thinking))
            out.append(group)
        return out

    # ---- the training forward: one prompt pass per group -----------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, num_images=None, pixel_attention_mask=None,
                                           spatial_shapes=None, num_tiles=None, image_sizes=None,
                                           token_type_ids=None, mm_token_type_ids=None, image_position_ids=None):
        """TRL 1.16's method (same signature, same results), with each distinct prompt run once and its cache
        shared by the rows that repeat it (train/bpo/shared_forward.py). Used for the loss, the old
        log-probs and the reference model alike; TRL's own per-row forward where sharing does not apply."""
        kwargs = dict(batch_size=batch_size, compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss,
                      pixel_values=pixel_values, image_grid_thw=image_grid_thw, num_images=num_images,
                      pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes, num_tiles=num_tiles,
                      image_sizes=image_sizes, token_type_ids=token_type_ids, mm_token_type_ids=mm_token_type_ids,
                      image_position_ids=image_position_ids)
        reason, groups, level = "shared_prefix_forward is off", None, logging.INFO
        if self.args.shared_prefix_forward:
            image_args = {k: v for k, v in kwargs.items() if k not in ("batch_size", "compute_entropy",
                                                                         "compute_aux_loss")}
            reason = call_unsupported(model, input_ids, logits_to_keep, compute_aux_loss, **image_args)
            level = logging.WARNING  # asked for and not possible: say why
            if reason is None:
                groups = find_prefix_groups(input_ids, attention_mask, logits_to_keep,
                                            **{k: image_args[k] for k in HANDLED_IMAGE_ARGS})
                if not groups.shared:  # nothing to share (a batch of one rollout per prompt): same numbers
                    reason, level = "no two rows share a prompt", logging.INFO
        mode = "train" if self.model.training else "eval"
        if reason is not None:
            self._log_forward_path(f"TRL's per-row forward ({reason})", level)
            log_metric(self, "shared_prefix/rows_per_prompt_pass", 1.0, mode)
            scored = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                **kwargs)
            self.loss_logps.saw(scored[0])
            return scored
        self._log_forward_path("shared-prefix forward")
        # logged, so the path taken shows where logs go (1: TRL's per-row forward)
        log_metric(self, "shared_prefix/rows_per_prompt_pass", input_ids.size(0) / len(groups.representatives), mode)
        with self.accelerator.autocast():
            logps, entropies = grouped_completion_logps(
                model, input_ids, attention_mask, logits_to_keep, {k: kwargs[k] for k in HANDLED_IMAGE_ARGS},
                compute_entropy, batch_size=batch_size, fused_lm_head=True, groups=groups)
        self.loss_logps.saw(logps)
        return logps, entropies, None

    def _log_forward_path(self, path: str, level: int = logging.INFO) -> None:
        """Say once (per process) which forward scores the rollouts, and once more for each other reason."""
        if path not in self._forward_paths_logged:
            self._forward_paths_logged.add(path)
            log.log(level, "BPO scores rollouts with %s", path)

    # ---- the decision's own loss terms (train/bpo/decision.py) ----------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss, plus the decoupled decision loss and the decision target's cross-entropy where they are on,
        from the decision token's log-probs in the forward TRL's loss ran (no second forward)."""
        if DECISION_ADVANTAGES not in inputs and DECISION_TARGET_WEIGHTS not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.loss_logps.watching():
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + self._decision_terms(inputs, self.loss_logps.taken()[:, 0])

    def _decision_terms(self, inputs: dict, first_logps: torch.Tensor) -> torch.Tensor:
        """Each term's mean over this micro-batch's rollouts (those in the loss: a completion masked out, e.g. a
        truncated one under mask_truncated_completions, is out of these too), times its weight, divided as TRL
        divides its own loss for gradient accumulation; each logged before its weight."""
        mode = "train" if self.model.training else "eval"
        included = inputs["completion_mask"][:, 0]
        total = first_logps.new_zeros(())
        if DECISION_ADVANTAGES in inputs:
            old = inputs.get("old_per_token_logps")
            ref = inputs.get("ref_per_token_logps") if self.args.beta != 0.0 else None
            high = self.args.epsilon if self.args.epsilon_high is None else self.args.epsilon_high  # as TRL reads it
            term = decoupled_decision_loss(first_logps, first_logps.detach() if old is None else old[:, 0],
                                           inputs[DECISION_ADVANTAGES], included, self.args.epsilon, high,
                                           None if ref is None else ref[:, 0], self.args.beta)
            log_metric(self, "bpo/decision_loss", self.accelerator.gather(term.detach()).mean().item(), mode)
            total = total + self.args.decision_weight * term
        if DECISION_TARGET_WEIGHTS in inputs:
            term = decision_cross_entropy(first_logps, inputs[DECISION_TARGET_WEIGHTS], included)
            log_metric(self, "bpo/decision_target/cross_entropy", self.accelerator.gather(term.detach()).mean().item(),
                       mode)
            total = total + self.args.decision_target_weight * term
        return total / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)

    # ---- scoring, loss weights, logging ---------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output, _ = self.generate_and_score([x["row"] for x in inputs])
        return output

    def generate_and_score(self, rows: list[int]) -> tuple[dict, RolloutBatch]:
        """One generation step on this process's slice of the batch: `rows` are record indices, each repeated
        once per rollout as TRL's sampler lays them out. Returns TRL's batch for the loss (the forced mode
        tokens' advantages weighted by `mode_token_loss` and the mode objective) and the step's RolloutBatch
        (modes, forced-suffix lengths, lengths, rewards)."""
        # each record comes once per rollout: read its images once (a row that fails gives its place to the next
        # row that decodes, the same on every process: a group split over processes stays one prompt)
        loaded = {row: self.row_images.load(row) for row in dict.fromkeys(rows)}
        self.note_bad_rows([bad for _, _, failed in loaded.values() for bad in failed])
        inputs = [self._example(*loaded[row][:2]) for row in rows]
        output = super()._generate_and_score_completions(inputs)
        rollouts: RolloutBatch = rollout_extra_field(inputs, ROLLOUT_FIELD)
        advantages = output["advantages"].clone()  # each rollout's A, before any per-token weighting
        if self.args.rollout == "bimode":  # the algorithm is core.py's and decision.py's; here, TRL's fields
            rewards, thinks, local = self._gathered_task_rewards(rollouts)
            forced = self._mode_decision(rewards, thinks, local)
            output["advantages"] = mode_token_loss(output["advantages"], output["completion_mask"],
                                                   rollouts.suffix_lengths, self.mode_weight, forced)
            if self.args.decision_loss == "decoupled":  # the decision token's own term reads these (compute_loss)
                output[DECISION_ADVANTAGES] = (advantages if forced is None else forced).to(advantages.device)
            if self.args.decision_target != "off":
                output[DECISION_TARGET_WEIGHTS] = self._decision_targets(rewards, thinks, local).to(advantages.device)
        self._log_modes(rollouts, advantages)
        self.p_think_probe.maybe_run(self)
        return output, rollouts

    def _gathered_task_rewards(self, rollouts: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """The task rewards (the thinking cost left out) and whether each rollout was forced to think, gathered over
        processes, since a group of 2g may be split across them; and this process's slice of them."""
        device = self.accelerator.device
        local = weighted_rewards(rollouts.rewards_of([func.__name__ for func in self.task_rewards]),
                                 self.reward_weights[:len(self.task_rewards)].tolist())
        thinks = torch.tensor([m == ThinkingMode.THINK for m in rollouts.modes], dtype=torch.float32)
        rewards, thinks = (self.accelerator.gather(t.to(device)).cpu() for t in (local, thinks))
        start = self.accelerator.process_index * len(local)
        return rewards, thinks.bool(), slice(start, start + len(local))

    def _decision_targets(self, rewards: torch.Tensor, thinks: torch.Tensor, local: slice) -> torch.Tensor:
        """This process's rollouts' weights in the decision cross-entropy (decision.decision_target_weights); logs
        the mean target (the share of queries the target sends to thinking)."""
        weights, y = decision_target_weights(rewards, thinks, self.num_generations, self.args.decision_target,
                                             self.args.direct_margin, self.args.decision_target_temperature)
        known = y[~torch.isnan(y)]
        log_metric(self, "bpo/decision_target/think", known.mean().item() if len(known) else float("nan"))
        return weights[local]

    def _mode_decision(self, rewards: torch.Tensor, thinks: torch.Tensor, local: slice) -> torch.Tensor | None:
        """The mode objective's advantage for this process's forced mode tokens (None: the rollouts' own A),
        from the gathered task rewards; logs the share of queries whose direct answer wins and the decision
        advantage."""
        margin = self.args.direct_margin
        stats = decision_advantages(rewards, thinks.bool(), self.num_generations, margin)
        log_metric(self, "bpo/direct_wins", stats.direct_wins.float().mean().item())
        log_metric(self, "bpo/direct_decision_advantage",
                   stats.forced_advantages[~thinks.bool()].mean().item())
        signal = MODE_OBJECTIVES[self.args.mode_objective](rewards, thinks.bool(), self.num_generations, margin,
                                                           self.args.decision_scale)
        if signal is None:
            return None
        return signal.forced_advantages[local]

    def _log_modes(self, rollouts: RolloutBatch, advantages: torch.Tensor) -> None:
        """Per taken mode: reward (as TRL sums it, unscorable rollouts left out), advantage A and generated
        length (forced suffix and end token not counted), gathered over processes."""
        rewards = weighted_rewards(rollouts.rewards_of([func.__name__ for func in self.guarded_rewards]),
                                   self.reward_weights.tolist())
        lengths = torch.tensor(rollouts.generated_lengths)
        thinking = torch.tensor(rollouts.thinking_tokens)
        device = self.accelerator.device
        codes = torch.tensor([MODE_CODES[m] for m in rollouts.taken], device=device)
        gathered = [self.accelerator.gather(t.to(device).float())
                    for t in (codes, rewards, advantages, lengths, thinking)]
        names = {v: k for k, v in MODE_CODES.items()}
        modes = [names[int(c)] for c in gathered[0].tolist()]
        for key, value in per_mode_stats(modes, *[t.cpu() for t in gathered[1:]]).items():
            log_metric(self, f"bpo/{key}", value)

    def probe(self) -> dict[str, float]:
        """The p_think probe now (train/bpo/probe.py): per level, p_think, thinking rate and decision mass."""
        return self.p_think_probe.run(self)


def build_trainer(cfg: BPOConfig, model=None, processor=None, model_args=None) -> BPOTrainer:
    """model_args: TRL's ModelConfig (use_peft, lora_r, ...; None: full fine-tuning of cfg.model_path)."""
    model, processor, read = load_start(cfg, model, processor, "record files with prompts and answers",
                                        model_args=model_args)
    rows = checked_rows(cfg, read, text=prompt_text_limit(cfg, model, processor),
                        row_error=lambda r: None if r.answer else ("answer", "no answer to reward"))
    records = [row.record for row in rows]
    probe_source = [r for path in cfg.probe_files for r in read_records(path)] if cfg.probe_files else records
    frozen = cfg.frozen()
    tokenizer = getattr(processor, "tokenizer", processor)
    peft_config = build_peft_config(model_args, model, tokenizer, cfg, frozen) if model_args is not None else None
    grown = added_rows(model)
    if cfg.use_vllm and grown:  # vLLM builds its engine from the checkpoint on disk, which lacks these rows
        raise UsageError(f"use_vllm: {cfg.model_path} gained {len(grown)} token rows when loaded (the think tags "
                         "its tokenizer lacked), and vLLM loads the checkpoint as saved: start BPO from a checkpoint "
                         "that has them (what `bimode anneal` saves), or drop use_vllm")
    if cfg.beta != 0 and peft_config is None and grown:  # TRL loads the reference model from disk too
        raise UsageError(f"beta {cfg.beta}: {cfg.model_path} gained {len(grown)} token rows when loaded (the think "
                         "tags its tokenizer lacked), and TRL loads the reference model from the checkpoint as "
                         "saved, without them: start BPO from a checkpoint that has them (what `bimode anneal` "
                         "saves), or train LoRA (the reference is the base under the adapter), or set beta 0")
    if peft_config is None:
        freeze(model, frozen)
    cfg.remove_unused_columns = False
    return BPOTrainer(model=model, args=cfg, records=records, processor=processor,
                      probe_records=pick_probe(probe_source, cfg.probe_size, cfg.seed), peft_config=peft_config,
                      origins=[(row.file, row.row) for row in rows])


def prompt_text_limit(cfg: BPOConfig, model, processor) -> TextLimit | None:
    """A prompt's own text (system prompt and question; template and image tokens not counted, so a prompt refused
    is surely too long) must leave max_completion_length within the model's positions. None where the model
    names no position limit."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not positions or positions <= (cfg.max_completion_length or 0):
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = positions - (cfg.max_completion_length or 0)
    return TextLimit(lambda r: (own_text(r.messages()), "question"), token_counter(tokenizer), limit,
                     f"{limit:,} (the model's {positions:,} positions less max_completion_length "
                     f"{cfg.max_completion_length})")


def run_bpo(cfg: BPOConfig) -> Path:
    return train_and_save(build_trainer(cfg), cfg.resume_from_checkpoint)


__all__ = ["BPOConfig", "BPOTrainer", "build_trainer", "pick_probe", "run_bpo"]
