"""BPO with TRL's colocated vLLM rollouts, on CPU, in the vLLM environment (`make setup-vllm`).

One run of tests/integration/vllm_scripts/bpo_colocate.py per family and kind (full, LoRA): a few BPO steps on the
trained tiny model (LLaVA) and on tiny Qwen2.5-VL and Qwen3-VL checkpoints, then checks that forced mode tokens
carry no sampling log-prob, that TRL's log-probs agree with vLLM's during training, that the weights reach vLLM
(after a sync, vLLM scores like the trained model and unlike the starting one), and that the saved model is whole.
The untrained Qwen-VL models answer nothing right: a reward for the no-think mode gives their steps a direction.
The LLaVA run trains with the shared-prefix forward (on by default); a second run of one step with it off must give
the same step on the same rollouts. Skipped only while .venv-vllm is missing.
"""

import math
from pathlib import Path

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from tests.helpers.vllm_helpers import FAMILIES, family_checkpoint, needs_vllm, run_vllm_script

ROOT = Path(__file__).resolve().parents[2]
pytestmark = needs_vllm
# The untrained Qwen-VL models answer nothing right (accuracy 0 everywhere: no advantage, no step): a reward for
# the no-think mode instead; their sharpened logits (vllm_scripts/prepare_family.py) diverged at the LLaVA run's
# learning rate (KL 3e6 by step 3), a fiftieth of it trains smoothly
QWEN_ARGS = ["--rewards", "tests.helpers.bpo_helpers:no_think_wins", "--learning_rate", "0.01"]
FAMILY_ARGS = {"tiny_llava": [], "qwen25_vl": QWEN_ARGS, "qwen3_vl": QWEN_ARGS}
# where each family's checkpoints keep the vision tower: its hub layout, which transformers 5 writes back on saving
# and vLLM's loader reads (Qwen2.5-VL's predates transformers' model.visual / model.language_model)
VISION_PREFIX = {"tiny_llava": "vision_tower.vision_model.", "qwen25_vl": "visual.", "qwen3_vl": "model.visual."}


def saved_keys(checkpoint: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def start_model(family, trained_tiny, tmp_path_factory):
    return family_checkpoint(family, trained_tiny, tmp_path_factory)


def colocated_bpo(tmp, family, start, *extra: str, probe_prompts: int) -> dict:
    train = tmp / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(32, seed=4, families=["count", "shell"],
                                                             max_level=3)], train)
    # beta > 0: the reference model's log-probs go through the training forward too (without gradients). SGD: the
    # step is the gradient times the learning rate, so the shared and per-row forwards' steps compare at the
    # forward's tolerance (Adam's first step divides each gradient by its own size: a gradient of rounding noise,
    # such as a SigLIP k_proj bias's, which is zero in exact arithmetic, then moves by the full learning rate)
    args = ["--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--model_path", str(start),
            "--train_files", str(train), "--probe_files", str(train), "--output_dir", str(tmp / "run"),
            "--max_steps", "3", "--per_device_train_batch_size", "16", "--num_generations", "8",
            "--max_completion_length", "24", "--optim", "sgd", "--learning_rate", "0.5", "--warmup_steps", "0", "--beta", "0.02",
            "--logging_steps", "1", "--probe_steps", "0", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "512", *FAMILY_ARGS[family],
            *extra]
    out = run_vllm_script("bpo_colocate.py", {"args": args, "probe_prompts": probe_prompts,
                                              "step_one_weights": str(tmp / "step_one.pt")}, tmp, timeout=600)
    return {**out, "step_one": torch.load(tmp / "step_one.pt"), "start": torch.load(tmp / "step_one.pt.start")}


@pytest.fixture(scope="module")
def colocate_run(tmp_path_factory, family, start_model):
    if family == "qwen3_vl":  # about 20 s a colocated run: the suite's time budget
        pytest.skip("full-weight sync on Qwen-VL is tested on qwen25_vl; Qwen3-VL's runs under LoRA (its deepstack "
                    "mergers train in full there, so they are synced whole too)")
    return colocated_bpo(tmp_path_factory.mktemp(f"bpo_vllm_{family}"), family, start_model, probe_prompts=6)


@pytest.fixture(scope="module")
def lora_colocate_run(tmp_path_factory, family, start_model):
    """LoRA (adapters on the LLM, projector in full, trainable mode-token rows): TRL merges the adapter into the
    weights it syncs; dropout off, so the training forward and vLLM score the same policy."""
    if family == "qwen25_vl":  # about 20 s a colocated run: the suite's time budget
        pytest.skip("LoRA's sync on Qwen-VL is tested on qwen3_vl, whose layout (deepstack mergers) has more to sync; "
                    "Qwen2.5-VL's full-weight run is here")
    return colocated_bpo(tmp_path_factory.mktemp(f"bpo_vllm_lora_{family}"), family, start_model, "--use_peft",
                         "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", probe_prompts=6)


