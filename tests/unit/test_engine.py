"""The shared-prefix engine against plain `generate`, modes, budget, p_think and threshold."""

import pytest
import torch

from bimode.data import synthetic
from bimode.generation.engine import TransformersEngine
from tests.helpers.reference_generation import generate
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from bimode.modes import ThinkingMode
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)


@pytest.fixture(scope="module")
def setup(trained_tiny):
    model, processor = load_model(trained_tiny, dtype=torch.float32)
    records = [s.to_record() for s in synthetic.generate(24, seed=8, split="eval", families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    return model, processor, TransformersEngine(model, processor, max_batch_rows=16), records


@pytest.mark.parametrize("mode", ["think", "no_think", "auto"])
def test_shared_prefix_greedy_equals_plain_generate(setup, mode):
    model, processor, engine, records = setup
    plain = generate(model, processor, records, mode=mode, max_new_tokens=24)
    shared = engine.generate([Prompt.from_record(r, [mode]) for r in records],
                             SamplingParams(max_new_tokens=24, constrain_decision=False))  # as model.generate
    assert [p.token_ids for p in plain] == [s[0].token_ids for s in shared]
    assert [p.response for p in plain] == [s[0].response for s in shared]


def test_bimode_group_equals_separate_runs(setup):
    """g think + g no_think from one prefill give what each forced mode gives alone (greedy)."""
    _, _, engine, records = setup
    groups = engine.generate([Prompt.bimode_group(r, 2) for r in records[:6]], SamplingParams(max_new_tokens=24))
    for mode, index in (("think", 0), ("no_think", 2)):
        alone = engine.generate([Prompt.from_record(r, [mode]) for r in records[:6]], SamplingParams(max_new_tokens=24))
        assert [g[index].token_ids for g in groups] == [a[0].token_ids for a in alone]
        assert [g[index + 1].token_ids for g in groups] == [a[0].token_ids for a in alone]


def test_completions_carry_the_prompt_ids_the_engine_fed(setup):
    """Left-padded prefill of prompts of different lengths: each completion returns its own prompt, unpadded."""
    _, _, engine, records = setup
    prompts = [Prompt.bimode_group(r, 1) for r in records[:8]]
    assert len({len(engine.prompt_ids(p)) for p in prompts}) > 1  # padding is exercised
    for p, group in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=4))):
        assert [c.prompt_token_ids for c in group] == [engine.prompt_ids(p)] * 2


def test_forced_modes_start_as_they_must_and_counts_add_up(setup):
    _, _, engine, records = setup
    out = engine.generate([Prompt.bimode_group(r, 2) for r in records[:8]],
                          SamplingParams(max_new_tokens=32, temperature=1.0, seed=3, logprobs=True))
    for group in out:
        assert [c.mode for c in group] == [ThinkingMode.THINK] * 2 + [ThinkingMode.NO_THINK] * 2
        for c in group[:2]:
            assert c.response.startswith("<think>\n") and not c.response.startswith("<think>\n\n")
            assert c.thinking_tokens >= 1 and c.finish_reason in ("stop", "length")
        for c in group[2:]:
            assert c.response.startswith("<think>\n\n</think>\n\n") and c.thinking_tokens == 0
        for c in group:
            assert c.thinking_tokens + c.answer_tokens == c.num_tokens
            assert len(c.logprobs) == c.num_tokens and all(lp <= 0 for lp in c.logprobs)


def test_sampling_is_reproducible_by_seed(setup):
    _, _, engine, records = setup
    prompts = [Prompt.from_record(r, ["think"] * 3) for r in records[:4]]
    a = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.5, seed=1))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.5, seed=1))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.5, seed=2))
    ids = lambda out: [[s.token_ids for s in g] for g in out]
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_prompts_with_their_own_seeds_sample_the_same_in_any_batch(setup):
    """A prompt's own seed decides its samples: alone, or among other prompts in another order, the same tokens."""
    _, _, engine, records = setup
    params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=99)  # the batch seed is not used
    prompts = [Prompt.from_record(r, ["think", "no_think", "auto"], seed=100 + i) for i, r in enumerate(records[:5])]
    ids = lambda out: [[s.token_ids for s in g] for g in out]
    together = ids(engine.generate(prompts, params))
    alone = [ids(engine.generate([p], params))[0] for p in prompts]
    reordered = ids(engine.generate(prompts[::-1], SamplingParams(max_new_tokens=16, temperature=1.5, seed=5)))[::-1]
    assert together == alone == reordered
    assert len({tuple(map(tuple, g)) for g in together}) == len(prompts)  # different seeds, different samples
    reseeded = Prompt.from_record(records[0], ["think", "no_think", "auto"], seed=7)
    assert ids(engine.generate([reseeded], params))[0] != together[0]
    with pytest.raises(ValueError, match="every prompt"):
        engine.generate([prompts[0], Prompt.from_record(records[1])], params)


