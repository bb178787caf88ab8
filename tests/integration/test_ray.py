"""`bimode curate` and `bimode eval` on a local Ray cluster of 2 actors (docs/cluster.md): the same files as one
process, a run cut off midway resumed without redoing finished batches, what an actor raises raised as one process
raises it, an actor process killed mid-run (retried on a restarted actor, each batch logged once) or killed on every
try (curation and eval: the run stops with the resume hint, nothing lost), and a cluster that listens on 127.0.0.1 only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bimode.curate import CurateConfig, run_curation
from bimode.curate.pipeline import CurateWorker
from bimode.eval.runner import EvalConfig, EvalWorker, read_samples, run_eval
from bimode.io import read_log
from bimode.parallel.failures import RemoteTraceback, WorkerFailed
from bimode.parallel.pool import RayPool
from tests.helpers.eval_helpers import curation_outputs, write_curation_pool
from tests.helpers.ray_helpers import FailingOn, KilledOn, SocketProbe, listening_sockets

pytest.importorskip("ray.data", reason="the Ray tests need bimode[ray] (make setup installs it)")
ROOT = Path(__file__).resolve().parents[2]
CFG = CurateConfig(n_samples=3, batch_size=3, max_new_tokens=8, temperature=1.0, annotator_name="tiny")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (started as `--ray_address local` starts it); yields the listening
    sockets there were before it started."""
    from bimode.compat.ray_api import SINGLE_MACHINE_ENV, start_or_join

    import ray

    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", SINGLE_MACHINE_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    before = listening_sockets()
    started = start_or_join("local", num_cpus=2)
    yield before
    if started:
        ray.shutdown()
    for name, value in saved.items():  # the next modules see the environment they would have
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_curation_pool(tmp_path_factory.mktemp("inputs") / "train.jsonl", 15, 5)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """9 rows in 3 batches of 3: the killed tests' input, small enough for a few seconds a run."""
    return write_curation_pool(tmp_path_factory.mktemp("few") / "few.jsonl", 9, 3)


@pytest.fixture(scope="module")
def few_single(engine, few, tmp_path_factory):
    """`few` curated in one process: what the killed runs must give."""
    out = tmp_path_factory.mktemp("few_single")
    run_curation(engine, [few], out, CFG, reasoner=engine, progress=False)
    return curation_outputs(out)


_outputs = curation_outputs


def _last_id(path: Path) -> str:
    return json.loads(Path(path).read_text().splitlines()[-1])["id"]  # in the last batch


def test_a_local_cluster_listens_on_loopback_only(cluster):
    """Every socket Ray opened, its actors' servers included (seen from inside two running actors), is on 127.0.0.1
    (Ray's processes' and this driver's listening sockets: the other test worker's are not Ray's)."""
    from bimode.compat.ray_api import node_addresses

    probe = SocketProbe(driver_pid=os.getpid())
    seen = [sockets for _, sockets in RayPool(probe, "local", num_workers=2).imap([(0, None), (1, None)])]
    opened = set().union(*seen) - cluster
    assert len(opened) > 4, f"Ray opened {sorted(opened)}: too few for its servers and two actors"
    assert {address for address, _ in opened} == {"127.0.0.1"}, sorted(opened)
    assert node_addresses() == ["127.0.0.1"]


