"""Two processes under `accelerate launch` (gloo on CPU): data sharding, BPO's mixed groups across ranks, and
the shared-prefix forward under DDP. The rank workers beside this file run in the launched processes."""

import importlib.util
import json

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from tests.helpers.launch import launch_two_cpu_processes
from tests.helpers.reference_generation import generate

pytestmark = [pytest.mark.internals, pytest.mark.slow]  # internals: runs at both ends (docs/internals.md)


def test_the_readme_two_process_anneal_shards_the_data_and_saves_a_working_model(tmp_path, tiny_dir):
    """docs/annealing.md's CPU command, `accelerate launch --config_file configs/accelerate/cpu2.yaml -m bimode.cli
    anneal --config tiny_anneal --use_cpu true ...`: each rank trains on its own rows, and the saved model
    generates in the bi-mode format; two bad rows are set aside by both processes alike and named once."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    train_file = tmp_path / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(64, seed=3, families=["count", "shell"], max_level=2)],
                  train_file)
    # two bad rows (issue 39): checked before step 1 by both processes, set aside with --skip_bad_rows, named once
    (tmp_path / "not_an_image.png").write_text("text, not pixels")
    good = json.loads(train_file.read_text().splitlines()[0])
    with open(train_file, "a") as fh:
        for bad_id, image in (("bad-missing", str(tmp_path / "nope.png")), ("bad-text", "not_an_image.png")):
            fh.write(json.dumps({**good, "id": bad_id, "images": [image]}) + "\n")
    out = tmp_path / "ddp"
    launch_two_cpu_processes(
        "anneal_ranks.py", "--config", "tiny_anneal", "--use_cpu", "true", "--model_path", str(tiny_dir),
        "--train_files", str(train_file), "--output_dir", str(out), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", "--skip_bad_rows", "true")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["row"], r["field"]) for r in rejects) == [("bad-missing", 65, "images"),
                                                                       ("bad-text", 66, "images")]
    rows = [json.loads((out / f"rows-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(rows[0]) >= 12 and len(rows[1]) >= 12
    assert not set(rows[0]) & set(rows[1])  # each rank saw its own shard
    assert not {"bad-missing", "bad-text"} & (set(rows[0]) | set(rows[1]))  # neither trained on a bad row
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "chat_template.jinja").exists()
    model, processor = AutoModelForImageTextToText.from_pretrained(final), AutoProcessor.from_pretrained(final)
    record = synthetic.generate(1, seed=1, families=["shell"], levels=[1])[0].to_record()
    gen = generate(model, processor, [record], mode="think", max_new_tokens=8)[0]
    assert gen.num_tokens > 0 and gen.response.startswith("<think>\n")


def test_two_processes_keep_mixed_groups_intact(tmp_path, trained_tiny, trained_families_file):
    out = tmp_path / "ddp"
    # per-device batch 2 with groups of 4: every group is split, its thinking half on rank 0
    launch_two_cpu_processes(
        "bpo_ranks.py", "--model_path", str(trained_tiny), "--train_files", str(trained_families_file),
        "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--num_generations", "4",
        "--max_completion_length", "16", "--rewards", "tests.helpers.bpo_helpers:think_wins", "--report_to", "none",
        "--save_strategy", "no", "--probe_steps", "0", "--use_cpu", "true")
    ranks = [json.loads((out / f"rank-{r}.json").read_text())[0] for r in (0, 1)]
    assert ranks[0]["rows"] == ranks[1]["rows"] and len(set(ranks[0]["rows"])) == 1  # one prompt's group
    assert ranks[0]["modes"] == ["think", "think"] and ranks[1]["modes"] == ["no_think", "no_think"]
    expected = 0.5 / (3 ** -0.5 + 1e-4)  # normalized over the 4 rollouts of both ranks, not per rank
    assert ranks[0]["advantages"] == pytest.approx([expected] * 2, rel=1e-5)
    assert ranks[1]["advantages"] == pytest.approx([-expected] * 2, rel=1e-5)


# Qwen3-VL stands for both Qwen-VL families here (multi-axis positions, patches with image_grid_thw, and deepstack
# on top); two launches per family, so Qwen2.5-VL's equivalence is held by tests/unit/test_shared_prefix_forward.py.
# It launches in the main environment only: the internals it reaches are checked at both ends of the transformers
# range by that unit test, and two more launches in vLLM's environment cost about a minute.
IN_VLLM_ENVIRONMENT = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("family", ["llava", pytest.param("qwen3_vl", marks=pytest.mark.skipif(
    IN_VLLM_ENVIRONMENT, reason="Qwen3-VL's DDP case runs in the main environment (its internals: unit tests)"))])
def test_two_processes_train_the_same_with_the_shared_forward_on_and_off(tmp_path, tiny_dir, trained_families_file,
                                                                          family):
    """DDP: the shared path calls the wrapped model twice (prefix, then rows) before one backward. On Qwen3-VL the
    prefix pass carries the multi-axis positions, the images' patches and the deepstack features."""
    from tests.helpers import hf_fixtures

    model_dir, extra = tiny_dir, ["--beta", "0.05"]
    if family == "qwen3_vl":
        model_dir = hf_fixtures.build_tiny_qwen3_vl(tmp_path / family)
        # no reference model: TRL would load it from this checkpoint, which lacks the think tags loading adds
        extra = ["--beta", "0.0"]
    runs = {}
    for shared in ("true", "false"):
        out = tmp_path / shared
        launch_two_cpu_processes(
            "shared_forward_ranks.py", "--model_path", str(model_dir), "--train_files", str(trained_families_file),
            "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations",
            "4", "--max_completion_length", "8", "--rewards", "tests.helpers.bpo_helpers:no_think_wins", "--report_to",
            "none", "--save_strategy", "no", "--probe_steps", "0", "--use_cpu", "true", "--learning_rate", "0.5",
            "--optim", "sgd", "--gradient_checkpointing", "false", "--bf16", "false", "--temperature", "1.0",
            "--num_iterations", "2", "--shared_prefix_forward", shared, *extra)
        runs[shared] = [(json.loads((out / f"rank-{r}.json").read_text()),
                         torch.load(out / f"weights-{r}.pt")) for r in (0, 1)]
    assert all(info["paths"] == ["shared-prefix forward"] for info, _ in runs["true"])
    assert all(info["paths"] == ["TRL's per-row forward (shared_prefix_forward is off)"] for info, _ in runs["false"])
    (on, weights_on), (_, weights_on_1) = runs["true"]
    (off, weights_off), _ = runs["false"]
    before = torch.load(tmp_path / "false" / "before-0.pt")
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5, abs=1e-7)
    moved = 0.0
    for name, w in weights_off.items():
        assert torch.equal(weights_on[name], weights_on_1[name]), name  # the ranks stayed in sync
        assert torch.allclose(weights_on[name], w, rtol=1e-5, atol=1e-6), name
        moved = max(moved, (w - before[name]).abs().max().item())
    assert moved > 1e-3  # the step did something
