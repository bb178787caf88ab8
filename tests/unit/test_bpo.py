"""BPO: bi-mode rollouts on TRL's GRPOTrainer (mixed-group advantages, mode-token loss, rewards, 2 ranks)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.modes import ThinkingMode
from bimode.train.bpo.core import (ROLLOUT_LAYOUTS, forced_env_mask, mode_token_loss, mode_token_weights,
                                   parse_mode_token_loss, per_mode_stats, register_rollout, rollout_modes)
from bimode.train.bpo.rewards import GuardedReward, import_reward, weighted_rewards
from bimode.train.bpo.rollouts import ROLLOUT_FIELD, RolloutBatch, batches_in, group_prompts

from tests.helpers.bpo_helpers import LastLogged, trained_p_think_drop
from tests.helpers.trained import TRAINED_MAX_LEVEL
from tests.helpers.hf_fixtures import saved_vision_keys

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

ROOT = Path(__file__).resolve().parents[2]
ROWS = [i // 4 for i in range(8)]  # a generation batch as TRL samples it: 2 prompts x 4 rollouts
T, N = ThinkingMode.THINK, ThinkingMode.NO_THINK


# ---- pure parts -------------------------------------------------------------------------------------
def test_modes_follow_the_global_position_so_a_split_group_stays_mixed():
    assert rollout_modes(0, 8, 4) == [T, T, N, N, T, T, N, N]
    # a group of 4 split over two ranks of 2: rank 0 holds its thinking half, rank 1 its non-thinking half
    assert rollout_modes(0, 2, 4) == [T, T] and rollout_modes(2, 2, 4) == [N, N]
    assert rollout_modes(3, 3, 4) == [N, T, T]
    assert rollout_modes(0, 4, 4, "auto") == [ThinkingMode.AUTO] * 4
    with pytest.raises(ValueError, match="even"):
        rollout_modes(0, 3, 3)


def test_mode_token_loss_setting_and_weights():
    assert parse_mode_token_loss("off") == 0.0 and parse_mode_token_loss("on") == 1.0
    assert parse_mode_token_loss("0.3") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="mode_token_loss"):
        parse_mode_token_loss("sometimes")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        parse_mode_token_loss(1.5)
    w = mode_token_weights([1, 3, 0], 5, 0.25)
    assert w.tolist() == [[0.25, 1, 1, 1, 1], [0.25, 0.25, 0.25, 1, 1], [1, 1, 1, 1, 1]]


def test_mode_token_loss_gives_trl_the_weighted_advantages_or_an_env_mask():
    advantages = torch.tensor([2.0, -1.0])
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert mode_token_loss(advantages, completion, [1, 3], 1.0) is advantages  # on: like any other token
    weighted = mode_token_loss(advantages, completion, [1, 3], 0.25)
    assert weighted.tolist() == [[0.5, 2, 2, 2], [-0.25, -0.25, -0.25, -1]]
    assert mode_token_loss(advantages, completion, [1, 3], 0.0) is advantages
    # off: the rollout's env_mask takes them out of the loss and of its token count (TRL reads it)
    assert forced_env_mask([1, 3], [4, 3]) == [[0, 1, 1, 1], [0, 0, 0]]


def test_rollout_layouts_are_registered_by_name():
    assert set(ROLLOUT_LAYOUTS) >= {"bimode", "auto"}

    @register_rollout("think_only_for_test")
    def think_only(offset, n, num_generations):
        return [ThinkingMode.THINK] * n

    try:
        assert rollout_modes(0, 3, 4, "think_only_for_test") == [T, T, T]
        from bimode.train.bpo.trainer import BPOConfig  # the config accepts a layout registered after import

        assert BPOConfig(output_dir="o", rollout="think_only_for_test", use_cpu=True, bf16=False).rollout == \
            "think_only_for_test"
    finally:
        del ROLLOUT_LAYOUTS["think_only_for_test"]
    with pytest.raises(ValueError, match="bimode"):
        rollout_modes(0, 2, 2, "think_only_for_test")
    with pytest.raises(ValueError, match=r"rewards lists \['accuracy'\] more than once"):
        BPOConfig(output_dir="o", rewards=["accuracy", "format", "accuracy"], use_cpu=True, bf16=False)


def test_per_mode_stats():
    stats = per_mode_stats(["think", "think", "no_think", "malformed"], torch.tensor([1.0, 0.0, 1.0, 0.0]),
                           torch.tensor([0.5, -0.5, 1.0, -1.0]), torch.tensor([20, 30, 2, 5]))
    assert stats["think/reward"] == 0.5 and stats["no_think/reward"] == 1.0
    assert stats["think/length"] == 25 and stats["no_think/advantage"] == 1.0
    assert stats["think_share"] == 0.5


def test_guarded_reward_scores_failures_zero_and_counts_them():
    def flaky(prompts, completions, completion_ids, **kw):
        if any(ids == [9] for ids in completion_ids):
            raise RuntimeError("cannot score")
        return [1.0 if ids == [1] else "not a number" for ids in completion_ids]

    guard = GuardedReward(flaky)
    assert guard([None] * 3, ["a", "b", "c"], [[1], [9], [2]]) == [1.0, 0.0, 0.0]
    assert guard.failures == 2  # the raising rollout and the non-number, one by one
    with pytest.raises(ValueError, match="cannot be imported"):
        import_reward("no_such_module:reward")
    assert import_reward("tests.helpers.bpo_helpers:think_wins").__name__ == "think_wins"


def test_guarded_reward_passes_none_on_as_unscorable_like_trl():
    guard = GuardedReward(lambda prompts, completions, completion_ids, **kw: [1.0, None, float("nan"), 0.0])
    assert guard([None] * 4, list("abcd"), [[1], [2], [3], [4]]) == [1.0, None, None, 0.0]
    assert guard.unscorable == 2 and guard.failures == 0
    # TRL's total: weighted sum over the rewards that scored a rollout, NaN where none did
    total = weighted_rewards([[1.0, None, None], [0.5, 1.0, None]], [1.0, 2.0])
    assert total[:2].tolist() == [2.0, 2.0] and torch.isnan(total[2])


def test_the_rollout_batch_carries_each_rewards_values_back_by_name():
    batch = RolloutBatch([T, N], [1, 3], [5, 1], [4, 0], ["think", "no_think"])
    columns = batch.reward_columns()
    assert columns["rollout_mode"] == ["think", "no_think"] and columns[ROLLOUT_FIELD] is batch
    # TRL hands every reward the field once per rollout; the guard records its values there
    guard = GuardedReward(lambda prompts, completions, completion_ids, **kw: [1.0, None], "right")
    guard([None] * 2, ["a", "b"], [[1], [2]], **{ROLLOUT_FIELD: [batch, batch]})
    assert batch.rewards == {"right": [1.0, None]} and batches_in({ROLLOUT_FIELD: [batch, batch]}) == [batch]
    assert batch.rewards_of(["right"]) == [[1.0, None]]
    with pytest.raises(RuntimeError, match="'format'.*did not score"):
        batch.rewards_of(["right", "format"])
    with pytest.raises(ValueError, match="3 values for 2 rollouts"):
        batch.record_rewards("right", [1.0, 0.0, 1.0])


def test_rollout_prompts_come_from_the_messages_trl_passes_with_the_records_tokens(tiny_dir, tiny_processor):
    """TRL gives the rollout each record's messages with the images placed in their blocks (and string
    contents made lists); the engine must see exactly the tokens and images the record itself gives."""
    from trl.data_utils import prepare_multimodal_messages

    from bimode.generation.engine import TransformersEngine
    from bimode.generation.types import Prompt
    from bimode.models import load_model

    model, processor = load_model(tiny_dir, dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    sample = synthetic.generate(2, seed=3, families=["shell"], max_level=2)
    records = [s.to_record() for s in sample]
    records[1] = dataclasses.replace(records[1], system="Answer with one digit.")  # a string content
    trl_prompts = [prepare_multimodal_messages(r.messages(), r.load_images()) for r in records for _ in range(2)]
    grouped = group_prompts(trl_prompts, [T, N, T, N])
    assert [p.modes for p in grouped] == [[T, N], [T, N]]  # one prompt per record, its rollouts' modes
    for prompt, record in zip(grouped, records):
        expected = Prompt.from_record(record)
        assert prompt.messages == [{**m, "content": m["content"] if isinstance(m["content"], list)
                                    else [{"type": "text", "text": m["content"]}]} for m in expected.messages]
        assert len(prompt.images) == len(expected.images) > 0
        assert all(a.tobytes() == b.tobytes() for a, b in zip(prompt.images, expected.images))
        assert engine.prompt_ids(prompt) == engine.prompt_ids(expected)


# ---- the trainer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpo_file(trained_families_file):
    return trained_families_file


def make_trainer(model_dir, train_file, out, **overrides):
    from bimode.train.bpo.trainer import BPOConfig, build_trainer

    args = dict(model_path=str(model_dir), train_files=[str(train_file)], output_dir=str(out),
                num_generations=4, per_device_train_batch_size=8, max_completion_length=24, max_steps=2,
                learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                bf16=False, probe_steps=0, seed=0)
    args.update(overrides)
    return build_trainer(BPOConfig(**args))


def test_advantages_are_normalized_over_the_mixed_group(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    # think rollouts first, then non-thinking; a reward imported by path is named by it
    assert rollouts.rewards["tests.helpers.bpo_helpers.no_think_wins"] == [0.0, 0.0, 1.0, 1.0] * 2
    # by hand, group of 2g = 4 with rewards [0, 0, 1, 1]: mean 0.5, sample std sqrt(1/3)
    expected = (0.5 / (3 ** -0.5 + 1e-4))
    assert output["advantages"].tolist() == pytest.approx([-expected, -expected, expected, expected] * 2, rel=1e-5)
    # completions open with the forced suffix; the prompt ends at `<think>` for every rollout
    with trainer.generation_engine() as engine:
        suffix = engine.suffix_rest
    assert rollouts.modes == [T, T, N, N] * 2
    for ids, mode in zip(output["completion_ids"].tolist(), rollouts.modes):
        assert ids[:len(suffix[mode])] == suffix[mode]


def test_rollout_auto_is_plain_grpo_without_forced_tokens(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, rollout="auto")
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    assert rollouts.suffix_lengths == [0] * 8 and rollouts.modes == [ThinkingMode.AUTO] * 8
    with trainer.generation_engine() as engine:
        decision = engine.decision
    first = output["completion_ids"][:, 0].tolist()
    assert all(t in decision.think_ids | decision.no_think_ids for t in first)


def decision_grads(trainer):
    """Gradient of the loss at the positions that predict each rollout's forced mode tokens."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    inputs, rollouts = trainer.generate_and_score(ROWS)
    captured = {}
    norm = trainer.model.model.language_model.norm

    def keep_grad(module, args, out):
        out.register_hook(lambda g: captured.setdefault("g", g))

    handle = norm.register_forward_hook(keep_grad)
    try:
        trainer.compute_loss(trainer.model, inputs).backward()
    finally:
        handle.remove()
    # (rows, prompt + completion, hidden), or with the shared-prefix forward (on by default) the rows' pass,
    # (rows, 1 + completion, hidden): the prompt ran once, and only its last token runs again per row
    grad = captured["g"]
    start = grad.size(1) - inputs["completion_ids"].size(1) - 1  # this position predicts the first completion token
    lengths = rollouts.suffix_lengths
    forced = torch.stack([grad[r, start:start + n].abs().sum() for r, n in enumerate(lengths)])
    rest = torch.stack([grad[r, start + n:].abs().sum() for r, n in enumerate(lengths)])
    return forced, rest