def test_ray_curation_on_two_workers_cut_off_midway_resumes_to_the_one_process_output(cluster, engine, trained_tiny,
                                                                                      inputs, tmp_path):
    """Two actors curate until a batch fails (as a kill leaves a run), the same command resumes without redoing a
    finished batch, and the files equal one process's: every batch, whichever run and actor made it, labels alike."""
    worker = CurateWorker(CFG, annotator=str(trained_tiny), reasoner=str(trained_tiny))
    last = json.loads(Path(inputs).read_text().splitlines()[-1])["id"]  # in the last batch
    with pytest.raises(RuntimeError, match=f"cut off at {last}") as error:  # a bug: raised as itself
        run_curation(None, [inputs], tmp_path / "ray", CFG, progress=False,
                     pool=RayPool(FailingOn(worker, last), "local", num_workers=2))
    actor = error.value.__cause__  # the actor's traceback, shown above the driver's
    assert isinstance(actor, RemoteTraceback) and "ray_helpers.py" in str(actor), str(actor)
    finished = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert finished and 4 not in finished
    # resumed with the batches handed to Ray two at a time: the driver's stream goes out in windows (each on actors
    # of its own), and the windows' results join as one run's
    run_curation(None, [inputs], tmp_path / "ray", CFG, progress=False,
                 pool=RayPool(worker, "local", num_workers=2, window=2))
    batches = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert batches[:len(finished)] == finished and sorted(batches) == list(range(5))  # each batch ran once
    run_curation(engine, [inputs], tmp_path / "single", CFG, reasoner=engine, progress=False)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "single")
    curated = [json.loads(line) for line in (tmp_path / "ray" / "curated.jsonl").read_text().splitlines()]
    assert {row["mode"] for row in curated} == {"think", "no_think"}  # both labels: the comparison means something


def test_a_user_mistake_on_an_actor_is_the_one_error_line_one_process_gives(cluster, inputs, tmp_path, capsys):
    """An annotator directory that is not there, found by the actor that builds the annotator: `error:` and exit 2,
    worded as when this process finds it."""
    from bimode.cli import main

    curate = ["curate", "--input", str(inputs), "--annotator", str(tmp_path / "no_model")]
    assert main(curate + ["--out", str(tmp_path / "single")]) == 2
    single = capsys.readouterr().err.splitlines()[-1]
    assert main(curate + ["--out", str(tmp_path / "ray"), "--ray_address", "local"]) == 2
    ray = capsys.readouterr().err.splitlines()[-1]  # after the progress bar: this run asked the actor for batches
    assert ray == single and single.startswith("error: ") and "no_model" in single, (ray, single)


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
    from bimode.eval.report import write_report

    ray_metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert ray_metrics == json.loads(json.dumps(write_report(single, tmp_path / "single")))


def test_an_actor_killed_mid_curation_is_restarted_and_the_run_equals_one_process(cluster, trained_tiny, few,
                                                                                 few_single, tmp_path):
    """The actor running the last batch is SIGKILLed once, on the batch's first try, after another batch is logged:
    Ray restarts it, the batch runs again there, and the files are one process's, every batch logged once."""
    worker = CurateWorker(CFG, annotator=str(trained_tiny), reasoner=str(trained_tiny))
    killed = KilledOn(worker, _last_id(few), str(tmp_path / "ray" / "batches.jsonl"), str(tmp_path / "killed"))
    run_curation(None, [few], tmp_path / "ray", CFG, progress=False, pool=RayPool(killed, "local", num_workers=2))
    assert (tmp_path / "killed").exists()  # the kill happened
    batches = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert sorted(batches) == [0, 1, 2], batches  # each batch once: none lost, none twice
    assert _outputs(tmp_path / "ray") == few_single


def test_an_actor_killed_mid_eval_is_restarted_and_the_samples_equal_one_process(cluster, engine, trained_tiny, few,
                                                                                tmp_path):
    """As for curation: the last batch's actor killed on its first try; samples.jsonl holds each (id, mode) once,
    as one process scores it."""
    cfg = EvalConfig(max_new_tokens=16, batch_size=3)
    killed = KilledOn(EvalWorker(cfg, str(trained_tiny)), _last_id(few), str(tmp_path / "ray" / "samples.jsonl"),
                      str(tmp_path / "killed"))
    run_eval(None, [few], tmp_path / "ray", cfg, progress=False, pool=RayPool(killed, "local", num_workers=2))
    assert (tmp_path / "killed").exists()
    ray = read_log(tmp_path / "ray" / "samples.jsonl")  # the log as written: a batch logged twice would show here
    single = read_samples(run_eval(engine, [few], tmp_path / "single", cfg, progress=False))
    key = lambda r: (r["bench"], r["id"], r["mode"])  # noqa: E731
    assert len({key(r) for r in ray}) == len(ray) == len(single) == 27
    assert sorted(ray, key=key) == sorted(single, key=key)


