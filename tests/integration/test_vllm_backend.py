"""The vLLM backend against the transformers engine, on CPU, on the trained tiny model (LLaVA) and on tiny
Qwen2.5-VL and Qwen3-VL checkpoints (multi-axis positions, images of several token counts).

vLLM is installed in vLLM's environment (`make setup-vllm`, .venv-vllm), not the main one: one script there (tests/integration/vllm_scripts/
run_backend.py) starts one engine per family and runs every case of a JSON spec; this module
computes the transformers engine's side here and compares. Skipped only while .venv-vllm is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.vllm_helpers import BACKEND_FAMILIES, family_checkpoint, needs_vllm, run_vllm_script

pytestmark = needs_vllm

# the engine settings that run on a 2-core CPU machine (docs/vllm.md)
CPU_LLM = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "limit_mm_per_prompt": {"image": 1},
           "seed": 0}
LOGPROB_TOL = 2e-3
# per family: (eval prompts, each again with another's image; max_new_tokens). The Qwen-VL models are untrained:
# fewer, shorter completions check the same paths
SIZES = {"tiny_llava": (6, 40), "qwen25_vl": (3, 12), "qwen3_vl": (3, 12)}


def prompt_specs(tmp: Path, n: int):
    """Eval-split prompts of the trained families with their images, and each again with another prompt's
    image (the same text: if images reach the model, answers and log-probs change)."""
    from bimode.data import synthetic
    from bimode.generation.types import Prompt

    records = [s.to_record() for s in synthetic.generate(n, seed=3, split="eval", families=["count", "shell"],
                                                         max_level=3)]
    prompts = [Prompt.from_record(r, ["auto", "think", "no_think"]) for r in records]
    swapped = [Prompt(messages=p.messages, images=prompts[(i + 1) % len(prompts)].images, modes=p.modes)
               for i, p in enumerate(prompts)]
    prompts += swapped
    specs = []
    for i, p in enumerate(prompts):
        paths = []
        for j, image in enumerate(p.images):
            paths.append(str(tmp / f"p{i}_{j}.png"))
            image.save(paths[-1])
        specs.append({"messages": p.messages, "images": paths, "modes": [m.value for m in p.modes]})
    return prompts, specs


def threshold_between(values: list[float]) -> float:
    """A threshold in the widest gap between the prompts' p_think values: both modes get prompts, and no
    prompt sits near it (the two backends' p_think differ in the last digits)."""
    ordered = sorted(values)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(ordered, ordered[1:])]
    return max(gaps)[1]


def greedy_runs(max_new: int) -> dict:
    """name -> (SamplingParams fields, which prompts: None = all)."""
    return {
        "greedy": ({"max_new_tokens": max_new, "logprobs": True}, None),
        "budget_0": ({"max_new_tokens": max_new, "max_thinking_tokens": 0}, [0, 1, 2, 3]),
        "budget_2": ({"max_new_tokens": max_new, "max_thinking_tokens": 2, "logprobs": True}, [0, 1, 2, 3]),
        # forced closing text does not count toward max_new_tokens: 6 sampled tokens, then cut
        "budget_1_short": ({"max_new_tokens": 6, "max_thinking_tokens": 1}, [0, 1, 2, 3]),
        "short": ({"max_new_tokens": 3}, [0, 1, 2, 3]),
        "unconstrained": ({"max_new_tokens": max_new, "constrain_decision": False}, [0, 1, 2, 3]),
    }


SEEDED = {  # sampled, each prompt with its own seed: alone, among others, or in another order, the same samples
    "seeded_all": ({"max_new_tokens": 12, "temperature": 1.0}, [0, 1, 2, 3, 4, 5]),
    "seeded_some": ({"max_new_tokens": 12, "temperature": 1.0}, [4, 1]),
}


@pytest.fixture(scope="module", params=BACKEND_FAMILIES)
def compared(request, trained_tiny, tmp_path_factory):
    model_dir = family_checkpoint(request.param, trained_tiny, tmp_path_factory)
    return {**compare_backends(model_dir, tmp_path_factory.mktemp(f"vllm_backend_{request.param}"),
                               *SIZES[request.param]), "family": request.param}


