"""`bimode curate` and `bimode eval` on a local Ray cluster of 2 actors (docs/cluster.md): the same files as one
process, a run cut off midway resumed without redoing finished batches, and a cluster that listens on 127.0.0.1
only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bimode.curate import CurateConfig, run_curation
from bimode.curate.pipeline import CurateWorker
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.eval.runner import EvalConfig, read_samples, run_eval
from bimode.io import read_log
from bimode.parallel.pool import RayPool, WorkerFailed
from tests.conftest import TRAINED_FAMILIES, TRAINED_MAX_LEVEL
from tests.helpers.ray_helpers import FailingOn, listening_sockets

pytest.importorskip("ray.data", reason="the Ray tests need bimode[ray] (make setup installs it)")
ROOT = Path(__file__).resolve().parents[2]
CFG = CurateConfig(n_samples=3, batch_size=3, max_new_tokens=8, temperature=1.0, annotator_name="tiny")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (started as `--ray_address local` starts it), and the sockets it opened."""
    from bimode.compat.ray_api import start_or_join

    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    before = listening_sockets()
    started = start_or_join("local", num_cpus=2)
    opened = listening_sockets() - before
    yield opened
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "train.jsonl"
    records = [s.to_record() for s in synthetic.generate(15, seed=31, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    for r in records[:5]:
        r.reasoning = None
    write_records(records, path)
    return path


def _outputs(folder):
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("seconds")
    return (folder / "curated.jsonl").read_text(), (folder / "rejects.jsonl").read_text(), summary


def test_a_local_cluster_listens_on_loopback_only(cluster):
    from bimode.compat.ray_api import node_addresses

    assert cluster, "starting Ray opened no listening socket: nothing was checked"
    assert {address for address, _ in cluster} == {"127.0.0.1"}, sorted(cluster)
    assert node_addresses() == ["127.0.0.1"]


def test_ray_curation_on_two_workers_equals_one_process(cluster, engine, trained_tiny, inputs, tmp_path):
    run_curation(engine, [inputs], tmp_path / "single", CFG, reasoner=engine, progress=False)
    worker = CurateWorker(CFG, annotator=str(trained_tiny), reasoner=str(trained_tiny))
    run_curation(None, [inputs], tmp_path / "ray", CFG, progress=False, pool=RayPool(worker, "local", num_workers=2))
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "single")
    curated = [json.loads(line) for line in (tmp_path / "ray" / "curated.jsonl").read_text().splitlines()]
    assert {row["mode"] for row in curated} == {"think", "no_think"}


def test_a_ray_run_cut_off_midway_resumes_without_redoing_finished_batches(cluster, engine, trained_tiny, inputs,
                                                                           tmp_path):
    worker = CurateWorker(CFG, annotator=str(trained_tiny), reasoner=str(trained_tiny))
    last = json.loads(Path(inputs).read_text().splitlines()[-1])["id"]  # in the last batch
    with pytest.raises(WorkerFailed, match=f"cut off at {last}"):
        run_curation(None, [inputs], tmp_path / "ray", CFG, progress=False,
                     pool=RayPool(FailingOn(worker, last), "local", num_workers=2))
    finished = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert finished and 4 not in finished
    run_curation(None, [inputs], tmp_path / "ray", CFG, progress=False, pool=RayPool(worker, "local", num_workers=2))
    batches = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert batches[:len(finished)] == finished and sorted(batches) == list(range(5))  # each batch ran once
    run_curation(engine, [inputs], tmp_path / "single", CFG, reasoner=engine, progress=False)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "single")


def test_the_eval_command_on_a_local_ray_cluster_equals_one_process(engine, trained_tiny, inputs, tmp_path):
    """The command as a user runs it: it starts its own local cluster (this module's is not in its process)."""
    cfg = EvalConfig(max_new_tokens=16, batch_size=4)
    single = read_samples(run_eval(engine, [inputs], tmp_path / "single", cfg, progress=False))
    done = subprocess.run(
        [sys.executable, "-m", "bimode.cli", "eval", str(trained_tiny), "--bench", str(inputs), "--out",
         str(tmp_path / "ray"), "--max_new_tokens", "16", "--batch_size", "4", "--ray_address", "local",
         "--num_workers", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ray = read_samples(tmp_path / "ray" / "samples.jsonl")
    key = lambda r: (r["bench"], r["id"], r["mode"])  # noqa: E731
    assert sorted(ray, key=key) == sorted(single, key=key) and len(single) == 45
    assert json.loads((tmp_path / "ray" / "metrics.json").read_text())["overall"]