def test_the_plain_path_samples_a_seeded_prompt_the_same_in_any_batch(tmp_path):
    """Multi-axis models bimode has not tested generate through `model.generate` (here Qwen2.5-VL, put on that
    path by hand): seeded prompts go one at a time."""
    from tests.helpers.hf_fixtures import build_tiny_qwen25_vl

    model, processor = load_model(build_tiny_qwen25_vl(tmp_path / "qwen"), dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    engine.shared_prefix = False
    texts = ["What is two plus two?", "Name a colour.", "Count to three."]
    prompts = [Prompt(messages=[{"role": "user", "content": t}], modes=["think", "think"], seed=i)
               for i, t in enumerate(texts)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, constrain_decision=False)
    ids = lambda out: [[s.token_ids for s in g] for g in out]
    state = torch.get_rng_state()
    together = ids(engine.generate(prompts, params))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    assert together == [ids(engine.generate([p], params))[0] for p in prompts]
    assert together[1] == ids(engine.generate(prompts[1:2] + prompts[:1], params))[0]
    assert all(a != b for a, b in together)  # a prompt's two samples differ: it samples
    reseeded = Prompt(messages=prompts[0].messages, modes=["think", "think"], seed=99)
    assert ids(engine.generate([reseeded], params))[0] != together[0]


@pytest.mark.parametrize("budget", [0, 2, 4])
def test_budget_ends_thinking_at_its_length_and_an_answer_follows(setup, budget):
    _, _, engine, records = setup
    params = SamplingParams(max_new_tokens=40, max_thinking_tokens=budget, budget_closing="")
    for group in engine.generate([Prompt.from_record(r, ["think"]) for r in records[:8]], params):
        c = group[0]
        natural_close = "</think>" in c.text and c.finish_reason == "stop"
        if c.finish_reason == "budget":
            reasoning_ids = c.token_ids[: c.token_ids.index(engine.decision.think_close_id)]
            assert len(reasoning_ids) == budget
            # closed, then generation goes on after the close: the answer's tokens are the model's own (a trained
            # tiny model of some machines opens a second <think> there, which parses as malformed)
            assert c.text.split("</think>", 1)[1].strip() and c.answer_tokens > 0
        else:
            assert natural_close and c.thinking_tokens - 1 <= budget  # it closed on its own in time


def test_budget_writes_the_closing_sentence(setup):
    _, _, engine, records = setup
    params = SamplingParams(max_new_tokens=8, max_thinking_tokens=1, budget_closing=" Time is up.\n")
    c = engine.generate([Prompt.from_record(records[0], ["think"])], params)[0][0]
    assert " Time is up.\n</think>\n\n" in c.text and c.finish_reason in ("budget", "length")
    assert c.thinking_tokens <= 1  # the model's own reasoning; the closing sentence is the engine's text


def test_p_think_and_thresholds(setup):
    _, _, engine, records = setup
    prompts = [Prompt.from_record(r) for r in records[:8]]
    p = engine.p_think(prompts)
    assert all(0.0 <= x <= 1.0 for x in p)
    # threshold 0: every auto sample thinks
    out = engine.generate(prompts, SamplingParams(max_new_tokens=24, think_threshold=0.0))
    for g in out:
        assert g[0].response.startswith("<think>\n") and not g[0].response.startswith("<think>\n\n")
    # threshold 1: thinks only where p_think is exactly 1; everywhere else the block is closed at once
    out = engine.generate(prompts, SamplingParams(max_new_tokens=24, think_threshold=1.0))
    for g, prob in zip(out, p):
        assert prob == 1.0 or g[0].response.startswith("<think>\n\n</think>\n\n")
    # generation reports the same p_think as the standalone forward pass
    assert [g[0].p_think for g in out] == pytest.approx(p, abs=1e-5)


def test_auto_mode_decision_is_always_a_decision_token(tiny_dir):
    # an untrained model's likeliest token after `<think>` is almost never a mode decision
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    records = [s.to_record() for s in synthetic.generate(16, seed=3, split="eval")]
    prompts = [Prompt.from_record(r) for r in records]
    decision = set(engine.think_ids) | set(engine.no_think_ids)
    for params in (SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=3, temperature=1.0, seed=1)):
        firsts = [g[0].token_ids[0] for g in engine.generate(prompts, params)]
        assert all(t in decision for t in firsts)
    free = [g[0].token_ids[0] for g in engine.generate(prompts, SamplingParams(max_new_tokens=3,
                                                                               constrain_decision=False))]
    assert not all(t in decision for t in free)  # the constraint is what made the difference
    stats = engine.decision_stats(prompts[:4])
    assert all(0 < mass < 0.5 and 0 <= p <= 1 for p, mass in stats)  # untrained: little mass on decisions
    assert [p for p, _ in stats] == pytest.approx(engine.p_think(prompts[:4]))


