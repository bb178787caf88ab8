"""Curation and evaluation split into shards and merged, and several endpoints as one annotator: the same files as
one process (docs/cluster.md); what a batch raises, as the command shows it. The Ray pool is tested in
tests/integration/test_ray.py."""

import json
import os

import pytest

from bimode.curate import CurateConfig, run_curation
from bimode.curate.pipeline import merge_curation
from bimode.errors import OutputExistsError, UsageError
from bimode.eval.report import write_report
from bimode.eval.runner import EvalConfig, merge_eval, read_samples, run_eval
from bimode.parallel.shards import Shard
from bimode.serve.app import create_app
from tests.helpers.servers import free_port, serve_in_thread
from tests.helpers.eval_helpers import curation_outputs, write_curation_pool

CFG = CurateConfig(n_samples=3, batch_size=4, max_new_tokens=8, temperature=1.0, annotator_name="tiny")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """18 records (some repeat: duplicates), 6 without a trace of their own, and a row that cannot be read."""
    return write_curation_pool(tmp_path_factory.mktemp("inputs") / "train.jsonl", 18, 6, unreadable_row=True)


_files = curation_outputs


def _shards(engine, inputs, root, count, cfg=CFG):
    folders = [root / f"shard{i}" for i in range(count)]
    for i, folder in enumerate(folders):
        run_curation(engine, [inputs], folder, cfg, reasoner=engine, progress=False, shard=Shard(i, count),
                     identity={"annotator": "tiny"})
    return folders


def test_sharded_curation_merges_into_the_single_run(engine, inputs, tmp_path):
    run_curation(engine, [inputs], tmp_path / "single", CFG, reasoner=engine, progress=False)
    folders = _shards(engine, inputs, tmp_path, 3)
    merge_curation(folders, tmp_path / "merged")
    single, merged = _files(tmp_path / "single"), _files(tmp_path / "merged")
    assert merged == single  # byte for byte, rows in the same order
    curated = [json.loads(line) for line in single[0].splitlines()]
    assert {r["mode"] for r in curated} == {"think", "no_think"}  # both labels occur: the comparison means something
    rejects = [json.loads(line) for line in single[1].splitlines()]
    assert [r["row"] for r in rejects if r.get("row")] == [19]  # the unreadable row, once
    assert sum(r["reason"].startswith("duplicate of") for r in rejects) == 1
    for row in curated:
        for image in row["images"]:
            assert (tmp_path / "merged" / image).is_file()


def test_merge_refuses_missing_repeated_foreign_and_unfinished_shards(engine, inputs, tmp_path):
    folders = _shards(engine, inputs, tmp_path, 2)
    other = _shards(engine, inputs, tmp_path / "other", 2, cfg=CurateConfig(**{**CFG.__dict__, "seed": 1}))
    cases = {
        "shard 1 of 2 missing": [folders[0]],
        "shard 0 given twice": [folders[0], folders[0], folders[1]],
        "a shard of another run": [folders[0], other[1]],
    }
    for message, given in cases.items():
        with pytest.raises(UsageError, match=message):
            merge_curation(given, tmp_path / "merged")
    manifest = json.loads((folders[1] / "shard.json").read_text())
    (folders[1] / "shard.json").write_text(json.dumps({**manifest, "finished": False}))
    with pytest.raises(UsageError, match=f"{folders[1]}: shard 1 did not finish"):
        merge_curation(folders, tmp_path / "merged")
    with pytest.raises(OutputExistsError, match="another run"):  # a shard folder resumed by another run's command
        run_curation(engine, [inputs], folders[0], CurateConfig(**{**CFG.__dict__, "seed": 1}), progress=False,
                     shard=Shard(0, 2), identity={"annotator": "tiny"})


