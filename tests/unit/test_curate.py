"""Curation end to end with real parts: the tiny model as local annotator and `bimode serve` as endpoint."""

import json

import pytest

from bimode.curate import CurateConfig, run_curation
from bimode.data import synthetic
from bimode.curate.heuristics import performance_label
from bimode.data.records import read_records, write_records
from bimode.io import read_log
from bimode.serve.app import create_app
from tests.helpers.servers import serve_in_thread
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

CFG = CurateConfig(n_samples=4, batch_size=6, max_new_tokens=8, annotator_name="tiny")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "train.jsonl"
    samples = synthetic.generate(24, seed=31, families=TRAINED_FAMILIES, max_level=TRAINED_MAX_LEVEL)
    records = [s.to_record() for s in samples]
    for r in records[:8]:
        r.reasoning = None  # no trace of its own: a thinking label needs the reasoner's
    write_records(records, path)
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_annotator_labels_by_k_of_n_and_fills_targets(engine, pool, tmp_path):
    summary = run_curation(engine, [pool], tmp_path, CFG, reasoner=engine, progress=False)
    curated = _rows(tmp_path / "curated.jsonl")
    rejects = _rows(tmp_path / "rejects.jsonl")
    assert len(curated) + len(rejects) == 24
    for row in curated:
        c = row["meta"]["curation"]
        assert c["heuristic"] == "performance" and c["n"] == 4 and c["annotator"] == "tiny"
        assert row["mode"] == performance_label(c["pass_count"], 4, 0) == c["mode"]
        if row["mode"] == "think":
            assert row["reasoning"] and c["trace_source"] in ("record", "generated")
            assert row["reasoning"].split()[-1] == row["answer"]  # verified traces end in the gold answer
        else:
            assert row["direct_answer"] == row["answer"]
    assert summary["total"]["curated"] == len(curated)
    assert sum(summary["by_domain"]["vision"].values()) == len(curated)
    assert (tmp_path / "summary.md").read_text().startswith("# Curation summary")
    assert read_records(tmp_path / "curated.jsonl")[0].load_images()  # images travel with the output


def test_endpoint_annotator_through_bimode_serve(engine, pool, tmp_path):
    from bimode.generation.openai_backend import OpenAIEndpointBackend

    base, stop = serve_in_thread(create_app(engine, "tiny"))
    try:
        backend = OpenAIEndpointBackend(base, concurrency=4)
        summary = run_curation(backend, [pool], tmp_path, CFG, progress=False)
    finally:
        stop()
    curated = _rows(tmp_path / "curated.jsonl")
    assert summary["total"]["curated"] == len(curated) > 0
    for row in curated:
        c = row["meta"]["curation"]
        assert row["mode"] == performance_label(c["pass_count"], 4, 0)
    # records without their own trace that were labelled thinking are rejected: no reasoner was given;
    # the pool also repeats a few glance questions (an empty grid is an empty grid): dropped as duplicates
    rejects = _rows(tmp_path / "rejects.jsonl")
    assert all(r["reason"] == "thinking label but no verified reasoning trace" or r["reason"].startswith("duplicate of")
               for r in rejects)