def test_should_stop_ends_one_prompt_s_samples_and_not_the_others(setup):
    """What a server uses when a client leaves: the stopped prompt's samples end at the next step, the batch's
    others run on to the same tokens they give alone (greedy)."""
    _, _, engine, records = setup
    prompts = [Prompt.from_record(r, ["think"]) for r in records[:3]]
    params = SamplingParams(max_new_tokens=24)
    steps = {"calls": 0}

    def should_stop(prompt_index: int) -> bool:
        steps["calls"] += prompt_index == 1
        return prompt_index == 1 and steps["calls"] > 3

    out = engine.generate(prompts, params, should_stop=should_stop)
    alone = engine.generate([prompts[0], prompts[2]], params)
    # asked once per step: 4 steps ran, the first feeding think mode's forced `\n` (prompt, not generated)
    assert out[1][0].finish_reason == "cancelled" and len(out[1][0].token_ids) == 3
    assert [out[0][0].token_ids, out[2][0].token_ids] == [alone[0][0].token_ids, alone[1][0].token_ids]


def test_top_logprobs_are_the_likeliest_tokens_and_stream_with_each_token(setup):
    _, _, engine, records = setup
    streamed = []
    (completion,), = engine.generate([Prompt.from_record(records[0], ["think"])],
                                     SamplingParams(max_new_tokens=12, logprobs=True, top_logprobs=4),
                                     on_token=lambda pi, si, token, info: streamed.append((token, info)))
    assert len(completion.logprobs) == len(completion.top_logprobs) == len(completion.token_ids)
    for token, logprob, top in zip(completion.token_ids, completion.logprobs, completion.top_logprobs):
        values = [v for _, v in top]
        assert len(top) == 4 and values == sorted(values, reverse=True)
        assert top[0] == (token, pytest.approx(logprob))  # greedy: the token taken is the likeliest
    assert [t for t, _ in streamed] == completion.token_ids
    assert [info.logprob for _, info in streamed] == completion.logprobs


def test_which_models_share_the_prompt_s_prefill(tmp_path, tiny_dir):
    """The engine asks models/positions.py, as packing and the shared-prefix forward do, but less: Gemma 3
    (sliding windows), which those refuse, still shares the prompt's prefill; Qwen2.5-VL's multi-axis positions
    share it too (fed from its get_rope_index), under a LoRA wrapper as well; a path that has not opted in to
    multi-axis positions refuses them."""
    from peft import LoraConfig, get_peft_model

    from bimode.models.positions import flat_positions_unsupported, multi_axis_positions
    from tests.helpers.hf_fixtures import build_tiny_gemma3, build_tiny_qwen25_vl

    tiny, tiny_processor = load_model(tiny_dir, dtype=torch.float32)
    gemma, gemma_processor = load_model(build_tiny_gemma3(tmp_path / "gemma"), dtype=torch.float32)
    qwen, qwen_processor = load_model(build_tiny_qwen25_vl(tmp_path / "qwen"), dtype=torch.float32)
    assert flat_positions_unsupported(tiny, "packing") is None and TransformersEngine(tiny, tiny_processor).shared_prefix
    assert flat_positions_unsupported(gemma, "packing") is not None and not multi_axis_positions(gemma)
    assert TransformersEngine(gemma, gemma_processor).shared_prefix
    assert flat_positions_unsupported(qwen, "packing") == "multi-axis rotary positions (get_rope_index)"
    assert flat_positions_unsupported(qwen, "packing", multi_axis=True) is None
    assert multi_axis_positions(qwen) and TransformersEngine(qwen, qwen_processor).shared_prefix
    wrapped = get_peft_model(qwen, LoraConfig(r=2, target_modules=["q_proj"]))
    assert multi_axis_positions(wrapped) and TransformersEngine(wrapped, qwen_processor).shared_prefix