def test_sharded_eval_merges_into_the_single_run(engine, inputs, tmp_path):
    cfg = EvalConfig(max_new_tokens=16, batch_size=4)
    single = read_samples(run_eval(engine, [inputs], tmp_path / "single", cfg, progress=False))
    folders = [tmp_path / f"shard{i}" for i in range(2)]
    for i, folder in enumerate(folders):
        run_eval(engine, [inputs], folder, cfg, progress=False, shard=Shard(i, 2), identity={"model": "tiny"})
    assert 0 < len(read_samples(folders[0] / "samples.jsonl")) < len(single)  # each shard did a part
    merged = read_samples(merge_eval(folders, tmp_path / "merged"))
    key = lambda r: (r["bench"], r["id"], r["mode"])  # noqa: E731
    assert sorted(merged, key=key) == sorted(single, key=key) and len(single) == 3 * 18
    assert (tmp_path / "merged" / "rejects.jsonl").read_text() == (tmp_path / "single" / "rejects.jsonl").read_text()
    assert write_report(merged, tmp_path / "merged") == write_report(single, tmp_path / "single")
    with pytest.raises(UsageError, match="shard 1 of 2 missing"):
        merge_eval(folders[:1], tmp_path / "again")


def test_several_endpoints_share_requests_and_fail_over(engine, inputs, tmp_path):
    """Two servers of the model and one that never answers: the same curation as one server gives, and when a
    server stops, the other takes its requests; with none left the error names every endpoint."""
    from bimode.generation.backends import build_backend
    from bimode.generation.openai_backend import EndpointError

    servers = [serve_in_thread(create_app(engine, "tiny")) for _ in range(2)]
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        one = build_backend(servers[0][0], concurrency=1)
        run_curation(one, [inputs], tmp_path / "one", CFG, progress=False)
        pooled = build_backend([dead, servers[0][0], servers[1][0]], concurrency=1, timeout_s=5)
        for endpoint in pooled.endpoints:
            endpoint.retries, endpoint.backoff_s = 1, 0.01
        run_curation(pooled, [inputs], tmp_path / "pooled", CFG, progress=False)
        assert _files(tmp_path / "pooled") == _files(tmp_path / "one")
        servers[0][1]()  # the first server stops
        run_curation(pooled, [inputs], tmp_path / "after", CFG, progress=False, overwrite=True)
        assert _files(tmp_path / "after") == _files(tmp_path / "one")
        assert pooled.resting_until(pooled.base_urls[1]) > 0.0  # the stopped server was set aside
        servers[1][1]()
        pooled.end_rests()  # every endpoint is tried again, and none answers
        with pytest.raises(EndpointError, match="no endpoint answered") as error:
            run_curation(pooled, [inputs], tmp_path / "none", CFG, progress=False)
        assert all(url in str(error.value) for url in (dead, servers[0][0], servers[1][0]))
    finally:
        for _, stop in servers:
            stop()


def test_the_commands_run_shards_and_merge_them(trained_tiny, inputs, tmp_path, capsys):
    """`bimode curate --num_shards 2 --shard_index i`, `bimode curate merge`, and the same for eval, as typed."""
    from bimode.cli import main

    curate = ["curate", "--input", str(inputs), "--annotator", str(trained_tiny), "--n_samples", "2",
              "--max_new_tokens", "8", "--batch_size", "5"]
    assert main(curate + ["--out", str(tmp_path / "single")]) == 0
    for i in range(2):
        assert main(curate + ["--out", str(tmp_path / f"c{i}"), "--num_shards", "2", "--shard_index", str(i)]) == 0
    assert "bimode curate merge" in capsys.readouterr().out  # what to do once every shard has finished
    assert main(["curate", "merge", str(tmp_path / "c1"), "--out", str(tmp_path / "merged")]) == 2
    assert "shard 0 of 2 missing" in capsys.readouterr().err  # one line naming it
    assert main(["curate", "merge", str(tmp_path / "c0"), str(tmp_path / "c1"), "--out", str(tmp_path / "merged")]) == 0
    assert _files(tmp_path / "merged") == _files(tmp_path / "single")

    evaluate = ["eval", str(trained_tiny), "--bench", str(inputs), "--max_new_tokens", "8", "--batch_size", "5",
                "--modes", "no_think"]
    for i in range(2):
        assert main(evaluate + ["--out", str(tmp_path / f"e{i}"), "--num_shards", "2", "--shard_index", str(i)]) == 0
    assert main(["eval", "merge", str(tmp_path / "e0"), str(tmp_path / "e1"), "--out", str(tmp_path / "eval")]) == 0
    assert main(evaluate + ["--out", str(tmp_path / "eval_single")]) == 0
    metrics = lambda d: json.loads((tmp_path / d / "metrics.json").read_text())["overall"]  # noqa: E731
    assert metrics("eval") == metrics("eval_single")
    assert main(["curate", "--input", str(inputs), "--out", str(tmp_path / "x"), "--annotator", "m",
                 "--num_workers", "2"]) == 2
    assert "needs --ray_address" in capsys.readouterr().err


