"""lmms-eval's own CLI against `bimode serve`: its OpenAI-compatible chat model, the mode forced by the model
name, scores equal to `bimode eval`'s on the same records (docs/lmms_eval.md).

lmms-eval lives in its own environment (`make setup-lmms-eval`, .venv-lmms-eval); this test runs its CLI from
there as a subprocess and skips while it is missing.
"""

import glob
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bimode.cli import main
from bimode.eval.metrics import summarize
from bimode.eval.runner import EvalConfig, read_samples, run_eval
from tests.helpers.servers import serve_in_thread
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

ROOT = Path(__file__).resolve().parents[2]
LMMS_EVAL = ROOT / ".venv-lmms-eval" / "bin" / "lmms-eval"
TASK_DIR = ROOT / "tests" / "integration" / "lmms_eval_task"
MODES = ("think", "no_think", "auto")  # each one lmms-eval run, forced by the model name tiny:<mode>
MAX_NEW_TOKENS = 64  # bimode_world.yaml's generation_kwargs.max_new_tokens

pytestmark = pytest.mark.skipif(not LMMS_EVAL.exists(),
                                reason="lmms-eval's environment is missing: run `make setup-lmms-eval`")


def lmms_eval_env(home: Path) -> dict:
    """The subprocess environment: nothing from the main venv, no hub, caches in the test's folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "OPENAI_API_BASE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", OPENAI_API_KEY="EMPTY", WANDB_MODE="disabled")
    return env


def lmms_eval_config(base_url: str, out: Path) -> list[dict]:
    """lmms-eval's --config: a list of runs done one after another in one process, here one per mode."""
    # model_args as lmms-eval's `openai` chat model (lmms_eval/models/chat/openai.py) reads them
    return [{"model": "openai", "model_args": f"model=tiny:{mode},base_url={base_url}/v1,api_key=EMPTY,max_retries=1",
             "tasks": "bimode_world", "include_path": str(TASK_DIR), "output_path": str(out), "log_samples": True,
             "batch_size": 1, "verbosity": "WARNING"} for mode in MODES]


def test_lmms_eval_scores_served_model_per_mode_as_bimode_eval(engine, tmp_path):
    """lmms-eval scores the served tiny model in each mode (tiny:think, tiny:no_think, tiny:auto) exactly as
    `bimode eval` scores the same checkpoint in-process: the same answers, scores, token counts and
    per-mode accuracy, greedy on both sides."""
    from bimode.serve.app import create_app
    from bimode.serve.limits import ServerLimits

    assert f"max_new_tokens: {MAX_NEW_TOKENS}\n" in (TASK_DIR / "bimode_world.yaml").read_text()
    # the task's data: the synthetic world's eval split, as `bimode data synth` writes it
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world / "bimode_world.jsonl"), "--split", "eval", "--n", "12",
                 "--seed", "9", "--families", ",".join(TRAINED_FAMILIES),
                 "--max-level", str(TRAINED_MAX_LEVEL)]) == 0
    bench = world / "bimode_world.jsonl"
    records = [json.loads(line) for line in bench.read_text().splitlines()]

    # bimode eval on the checkpoint, in-process (greedy)
    samples = run_eval(engine, [bench], tmp_path / "bimode", EvalConfig(modes=MODES, max_new_tokens=MAX_NEW_TOKENS,
                                                                         batch_size=12), progress=False)
    local_rows = read_samples(samples)
    local = {(r["id"], r["mode"]): r for r in local_rows}
    local_modes = summarize(local_rows)["modes"]

    # lmms-eval's CLI against bimode serve on the same model, one run per mode (one process: lmms-eval's --config)
    base, stop = serve_in_thread(create_app(engine, "tiny", ServerLimits(max_tokens=256)))
    out = tmp_path / "lmms"
    config = tmp_path / "lmms_eval_runs.yaml"
    config.write_text(json.dumps(lmms_eval_config(base, out)))  # JSON is YAML
    started = time.monotonic()
    try:
        done = subprocess.run([str(LMMS_EVAL), "--config", str(config)], check=False, cwd=world,
                              env=lmms_eval_env(tmp_path / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
    finally:
        stop()
    elapsed = time.monotonic() - started
    log = done.stdout[-8000:]
    assert done.returncode == 0, f"lmms-eval exited {done.returncode}\n{log}"

    for mode in MODES:
        run_dir = out / f"tiny__{mode}"  # lmms-eval's sanitised model name
        results = glob.glob(str(run_dir / "*_results.json"))
        sample_files = glob.glob(str(run_dir / "*_samples_bimode_world.jsonl"))
        assert len(results) == 1 and len(sample_files) == 1, f"no results from lmms-eval for tiny:{mode}\n{log}"
        result = json.loads(Path(results[0]).read_text())
        assert result["model_name"] == f"tiny:{mode}"
        rows = [json.loads(line) for line in Path(sample_files[0]).read_text().splitlines()]
        assert sorted(r["doc_id"] for r in rows) == list(range(len(records))), mode
        for row in rows:
            record = records[row["doc_id"]]
            mine = local[(record["id"], mode)]
            assert row["target"] == record["answer"]
            # message.content is the answer alone: bimode serve returns the reasoning apart
            assert row["filtered_resps"].strip() == mine["answer"].strip(), (mode, record["id"], row, mine)
            assert row["bimode_accuracy"] == mine["score"], (mode, record["id"])
            counts = row["token_counts"][0]  # from the response's usage
            assert (counts["output_tokens"], counts["reasoning_tokens"]) == (mine["tokens"], mine["thinking_tokens"])
        accuracy = result["results"]["bimode_world"]["bimode_accuracy,none"]
        assert accuracy == pytest.approx(local_modes[mode]["accuracy"], abs=1e-9), mode
        usage = result["usage"]["total"]  # lmms-eval's own token accounting: the thinking split arrives
        assert (usage["output_tokens"], usage["reasoning_tokens"], usage["n_api_calls"]) == (
            sum(local[(r["id"], mode)]["tokens"] for r in records),
            sum(local[(r["id"], mode)]["thinking_tokens"] for r in records), len(records))

    # the modes were really forced: the model thinks in think mode only, and it has learnt something there
    assert local_modes["think"]["thinking_rate"] == 1.0 and local_modes["no_think"]["thinking_rate"] == 0.0
    assert local_modes["think"]["accuracy"] > 0.3
    print(f"lmms-eval, {len(MODES)} runs: {elapsed:.1f} s; accuracy "
          + ", ".join(f"{m} {local_modes[m]['accuracy']:.3f}" for m in MODES))
