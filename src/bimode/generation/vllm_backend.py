"""vLLM as a generation backend (optional extra `bimode[vllm]`, for GPUs).

Same interface as the transformers engine. vLLM's automatic prefix caching gives the shared-prefix
behaviour: the g think and g no_think samples of a prompt reuse its cached prefill. Thinking mode is passed
through `chat_template_kwargs`, as vLLM's server takes it. Not available here: the thinking budget and
think_threshold (both need control between tokens), and token ids of forced suffixes.
"""

from __future__ import annotations

from bimode.generation.openai_backend import to_openai_messages
from bimode.generation.types import Completion, Prompt, SamplingParams, completion_from_ids
from bimode.modes import MODE_SUFFIXES, R4B_NAMES, THINK_CLOSE, ThinkingMode


class VLLMBackend:
    def __init__(self, model_path: str, **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ImportError("the vLLM backend needs `pip install bimode[vllm]` on a machine with a GPU") from exc
        llm_kwargs.setdefault("enable_prefix_caching", True)
        self.llm = LLM(model=model_path, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.close_id = self.tokenizer.convert_tokens_to_ids(THINK_CLOSE)

    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams(),
                 progress: bool = False) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSampling

        if params.max_thinking_tokens is not None or params.think_threshold is not None:
            raise NotImplementedError("thinking budget and think_threshold need the transformers engine")
        jobs = [(pi, mode, p.modes.count(mode)) for pi, p in enumerate(prompts) for mode in dict.fromkeys(p.modes)]
        results: list[list[Completion]] = [[] for _ in prompts]
        by_key = {}
        for pi, mode, n in jobs:  # one chat call per mode: chat_template_kwargs apply to the whole call
            sampling = VLLMSampling(n=n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_p=params.top_p, top_k=params.top_k or -1, seed=params.seed,
                                    logprobs=0 if params.logprobs else None)
            messages = to_openai_messages(prompts[pi].messages, prompts[pi].images)
            output = self.llm.chat([messages], sampling, chat_template_kwargs={"thinking_mode": R4B_NAMES[mode]},
                                   use_tqdm=progress)[0]
            by_key[(pi, mode)] = [self._completion(mode, o) for o in output.outputs]
        for pi, prompt in enumerate(prompts):
            for mode in prompt.modes:
                results[pi].append(by_key[(pi, mode)].pop(0))
        return results

    def _completion(self, mode: ThinkingMode, output) -> Completion:
        ids = list(output.token_ids)
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        logprobs = None
        if output.logprobs:
            logprobs = [step[token].logprob for step, token in zip(output.logprobs, ids)]
        finish = "length" if output.finish_reason == "length" else "stop"
        return completion_from_ids(self.tokenizer, mode, MODE_SUFFIXES[mode], ids, finish, self.close_id,
                                   logprobs=logprobs)