def _curate_raising(exc, inputs, tmp_path, monkeypatch) -> int:
    """`bimode curate` in this process, every batch raising `exc` (the annotator is never asked)."""
    import bimode.curate.pipeline
    import bimode.generation.backends
    from bimode.cli import main

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(bimode.generation.backends, "build_backend", lambda spec, **options: spec)
    monkeypatch.setattr(bimode.curate.pipeline, "curate_batch", fail)
    return main(["curate", "--input", str(inputs), "--out", str(tmp_path / "out"), "--annotator", "m"])


def test_a_user_mistake_in_a_batch_is_one_error_line(inputs, tmp_path, monkeypatch, capsys):
    from bimode.data.records import RecordError

    mistake = RecordError("no gold answer", "train.jsonl", 3, "answer")
    assert _curate_raising(mistake, inputs, tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err.splitlines()  # the progress bar, then the error
    assert err[-1] == f"error: {mistake}" and sum(line.startswith("error:") for line in err) == 1, err


def test_a_bug_in_a_batch_keeps_its_traceback(inputs, tmp_path, monkeypatch):
    """Not the user's mistake: the command lets it go, so `bimode` shows the traceback and exits 1."""
    with pytest.raises(KeyError, match="a bug"):
        _curate_raising(KeyError("a bug"), inputs, tmp_path, monkeypatch)


class Unbuildable(UsageError):
    """An exception that pickles but does not unpickle: its __init__ needs more than the one message pickle keeps."""

    def __init__(self, path, row):
        super().__init__(f"{path}: row {row} is bad")


class UnbuildableBug(RuntimeError):
    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


def test_what_an_actor_raises_comes_back_as_itself_or_by_its_words():
    """Ray's path without Ray: a Failure pickled as an actor sends it, raised in the driver."""
    import pickle

    from bimode.data.records import RecordError
    from bimode.parallel.failures import Failure, RemoteTraceback, WorkerFailed

    def raised(exc):
        try:
            raise exc
        except Exception as caught:
            failure = pickle.loads(pickle.dumps(Failure.of(caught)))
        with pytest.raises(Exception) as error:
            failure.raise_here(7)
        assert isinstance(error.value.__cause__, RemoteTraceback) and "raised" in str(error.value.__cause__)
        return error.value

    back = raised(RecordError("no gold answer", "train.jsonl", 3, "answer"))
    assert type(back) is RecordError and (back.path, back.row, back.field) == ("train.jsonl", 3, "answer")
    back = raised(Unbuildable("train.jsonl", 3))
    assert type(back) is UsageError and str(back) == "train.jsonl: row 3 is bad"
    back = raised(UnbuildableBug("a bug", "step 2"))
    assert type(back) is WorkerFailed and str(back).endswith("batch 7 failed on a Ray worker (pid %d): "
                                                              "UnbuildableBug: a bug at step 2" % os.getpid())