def compare_backends(model_dir: Path, tmp: Path, n_prompts: int, max_new: int) -> dict:
    """Both backends on every run: {"vllm": the script's answer, "hf": {run: completions}, ...}."""
    import torch

    from bimode.generation.engine import TransformersEngine
    from bimode.generation.types import SamplingParams
    from bimode.models import load_model

    prompts, specs = prompt_specs(tmp, n_prompts)
    model, processor = load_model(model_dir, dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    stats = engine.decision_stats(prompts)
    runs = greedy_runs(max_new)
    runs["threshold"] = ({"max_new_tokens": max_new, "think_threshold": threshold_between([p for p, _ in stats])},
                         None)
    hf = {}
    for name, (params, chosen) in runs.items():
        subset = prompts if chosen is None else [prompts[i] for i in chosen]
        hf[name] = engine.generate(subset, SamplingParams(**params))
    seeded = {name: {"params": params, "prompts": chosen, "seeded": True} for name, (params, chosen) in SEEDED.items()}
    spec = {"model": str(model_dir), "llm": CPU_LLM, "prompts": specs,
            "runs": {**{name: {"params": params, "prompts": chosen} for name, (params, chosen) in runs.items()},
                     **seeded},
            "media_probe": {"prompts": [0, 1], "n": 8, "max_tokens": 64, "temperature": 1.0, "bias": 30.0}}
    start = time.time()
    out = run_vllm_script("run_backend.py", spec, tmp)
    out["wall_s"] = time.time() - start
    print(f"vLLM script: {out['wall_s']:.0f} s, engine start-up {out['startup_s']:.0f} s, runs {out['run_s']}")
    return {"vllm": out, "hf": hf, "hf_stats": stats, "prompts": prompts, "engine": engine, "runs": runs,
            "model_dir": model_dir}


def assert_same(hf_group, vllm_group, logprobs=False):
    for h, v in zip(hf_group, vllm_group, strict=True):
        where = f"mode {h.mode.value}: engine {h.response!r}, vLLM {v['prompt_suffix'] + v['text']!r}"
        assert v["token_ids"] == h.token_ids, where
        assert (v["prompt_suffix"], v["text"], v["mode"]) == (h.prompt_suffix, h.text, h.mode.value), where
        assert v["finish_reason"] == h.finish_reason, where
        assert (v["thinking_tokens"], v["answer_tokens"]) == (h.thinking_tokens, h.answer_tokens), where
        assert v["stop_token_id"] == h.stop_token_id, where
        if logprobs:
            assert len(v["logprobs"]) == len(h.logprobs), where
            assert max(abs(a - b) for a, b in zip(v["logprobs"], h.logprobs)) < LOGPROB_TOL, where


def run_pairs(compared, name):
    chosen = compared["runs"][name][1]
    hf = compared["hf"][name]
    got = compared["vllm"]["runs"][name]
    assert len(got) == len(hf) == (len(compared["prompts"]) if chosen is None else len(chosen))
    return zip(hf, got)


def test_greedy_matches_the_transformers_engine_in_every_mode(compared):
    for hf_group, vllm_group in run_pairs(compared, "greedy"):
        assert_same(hf_group, vllm_group, logprobs=True)
        # the three modes as the template renders them, and a response that parses in each
        assert [v["prompt_suffix"] for v in vllm_group] == ["<think>", "<think>\n", "<think>\n\n</think>\n\n"]
        decision = compared["engine"].decision  # auto mode: the first token is the mode decision
        assert vllm_group[0]["token_ids"][0] in decision.think_ids | decision.no_think_ids


def test_images_reach_the_model(compared):
    """The same question with another image: vLLM's answers follow the image as the engine's do."""
    n = len(compared["prompts"]) // 2
    got = compared["vllm"]["runs"]["greedy"]
    changed = sum(got[i][m]["logprobs"] != got[i + n][m]["logprobs"] for i in range(n) for m in range(3))
    assert changed == 3 * n
    texts_changed = sum(got[i][m]["text"] != got[i + n][m]["text"] for i in range(n) for m in range(3))
    assert texts_changed >= 1
    # the prompt the completion continues, image placeholders expanded, as the engine feeds it
    for i, prompt in enumerate(compared["prompts"]):
        assert got[i][0]["prompt_token_ids"] == compared["engine"].prompt_ids(prompt)


def test_p_think_and_threshold(compared):
    for (p, mass), (vp, vmass) in zip(compared["hf_stats"], compared["vllm"]["decision_stats"], strict=True):
        assert abs(p - vp) < 1e-3 and abs(mass - vmass) < 1e-3
    threshold = compared["hf"]["threshold"]
    forced = [g[0].prompt_suffix for g in threshold]
    assert {"<think>\n", "<think>\n\n</think>\n\n"} == set(forced)  # the threshold picked both modes
    for hf_group, vllm_group in run_pairs(compared, "threshold"):
        assert_same(hf_group, vllm_group)
        assert vllm_group[0]["mode"] == "auto" and vllm_group[0]["p_think"] == pytest.approx(
            hf_group[0].p_think, abs=1e-3)


@pytest.mark.parametrize("name", ["budget_0", "budget_2", "budget_1_short"])
def test_thinking_budget_matches_the_engine(compared, name):
    from bimode.generation.types import BUDGET_CLOSING

    hit = 0
    for hf_group, vllm_group in run_pairs(compared, name):
        assert_same(hf_group, vllm_group, logprobs=compared["runs"][name][0].get("logprobs", False))
        for h in hf_group:
            budget = compared["runs"][name][0]["max_thinking_tokens"]
            if h.mode.value != "no_think":
                assert h.thinking_tokens <= budget
            hit += BUDGET_CLOSING.strip() in h.text
    assert hit  # the budget did cut some thinking short


@pytest.mark.parametrize("name", ["short", "unconstrained"])
def test_length_and_unconstrained_decision_match(compared, name):
    for hf_group, vllm_group in run_pairs(compared, name):
        assert_same(hf_group, vllm_group)


def test_media_placeholders_are_never_sampled(compared):
    """vLLM itself samples image placeholders (an untrained or hot model does; a logit bias toward them makes it
    certain here); bimode's logits processor bans them, as the transformers engine does."""
    probe = compared["vllm"]["media_probe"]
    print("media placeholders sampled:", probe)
    assert probe["banned_ids"] == compared["engine"].banned_ids
    assert probe["without_ban"]["media"] > probe["without_ban"]["tokens"] // 10, probe
    assert probe["with_ban"]["media"] == 0 and probe["with_ban"]["tokens"] == probe["without_ban"]["tokens"]


def test_the_checkpoint_s_generation_limit_is_the_default(compared):
    """eval and curation default to the model's own max_new_tokens (generation/defaults.py), through vLLM too;
    the Qwen-VL checkpoints set none: the paper's limit."""
    from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS, default_max_new_tokens

    expected = 256 if compared["family"] == "tiny_llava" else PAPER_MAX_NEW_TOKENS
    assert compared["vllm"]["default_max_new_tokens"] == default_max_new_tokens(compared["engine"]) == expected


def test_render_and_on_token_follow_the_generation_interface(compared):
    """VLLMBackend renders prompts as the engine does and hands each completion's tokens to on_token."""
    from bimode.modes import ThinkingMode

    for mode in ThinkingMode:
        assert compared["vllm"]["rendered"][mode.value] == compared["engine"].render(compared["prompts"][0], mode)
    replay = compared["vllm"]["replay"]
    assert replay["streamed"] == replay["token_ids"] and len(replay["token_ids"]) == 2 * 3


def test_prompts_with_their_own_seeds_sample_the_same_in_any_batch(compared):
    """Curation's per-query seeds on vLLM: a prompt's samples do not depend on the prompts beside it."""
    runs = compared["vllm"]["runs"]
    ids = lambda group: [c["token_ids"] for c in group]  # noqa: E731
    everything, some = runs["seeded_all"], runs["seeded_some"]
    assert [ids(g) for g in some] == [ids(everything[4]), ids(everything[1])]
