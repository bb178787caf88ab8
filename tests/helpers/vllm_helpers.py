"""Driving the vLLM environment (.venv-vllm, `make setup-vllm`) from tests in the main environment.

vLLM 0.31 accepts transformers up to 5.17, the lower end of bimode's range; the main environment tests the upper
end (the newest transformers), where vLLM cannot be installed. So the tests run scripts in the vLLM environment
(tests/integration/vllm_scripts/) and compare the results here; `make test` also runs the internals tests there.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason="the vLLM environment .venv-vllm is missing: run `make setup-vllm`")


def vllm_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_vllm_script(script: str, spec: dict, tmp: Path, timeout: int = 400) -> dict:
    """Run tests/integration/vllm_scripts/<script> in .venv-vllm on `spec`; its JSON answer, or a failure with its log."""
    spec_path, out_path, log_path = tmp / "spec.json", tmp / "out.json", tmp / "vllm.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "integration" / "vllm_scripts" / script), str(spec_path),
                               str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd=tmp,
                              timeout=timeout, check=False)
    if done.returncode != 0 or not out_path.exists():
        pytest.fail(f"{script} failed (exit {done.returncode}):\n" + log_path.read_text()[-6000:])
    return json.loads(out_path.read_text())


# The families every vLLM test runs: the trained tiny model (LLaVA: SigLIP + Qwen3) and tiny Qwen2.5-VL / Qwen3-VL
# (multi-axis rotary positions; Qwen3-VL's deepstack mergers), prepared as bimode saves a model
# (vllm_scripts/prepare_family.py).
FAMILIES = ("tiny_llava", "qwen25_vl", "qwen3_vl")
# Each Qwen-VL family through each path once, for the suite's time (a vLLM start costs 20-45 s here): the backend
# on Qwen3-VL, `vllm serve` on Qwen2.5-VL (every family passed both when they were written, 2026-12-07).
BACKEND_FAMILIES = ("tiny_llava", "qwen3_vl")
SERVE_FAMILIES = ("tiny_llava", "qwen25_vl")
# the untrained Qwen-VL models' logits scaled to a trained model's spread (prepare_family.py says why)
SHARPEN = 20.0
_prepared: dict[str, Path] = {}  # family -> checkpoint, once per test session


def family_checkpoint(family: str, trained_tiny: Path, tmp_path_factory) -> Path:
    """The checkpoint the vLLM tests run for `family`: the trained tiny model, or a prepared tiny Qwen-VL (both
    families prepared by one script run, the first time one is asked for in the session)."""
    if family == "tiny_llava":
        return trained_tiny
    if not _prepared:
        tmp = tmp_path_factory.mktemp("vllm_families")
        others = [f for f in FAMILIES if f != "tiny_llava"]
        out = run_vllm_script("prepare_family.py", {"families": {f: str(tmp / f) for f in others},
                                                    "sharpen": SHARPEN}, tmp)
        _prepared.update({name: Path(path) for name, path in out.items()})
    return _prepared[family]