@pytest.fixture(params=["full", "lora"])
def either_run(request, family):
    return request.getfixturevalue({"full": "colocate_run", "lora": "lora_colocate_run"}[request.param])


@pytest.fixture(scope="module")
def one_step_without_the_shared_forward(tmp_path_factory, family, start_model):
    return colocated_bpo(tmp_path_factory.mktemp(f"bpo_vllm_off_{family}"), family, start_model,
                         "--shared_prefix_forward", "false", "--max_steps", "1", probe_prompts=0)


def test_forced_mode_tokens_carry_no_sampling_logprob(either_run):
    rollouts = either_run["rollouts"]
    assert len(rollouts) == 16 and {r["forced"] for r in rollouts} == {1, 3}  # `\n` vs `\n\n</think>\n\n`
    for r in rollouts:
        forced, sampled = r["logprobs"][:r["forced"]], r["logprobs"][r["forced"]:]
        assert all(math.isnan(x) for x in forced)
        assert sampled and all(math.isfinite(x) and x <= 0 for x in sampled)


def test_trl_and_vllm_logprobs_agree_at_every_step(either_run):
    steps = [log for log in either_run["logged"] if "sampling/sampling_logp_difference/mean" in log]
    assert len(steps) == 3
    for log in steps:
        # vLLM samples with media tokens banned, TRL scores the unbanned policy: their mass (about 1e-3 on
        # this model) is the only gap; a stale or misnamed weight sync gives gaps of 1e-2 and more
        assert log["sampling/sampling_logp_difference/mean"] < 2e-3, log
        assert 0.95 < log["sampling/importance_sampling_ratio/mean"] < 1.05, log


def test_weights_reach_vllm_after_an_update(either_run):
    before, after = either_run["before_sync"], either_run["after_sync"]
    assert before["vllm_vs_trained"] > 1e-2  # the last update changed the model (vLLM held the older weights)
    # after the sync vLLM scores like the trained model, also on images it encoded before the sync
    assert after["vllm_vs_trained"] < 1e-4, after
    assert after["vllm_vs_start"] > 1e-2, after


def test_the_saved_model_is_whole_and_in_vllm_s_layout(colocate_run, family):
    final = Path(colocate_run["saved"])
    assert (final / "model.safetensors").exists() and (final / "chat_template.jinja").exists()
    vision = [k for k in saved_keys(final) if k.startswith(("vision_tower.", "visual.", "model.visual."))]
    assert vision and all(k.startswith(VISION_PREFIX[family]) for k in vision)
    if family == "qwen3_vl":  # the deepstack mergers, which feed vision features into early LLM layers
        assert any(k.startswith("model.visual.deepstack_merger_list.") for k in vision)


def test_lora_keeps_the_base_as_kl_reference_and_saves_an_adapter(lora_colocate_run):
    kl = [log["kl"] for log in lora_colocate_run["logged"] if "kl" in log]
    # the adapter starts as the identity (LoRA's B = 0, token rows as the base's): no divergence at step 1, then
    # the trained adapter moves away from the reference, which is the base with the adapter switched off
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-6, kl
    final = Path(lora_colocate_run["saved"])
    assert (final / "adapter_config.json").exists() and (final / "chat_template.jinja").exists()


@pytest.mark.parametrize("family", ["tiny_llava"], indirect=True)  # the family the shared forward is tested on here
def test_the_shared_forward_is_on_with_vllm_and_gives_trl_s_step(colocate_run, one_step_without_the_shared_forward):
    """vLLM's environment is where TRL's colocated rollouts run (transformers 5.17): the shared-prefix forward is
    on there and gives the step TRL's per-row forward gives on the same rollouts (the tolerance of
    tests/unit/test_shared_prefix_forward.py)."""
    on, off = colocate_run, one_step_without_the_shared_forward
    assert [r["completion_ids"] for r in on["rollouts"]] == [r["completion_ids"] for r in off["rollouts"]]
    first_on, first_off = on["logged"][0], off["logged"][0]
    # 16 rollouts of 2 prompts: 8 rows per prompt pass with the shared forward, 1 without
    assert first_on["shared_prefix/rows_per_prompt_pass"] == 8.0
    assert first_off["shared_prefix/rows_per_prompt_pass"] == 1.0
    for key in ("loss", "kl", "entropy"):
        assert first_on[key] == pytest.approx(first_off[key], rel=1e-5, abs=1e-7), key
    moved = 0.0
    for name, w in off["step_one"].items():
        assert torch.equal(on["start"][name], off["start"][name]), name
        assert torch.allclose(on["step_one"][name], w, rtol=1e-5, atol=1e-6), name
        moved = max(moved, (w - off["start"][name]).abs().max().item())
    assert moved > 1e-4  # the step did something