def test_mode_token_loss_off_gives_the_decision_no_gradient(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, mode_token_loss="off",
                           rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    forced, rest = decision_grads(trainer)
    assert torch.all(forced == 0) and torch.all(rest > 0)
    # and out of the token count the loss divides by: TRL builds both from the rollout's env_mask
    inputs, rollouts = trainer.generate_and_score(ROWS)
    forced_tokens = sum(rollouts.suffix_lengths)
    assert inputs["num_items_in_batch"].item() == inputs["completion_mask"].sum().item() - forced_tokens
    forced_on, _ = decision_grads(make_trainer(trained_tiny, bpo_file, tmp_path / "on", mode_token_loss="on",
                                               rewards=["tests.helpers.bpo_helpers:no_think_wins"]))
    assert torch.all(forced_on > 0)


def test_mode_token_weight_scales_the_forced_tokens_advantage_and_logs_what_its_names_say(
        tmp_path, trained_tiny, bpo_file):
    # thinking rollouts hit the 4-token limit (their traces are longer) and are masked out of the loss
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, mode_token_loss="0.25", max_completion_length=4,
                           mask_truncated_completions=True, rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    adv = output["advantages"]
    for row, n in enumerate(rollouts.suffix_lengths):
        assert adv[row, :n].tolist() == pytest.approx([0.25 * adv[row, -1].item()] * n)
    logged = LastLogged(trainer)
    expected = 0.5 / (3 ** -0.5 + 1e-4)  # the rollout's advantage A, not the forced tokens' 0.25 A
    assert logged["bpo/no_think/advantage"] == pytest.approx(expected, rel=1e-5)
    assert logged["bpo/think/advantage"] == pytest.approx(-expected, rel=1e-5)
    # generated tokens only: a truncated trace is 4 (not 0 - suffix), a direct answer its 1 digit (no end token)
    assert logged["bpo/think/length"] == 4.0
    assert logged["bpo/no_think/length"] == 1.0
    assert logged["bpo/no_think/thinking_tokens"] == 0.0 and 0 < logged["bpo/think/thinking_tokens"] <= 4


def test_unscorable_rollouts_are_left_out_of_the_group(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, rewards=["tests.helpers.bpo_helpers:none_on_thinking"])
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    assert rollouts.rewards["tests.helpers.bpo_helpers.none_on_thinking"] == [None, None, 1.0, 1.0] * 2
    assert trainer.guarded_rewards[0].unscorable == 4 and trainer.guarded_rewards[0].failures == 0
    # scored: the non-thinking rollouts, all 1.0 -> no advantage; scoring thinking 0 would have made it +0.87
    assert output["advantages"].tolist() == [0.0] * 8


def test_a_stopped_rollout_ends_with_the_token_that_stopped_it(tmp_path, trained_tiny, bpo_file):
    """A model with several end tokens (Llama 3: <|eot_id|> and <|end_of_text|>): training must see the one
    that was sampled, not the tokenizer's eos. Here every digit ends a turn, so direct answers stop on one."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    model_dir = tmp_path / "model"
    shutil.copytree(trained_tiny, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    config = GenerationConfig.from_pretrained(model_dir)
    config.eos_token_id = [tokenizer.eos_token_id, *digits]
    config.save_pretrained(model_dir)
    trainer = make_trainer(model_dir, bpo_file, tmp_path / "run", rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    ends = [ids[mask.bool()].tolist()[-1] for ids, mask in zip(output["completion_ids"], output["completion_mask"])]
    no_think = [end for end, mode in zip(ends, rollouts.modes) if mode is N]
    assert no_think and all(end in digits for end in no_think), (no_think, tokenizer.eos_token_id)


def test_auto_rollouts_sample_the_decision_from_the_policy_that_scores_it(tmp_path, tiny_dir, bpo_file):
    """Plain GRPO (`rollout: auto`) is on-policy at the decision token: on an untrained model, whose
    decision tokens hold little probability, the first tokens are whatever the full policy samples."""
    from bimode.generation.types import Prompt

    trainer = make_trainer(tiny_dir, bpo_file, tmp_path, rollout="auto", temperature=1.0, max_completion_length=4)
    trainer.model.train()
    output, _ = trainer.generate_and_score(ROWS)
    with trainer.generation_engine() as engine:
        mass = [m for _, m in engine.decision_stats([Prompt.from_record(trainer.records[r]) for r in (0, 1)])]
        decision = engine.decision
    assert max(mass) < 0.5  # so 8 draws from the full policy all landing on a decision token is unlikely
    first = output["completion_ids"][:, 0].tolist()
    assert not all(t in decision.think_ids | decision.no_think_ids for t in first)
    assert trainer.sampling_params().constrain_decision is False


def test_mode_token_loss_on_moves_the_decision_toward_the_rewarded_mode(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, mode_token_loss="on", max_steps=6,
                           learning_rate=3e-3, rewards=["tests.helpers.bpo_helpers:no_think_wins"], probe_size=48)
    drop, before, after = trained_p_think_drop(trainer)
    assert drop > 0.15, (before, after)


def test_a_failing_reward_does_not_stop_training(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, rewards=["tests.helpers.bpo_helpers:fails_on_thinking"],
                           max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    guard = trainer.guarded_rewards[0]
    assert guard.failures == 2 * 4  # the 4 thinking rollouts of each of the 2 steps, each scored 0
    logged = [h for h in trainer.state.log_history if "rewards/tests.helpers.bpo_helpers.fails_on_thinking/failures" in h]
    assert logged and logged[-1]["rewards/tests.helpers.bpo_helpers.fails_on_thinking/failures"] > 0
    assert logged[-1]["bpo/no_think/reward"] == 1.0 and logged[-1]["bpo/think/reward"] == 0.0


def test_probe_logs_p_think_by_level(tmp_path, trained_tiny, bpo_file):
    trainer = make_trainer(trained_tiny, bpo_file, tmp_path, max_steps=2, probe_steps=1, probe_size=24)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]
    for level in range(1, TRAINED_MAX_LEVEL + 1):
        assert 0.0 <= lines[0][f"p_think/level_{level}"] <= 1.0
        assert lines[0][f"think_rate/level_{level}"] in {i / 8 for i in range(9)}  # 24 probes over 3 levels


def test_recipes_parse_into_the_config():
    from trl import TrlParser

    from bimode.train.bpo.trainer import BPOConfig

    (tiny,) = TrlParser(BPOConfig).parse_args_and_config(
        args=["--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--use_cpu", "true"])
    assert tiny.rollout == "bimode" and tiny.num_generations == 8 and tiny.mode_token_loss == "on"
    assert tiny.chat_template_kwargs == {"thinking_mode": "auto"}
    # the R-4B-scale recipe asks for bf16 and vLLM (GPU only); every other key must be a real field
    (r4b,) = TrlParser(BPOConfig).parse_args_and_config(
        args=["--config", str(ROOT / "configs/recipes/r4b_bpo.yaml"), "--bf16", "false", "--use_vllm", "false",
              "--use_cpu", "true", "--gradient_checkpointing", "false"])
    assert r4b.num_generations == 16 and r4b.max_steps == 320 and r4b.beta == 0.001


def test_cli_bpo_trains_and_saves(tmp_path, trained_tiny, bpo_file):
    from bimode.cli import main

    out = tmp_path / "run"
    assert main(["bpo", "--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--model_path", str(trained_tiny),
                 "--train_files", str(bpo_file), "--probe_files", str(bpo_file), "--output_dir", str(out),
                 "--max_steps", "2", "--per_device_train_batch_size", "16", "--probe_steps", "1",
                 "--probe_size", "12", "--report_to", "none", "--use_cpu", "true"]) == 0
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "chat_template.jinja").exists()
    keys = saved_vision_keys(out / "final")  # the layout vLLM reads, through TRL's save
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys)
    assert len((out / "probe.jsonl").read_text().splitlines()) == 2


def test_bad_settings_fail_clearly(tmp_path, trained_tiny, bpo_file):
    from bimode.train.bpo.trainer import BPOConfig

    with pytest.raises(ValueError, match="even num_generations"):
        BPOConfig(output_dir=str(tmp_path), num_generations=3, per_device_train_batch_size=3)
    with pytest.raises(ValueError, match="rollout must be"):
        BPOConfig(output_dir=str(tmp_path), rollout="sometimes")
    with pytest.raises(ValueError, match="mode_token_loss"):
        BPOConfig(output_dir=str(tmp_path), mode_token_loss="maybe")
    with pytest.raises(ValueError, match="cannot be imported"):
        make_trainer(trained_tiny, bpo_file, tmp_path, rewards=["nowhere.module:reward"])
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "b", "question": "2+2?", "answer": ""}\n')
    with pytest.raises(ValueError, match=f"file {no_answer}, row 2, field 'answer': no answer to reward"):
        make_trainer(trained_tiny, no_answer, tmp_path)


@pytest.mark.parametrize("name, value", [("min_p", 0.05), ("repetition_penalty", 1.1),
                                         ("generation_kwargs", {"min_new_tokens": 4}), ("cache_implementation", "static")])
def test_generation_settings_the_engine_cannot_honour_are_refused_without_vllm(tmp_path, name, value):
    """bimode's engine samples with temperature, top_p, top_k and max_completion_length; TRL's vLLM path
    reads the rest, so there they are kept."""
    from bimode.train.bpo.trainer import BPOConfig

    with pytest.raises(ValueError, match=f"{name} .*without use_vllm bimode's own engine rolls out"):
        BPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value})
    assert getattr(BPOConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, **{name: value}), name) == value


# ---- a model with multi-axis rotary positions (Qwen2.5-VL): the engine's plain path -----------------------
@pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"])
def test_qwen_vl_rollouts_are_scored_as_the_forced_mode_prompt_would_be(tmp_path, family):
    """The forced suffix starts the completion, not the prompt (the issue's warning: in the prompt it breaks
    Qwen-VL position ids). TRL's log-probs of the generated tokens must equal a plain forward of the
    forced-mode prompt followed by them, and the mode tokens must train."""
    from bimode.models import load_model
    from tests.helpers import hf_fixtures
    from tests.helpers.checkpoints import assert_reloads

    model_dir = getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family)
    records = [s.to_record() for s in synthetic.generate(8, seed=5, families=["shell"], max_level=3)]
    train = write_records(records, tmp_path / "train.jsonl")
    # num_iterations 2 makes TRL compute the rollouts' log-probs right after generation (old_per_token_logps)
    trainer = make_trainer(model_dir, train, tmp_path / "run", max_completion_length=6, num_iterations=2,
                           rewards=["tests.helpers.bpo_helpers:no_think_wins"], temperature=1.0)
    trainer.model.train()
    output, rollouts = trainer.generate_and_score(ROWS)
    with trainer.generation_engine() as engine:
        assert engine.shared_prefix  # rolled out from the prompt's shared prefill, multi-axis positions fed by hand
        suffix = engine.suffix_rest
    model, processor = load_model(model_dir, dtype=torch.float32)
    for r, (row, mode) in enumerate(zip(ROWS, rollouts.modes)):
        completion = output["completion_ids"][r][output["completion_mask"][r].bool()].tolist()
        n = len(suffix[mode])
        assert completion[:n] == suffix[mode]
        generated = completion[n:]
        record = records[row]
        text = processor.apply_chat_template(record.messages(), add_generation_prompt=True, tokenize=False,
                                             thinking_mode=mode.value)
        inputs = dict(processor(images=record.load_images(), text=[text], return_tensors="pt"))
        prompt_len = inputs["input_ids"].size(1)
        for key in ("input_ids", "mm_token_type_ids"):  # per-token inputs continue over the generated tokens
            if key in inputs:
                more = torch.tensor([generated]) if key == "input_ids" else torch.zeros(1, len(generated))
                inputs[key] = torch.cat([inputs[key], more.to(inputs[key].dtype)], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits[0, prompt_len - 1:-1]
        direct = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(generated)[:, None])[:, 0]
        trl = output["old_per_token_logps"][r, n:n + len(generated)]
        assert trl.tolist() == pytest.approx(direct.tolist(), abs=2e-4), (r, mode)
    forced, rest = decision_grads(trainer)
    assert torch.all(forced > 0) and torch.all(rest > 0)
    # the trainer's save (model and processor, as at a checkpoint) loads back; trained first: test_families
    trainer.save_model(str(tmp_path / "saved"))
    assert_reloads(trainer, tmp_path / "saved")
