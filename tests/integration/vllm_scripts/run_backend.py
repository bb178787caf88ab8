"""Runs in .venv-vllm (tests/integration/test_vllm_backend.py starts it): one VLLMBackend, every run of a JSON spec.

    python run_backend.py SPEC.json OUT.json

SPEC: {"model": DIR, "llm": {LLM kwargs}, "prompts": [{"messages", "images": [PNG paths], "modes"}],
       "runs": {NAME: {"params": {SamplingParams fields}, "prompts": [indices] | null, "seeded": bool}},
       "media_probe": {"prompts": [indices], "n", "max_tokens", "temperature", "bias"} | null}
OUT: {"startup_s", "runs": {NAME: [[completion fields]]}, "decision_stats": [[p_think, mass]],
      "rendered": {mode: prompt 0's text}, "replay": {"streamed", "token_ids": {"pi,si": ids}},
      "media_probe": {"banned_ids", "with_ban" | "without_ban" | "natural": {"tokens", "media"}}}
"""

import json
import os
import sys
import time


def completion_dict(c) -> dict:
    return {"mode": c.mode.value, "prompt_suffix": c.prompt_suffix, "token_ids": c.token_ids, "text": c.text,
            "finish_reason": c.finish_reason, "thinking_tokens": c.thinking_tokens, "answer_tokens": c.answer_tokens,
            "p_think": c.p_think, "logprobs": c.logprobs, "prompt_token_ids": c.prompt_token_ids,
            "stop_token_id": c.stop_token_id}


def main(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from PIL import Image

    from bimode.generation.openai_backend import to_openai_messages
    from bimode.generation.types import Prompt, SamplingParams
    from bimode.generation.vllm_backend import VLLMBackend
    from bimode.generation.vllm_controls import control_token_ids

    with open(spec_path) as f:
        spec = json.load(f)
    prompts = [Prompt(messages=p["messages"], images=[Image.open(i).convert("RGB") for i in p["images"]],
                      modes=p["modes"]) for p in spec["prompts"]]
    start = time.time()
    backend = VLLMBackend(spec["model"], **spec["llm"])
    from bimode.generation.defaults import default_max_new_tokens

    out = {"startup_s": time.time() - start, "runs": {}, "run_s": {},
           "default_max_new_tokens": default_max_new_tokens(backend)}
    for name, run in spec["runs"].items():
        chosen = prompts if run.get("prompts") is None else [prompts[i] for i in run["prompts"]]
        if run.get("seeded"):  # each prompt with its own seed (1000 + its index), as curation sends them
            import dataclasses

            indices = range(len(prompts)) if run.get("prompts") is None else run["prompts"]
            chosen = [dataclasses.replace(p, seed=1000 + i) for i, p in zip(indices, chosen)]
        start = time.time()
        results = backend.generate(chosen, SamplingParams(**run["params"]))
        out["run_s"][name] = time.time() - start
        out["runs"][name] = [[completion_dict(c) for c in group] for group in results]
    out["decision_stats"] = backend.decision_stats(prompts)
    from bimode.modes import ThinkingMode

    out["rendered"] = {m.value: backend.render(prompts[0], m) for m in ThinkingMode}
    streamed = {}  # on_token: the same tokens as the completions, handed over once each is finished
    replayed = backend.generate(prompts[:2], SamplingParams(max_new_tokens=8),
                                on_token=lambda pi, si, t, _logprob: streamed.setdefault(f"{pi},{si}", []).append(t))
    out["replay"] = {"streamed": streamed,
                     "token_ids": {f"{pi},{si}": c.token_ids for pi, g in enumerate(replayed) for si, c in enumerate(g)}}

    probe = spec.get("media_probe")
    if probe:  # samples with bimode's media ban on and off (vllm_controls, extra_args)
        from vllm import SamplingParams as VLLMSampling

        banned, _, _ = control_token_ids(backend.tokenizer, backend.llm.llm_engine.model_config.hf_config)
        conversations = [to_openai_messages(prompts[i].messages, prompts[i].images) for i in probe["prompts"]]
        out["media_probe"] = {"banned_ids": banned}
        cases = {  # a logit bias toward the placeholders makes "would it be sampled" certain, not rare
            "with_ban": {"bimode_ban_media": True, "bias": probe["bias"]},
            "without_ban": {"bimode_ban_media": False, "bias": probe["bias"]},
            "natural": {"bimode_ban_media": False, "bias": 0.0},  # the model's own rate, reported only
        }
        for key, case in cases.items():
            bias = {token: case["bias"] for token in banned} if case["bias"] else None
            sampling = VLLMSampling(n=probe["n"], max_tokens=probe["max_tokens"], temperature=probe["temperature"],
                                    seed=0, logit_bias=bias, ignore_eos=True,
                                    extra_args={"bimode_ban_media": case["bimode_ban_media"]})
            outputs = backend.llm.chat(conversations, sampling, use_tqdm=False,
                                       chat_template_kwargs={"thinking_mode": "long"})
            tokens = [t for o in outputs for s in o.outputs for t in s.token_ids]
            out["media_probe"][key] = {"tokens": len(tokens), "media": sum(t in banned for t in tokens)}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM starts its workers by spawn
    main(*sys.argv[1:])