def test_open_ended_samples_use_the_judge(engine, tmp_path):
    path = tmp_path / "open.jsonl"
    write_records([synthetic.generate(1, families=["count"])[0].to_record()], path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i in range(3):
        rows.append({**rows[0], "id": f"open-{i}", "question": f"<image>\nDescribe the grid, view {i}.",
                     "answer": "", "answer_type": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    judge = tmp_path / "judge.txt"
    judge.write_text("Question: {question}\nAnswer REASONING or DIRECT.")
    run_curation(engine, [path], tmp_path / "out", CurateConfig(judge_prompt=str(judge), max_new_tokens=8), progress=False)
    curated = _rows(tmp_path / "out" / "curated.jsonl")
    rejects = _rows(tmp_path / "out" / "rejects.jsonl")
    assert len(curated) + len(rejects) == 3
    for row in curated + rejects:
        c = row.get("curation") or row["meta"]["curation"]
        assert c["heuristic"] == "difficulty" and c["verdict"] in ("think", "no_think", "unclear")
    assert all(r["reason"] in ("unclear judge verdict", "thinking label but no verified reasoning trace")
               for r in rejects)


class Dies:
    """A backend that fails after `after` generate calls: a run killed midway."""

    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def generate(self, *args, **kwargs):
        if self.after == 0:
            raise KeyboardInterrupt("killed")
        self.after -= 1
        return self.inner.generate(*args, **kwargs)


def test_killed_run_resumes_to_the_same_output(engine, pool, tmp_path):
    run_curation(engine, [pool], tmp_path / "whole", CFG, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_curation(Dies(engine, after=2), [pool], tmp_path / "resumed", CFG, progress=False)
    lines = (tmp_path / "resumed" / "batches.jsonl").read_text().splitlines()
    assert len(lines) == 2  # two batches finished before the kill, nothing else written
    (tmp_path / "resumed" / "batches.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:30])  # cut line
    run_curation(engine, [pool], tmp_path / "resumed", CFG, progress=False)
    # the batch appended after the cut line did not fuse with it: a later resume finds every batch
    logged = [e["batch"] for e in read_log(tmp_path / "resumed" / "batches.jsonl")]
    assert sorted(logged) == [e["batch"] for e in read_log(tmp_path / "whole" / "batches.jsonl")]
    for name in ("curated.jsonl", "rejects.jsonl"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_curation(engine, [pool], tmp_path / "whole", CFG, progress=False)


def test_bad_rows_are_rejected_with_reasons_and_good_rows_all_curated(engine, tmp_path):
    good = [s.to_record() for s in synthetic.generate(4, seed=2, families=["count"])]
    path = tmp_path / "in.jsonl"
    write_records(good, path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad = [
        {"id": "missing-image", "question": "<image>q", "answer": "1", "images": ["nope.png"]},
        {"id": "undecodable", "question": "<image>q", "answer": "1", "images": ["broken.png"]},
        {"id": "no-answer", "question": "How many?", "answer_type": "numeric"},
        {"id": "too-long", "question": "x" * 9000, "answer": "1"},
        {"id": "wrong-type", "question": 42, "answer": "1"},
        {"id": "dup", "question": good[0].question, "answer": good[0].answer,
         "images": [json.loads(path.read_text().splitlines()[0])["images"][0]]},
    ]
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(b) + "\n" for b in bad) + "{broken json\n")
    run_curation(engine, [path], tmp_path / "out", CurateConfig(n_samples=2, max_new_tokens=8), progress=False)
    rows = _rows(tmp_path / "out" / "rejects.jsonl")
    rejects = {r["id"]: r["reason"] for r in rows}
    # the shape eval's rejects have (bimode.data.rejects): where (file, row, field where known), which, why
    by_id = {r["id"]: r for r in rows}
    assert all(set(r) >= {"file", "row", "field", "id", "reason"} for r in rows)
    assert (by_id["in.jsonl:row9"]["file"], by_id["in.jsonl:row9"]["row"], by_id["in.jsonl:row9"]["field"]) == (
        str(path), 9, "question")
    assert by_id["missing-image"]["field"] == by_id["undecodable"]["field"] == "images"
    assert by_id["missing-image"]["file"] == by_id["dup"]["file"] == str(path)
    assert "image file not found" in rejects["missing-image"]
    assert "cannot decode image" in rejects["undecodable"]
    assert rejects["no-answer"] == "missing answer on a verifiable sample"
    assert "longer than" in rejects["too-long"]
    assert "field 'question'" in rejects["in.jsonl:row9"] and "expected str" in rejects["in.jsonl:row9"]
    assert rejects["dup"] == f"duplicate of {good[0].id}"
    assert "invalid JSON" in rejects["in.jsonl:row11"]
    curated = {r["id"] for r in _rows(tmp_path / "out" / "curated.jsonl")}
    # every good row is curated (count answers have their own traces, so either label completes)
    assert curated == {r.id for r in good}