def test_a_curation_whose_actor_dies_on_every_try_stops_with_the_resume_hint_and_resumes(
        cluster, trained_tiny, few, few_single, tmp_path, monkeypatch):
    """`bimode curate` on 2 actors where the last batch kills its actor on every try: past the restarts the command
    stops with an error that says so and the resume hint, the batches finished before it are in the log, and the same
    command without the killer resumes them (none redone) to one process's files."""
    from bimode.cli import main
    from bimode.parallel.pool import RESTARTS

    kill, log = _last_id(few), str(tmp_path / "ray" / "batches.jsonl")
    monkeypatch.setattr("bimode.commands.curate.make_pool",
                        lambda worker, cluster: RayPool(KilledOn(worker, kill, log), "local", cluster.num_workers))
    curate = ["curate", "--input", str(few), "--out", str(tmp_path / "ray"), "--annotator", str(trained_tiny),
              "--reasoner", str(trained_tiny), "--annotator_name", "tiny", "--n_samples", "3", "--batch_size", "3",
              "--max_new_tokens", "8", "--temperature", "1.0", "--ray_address", "local", "--num_workers", "2"]
    with pytest.raises(WorkerFailed, match=f"died .* more than the {RESTARTS} restarts") as error:
        main(curate)
    assert "run the same command to resume" in " ".join(getattr(error.value, "__notes__", [])), error.value
    finished = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert finished and 2 not in finished, finished  # what finished before is on disk
    monkeypatch.undo()  # the same command, no killer
    assert main(curate) == 0
    batches = [entry["batch"] for entry in read_log(tmp_path / "ray" / "batches.jsonl")]
    assert batches[:len(finished)] == finished and sorted(batches) == [0, 1, 2]  # none redone, none lost
    assert _outputs(tmp_path / "ray") == few_single


def test_an_eval_whose_actor_dies_on_every_try_stops_with_the_resume_hint_and_resumes(cluster, engine, trained_tiny,
                                                                                      few, tmp_path, monkeypatch):
    """As for curation, with `bimode eval`: the last batch kills its actor on every try; the command stops with the
    resume hint, the samples scored before are in samples.jsonl, and the same command without the killer scores the
    rest, each (id, mode) once, as one process scores them."""
    from bimode.cli import main
    from bimode.parallel.pool import RESTARTS

    kill, log = _last_id(few), str(tmp_path / "ray" / "samples.jsonl")
    monkeypatch.setattr("bimode.commands.eval.make_pool",
                        lambda worker, cluster: RayPool(KilledOn(worker, kill, log), "local", cluster.num_workers))
    evaluate = ["eval", str(trained_tiny), "--bench", str(few), "--out", str(tmp_path / "ray"), "--max_new_tokens",
                "16", "--batch_size", "3", "--ray_address", "local", "--num_workers", "2"]
    with pytest.raises(WorkerFailed, match=f"died .* more than the {RESTARTS} restarts") as error:
        main(evaluate)
    assert "run the same command to resume" in " ".join(getattr(error.value, "__notes__", [])), error.value
    scored = read_log(tmp_path / "ray" / "samples.jsonl")
    assert scored and kill not in {row["id"] for row in scored}  # what finished before is on disk
    monkeypatch.undo()  # the same command, no killer
    assert main(evaluate) == 0
    ray = read_log(tmp_path / "ray" / "samples.jsonl")
    assert ray[:len(scored)] == scored  # none redone
    single = read_samples(run_eval(engine, [few], tmp_path / "single", EvalConfig(max_new_tokens=16, batch_size=3),
                                   progress=False))
    key = lambda r: (r["bench"], r["id"], r["mode"])  # noqa: E731
    assert len({key(r) for r in ray}) == len(ray) == len(single) == 27  # none lost, none twice
    assert sorted(ray, key=key) == sorted(single, key=key)
