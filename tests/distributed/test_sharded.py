"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU processes (gloo): `bimode anneal` and `bimode bpo` train with
per-component learning rates and a frozen component, match an unsharded run, and save one whole checkpoint in
the layout vLLM reads. The GPU launch configs differ from these only in process count and bf16."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.train.components import component_of
from tests.helpers.launch import launch_two_cpu_processes, launch_two_machines
from tests.helpers.hf_fixtures import saved_vision_keys

ROOT = Path(__file__).resolve().parents[2]
SHARDED = ["cpu2_zero2", "cpu2_zero3", "cpu2_fsdp2"]
# per-component learning rates and a frozen tower: the optimizer groups must survive sharding
ANNEAL = ["--config", "configs/recipes/tiny_anneal.yaml", "--max_steps", "3", "--report_to", "none",
          "--save_strategy", "no", "--freeze_vision", "true", "--projector_lr", "1e-2", "--llm_lr", "2e-3",
          "--use_cpu", "true"]
BPO = ["--config", "configs/recipes/tiny_bpo.yaml", "--max_steps", "2", "--per_device_train_batch_size", "8",
       "--num_generations", "4", "--max_completion_length", "16", "--probe_steps", "0", "--report_to", "none",
       "--save_strategy", "no", "--learning_rate", "1e-2", "--freeze_vision", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(64, seed=2, families=["count", "shell"], max_level=3)],
                  path)
    return path


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint).state_dict()


def _assert_whole_checkpoint(final: Path) -> None:
    files = sorted(p.name for p in final.iterdir())
    assert files.count("model.safetensors") == 1 and not [f for f in files if "shard" in f or f.endswith(".distcp")]
    keys = saved_vision_keys(final)
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys)


def _assert_same_training(got: dict, expected: dict, base: dict, rel_tol: float = 1e-3) -> None:
    """Frozen tensors unchanged; every trained tensor's distance to the reference is within rel_tol of how far
    the reference moved it (Adam's per-element normalisation magnifies float-order differences of near-zero
    gradients, so an absolute bound per element would be loose or flaky)."""
    trained = 0  # measured: at most 8e-6 (anneal vs one process) and 1e-4 (BPO ZeRO-3 vs DDP)
    for name, tensor in got.items():
        step = (expected[name] - base[name]).norm().item()
        if component_of(name) == "vision":
            assert torch.equal(tensor, base[name]), f"{name}: frozen, yet changed"
        elif step > 0:
            trained += 1
            rel = (tensor - expected[name]).norm().item() / step
            assert rel <= rel_tol, f"{name}: {rel:.2e} of the reference's step away from the reference"
        else:
            assert torch.allclose(tensor, expected[name], atol=1e-7), name
    assert trained > len(got) // 2  # the reference did train


@pytest.fixture(scope="module")
def anneal_reference(tmp_path_factory, tiny_dir, records_file):
    """One process, the global batch of the two sharded processes (2 x 4)."""
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run([sys.executable, "-m", "bimode.cli", "anneal", *ANNEAL, "--model_path", str(tiny_dir),
                           "--train_files", str(records_file), "--output_dir", str(out),
                           "--per_device_train_batch_size", "8"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"the one-process reference failed:\n{done.stderr[-6000:]}"
    return _weights(out / "final")


@pytest.mark.parametrize("config", SHARDED)
def test_sharded_anneal_matches_one_process(config, tmp_path, tiny_dir, records_file, anneal_reference):
    out = tmp_path / config
    launch_two_cpu_processes("-m bimode.cli", "anneal", *ANNEAL, "--model_path", str(tiny_dir), "--train_files",
                             str(records_file), "--output_dir", str(out), "--per_device_train_batch_size", "4",
                             config=config)
    _assert_whole_checkpoint(out / "final")
    _assert_same_training(_weights(out / "final"), anneal_reference, _weights(tiny_dir))


@pytest.fixture(scope="module")
def bpo_reference(tmp_path_factory, tiny_dir, records_file):
    """BPO under DDP on the same 2 processes: rollouts are sampled per rank (seeded by rank), so a sharded run
    is compared with the unsharded run that draws the same rollouts, not with one process."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_cpu_processes("-m bimode.cli", "bpo", *BPO, "--model_path", str(tiny_dir), "--train_files",
                             str(records_file), "--probe_files", str(records_file), "--output_dir", str(out),
                             config="cpu2")
    return _weights(out / "final")


@pytest.mark.parametrize("config", SHARDED)
def test_sharded_bpo_matches_ddp(config, tmp_path, tiny_dir, records_file, bpo_reference):
    out = tmp_path / config
    launch_two_cpu_processes("-m bimode.cli", "bpo", *BPO, "--model_path", str(tiny_dir), "--train_files",
                             str(records_file), "--probe_files", str(records_file), "--output_dir", str(out),
                             config=config)
    _assert_whole_checkpoint(out / "final")
    _assert_same_training(_weights(out / "final"), bpo_reference, _weights(tiny_dir))


@pytest.mark.parametrize("command", ["anneal", "bpo"])
def test_two_machines_train_as_one_machine_with_zero2(command, request, tmp_path, tiny_dir, records_file):
    """Two `accelerate launch` commands, one per machine (rank 0 and 1, rendezvous at 127.0.0.1), ZeRO-2: the
    weights of the single-machine run's reference, within the same tolerance (docs/cluster.md)."""
    out = tmp_path / "two_machines"
    args = ANNEAL + ["--per_device_train_batch_size", "4"] if command == "anneal" else BPO + ["--probe_files",
                                                                                             str(records_file)]
    launch_two_machines("-m bimode.cli", command, *args, "--model_path", str(tiny_dir), "--train_files",
                        str(records_file), "--output_dir", str(out), config="cpu2_zero2")
    _assert_whole_checkpoint(out / "final")
    reference = request.getfixturevalue(f"{command}_reference")
    _assert_same_training(_weights(out / "final"), reference, _weights(tiny_dir))
