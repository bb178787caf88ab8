"""The curation and eval driver reads its inputs as a stream (issue 39, item 5): duplicates found by MinHash LSH on a
disk index give the every-pair comparison's verdicts, batches go out before the input is read to its end, and the
driver's memory does not grow with the row count (bench/driver_memory.py measures it at millions of rows)."""

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from bimode.curate.dedup import DuplicateFinder, jaccard, normalize, shingles
from bimode.curate.pipeline import CurateConfig, run_curation
from bimode.disk_index import DiskIndex
from bimode.eval.runner import EvalConfig, run_eval
from bimode.io import append_log
from bimode.parallel.batch_log import BatchLog, ids_hash
from bimode.parallel.pool import LocalPool


def every_pair_duplicates(questions: list[str], threshold: float) -> dict[int, int]:
    """The driver's rule before it streamed: each question against every earlier kept one, in order."""
    kept: list[tuple[int, str, set]] = []
    found = {}
    for i, question in enumerate(questions):
        text = normalize(question)
        mine = shingles(text)
        first = next((j for j, other_text, other in kept if other_text == text or jaccard(mine, other) >= threshold),
                     None)
        if first is None:
            kept.append((i, text, mine))
        else:
            found[i] = first
    return found


def varied_questions(count: int, seed: int = 0) -> list[str]:
    """Questions from a small vocabulary, a third of them edits of an earlier one (a word added, dropped, swapped,
    case and punctuation changed): pairs on both sides of every threshold tested."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    questions: list[str] = []
    for _ in range(count):
        if questions and rng.random() < 0.35:
            base = rng.choice(questions).split()
            edit = rng.choice(["add", "drop", "swap", "case"])
            if edit == "add":
                base.insert(rng.randrange(len(base) + 1), rng.choice(words))
            elif edit == "drop" and len(base) > 3:
                base.pop(rng.randrange(len(base)))
            elif edit == "swap":
                base[rng.randrange(len(base))] = rng.choice(words)
            questions.append(" ".join(base).upper() + "?!" if edit == "case" else " ".join(base))
        else:
            questions.append(" ".join(rng.choices(words, k=rng.randint(4, 24))))
    return questions


def lsh_duplicates(questions: list[str], threshold: float) -> dict[int, int]:
    finder = DuplicateFinder(threshold)
    return {i: int(first) for i, q in enumerate(questions) if (first := finder.check(str(i), "no images", q)) is not None}


@pytest.mark.parametrize("threshold", [0.95, 0.9, 0.8])
def test_lsh_duplicates_are_the_every_pair_comparisons(threshold):
    questions = varied_questions(600)
    expected = every_pair_duplicates(questions, threshold)
    assert lsh_duplicates(questions, threshold) == expected
    assert 0 < len(expected) < len(questions) / 2  # both verdicts met: the comparison means something


@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_below_08_lsh_misses_a_few_pairs_and_finds_no_false_one(threshold):
    """One band row a band at these thresholds (bimode.curate.dedup.bands_for), and a band remembers the first row
    that had it: a few near-duplicates of later rows are missed (measured here: 3 to 5%); every one found is one."""
    questions = varied_questions(600)
    expected, found = every_pair_duplicates(questions, threshold), lsh_duplicates(questions, threshold)
    normalized = [shingles(normalize(q)) for q in questions]
    assert all(jaccard(normalized[i], normalized[first]) >= threshold for i, first in found.items())
    assert set(found) <= set(expected) and len(found) >= 0.93 * len(expected), (len(found), len(expected))


def test_images_and_the_exact_only_setting():
    finder = DuplicateFinder(1.5)  # above 1: exact duplicates only
    assert finder.check("a", "img1", "How many red cells?") is None
    assert finder.check("b", "img1", "how many RED cells") == "a"
    assert finder.check("c", "img2", "How many red cells?") is None  # other images: not a duplicate
    assert finder.check("d", "img1", "How many red cells here?") is None  # near, but only exact ones count
    with pytest.raises(ValueError, match="above 0"):
        DuplicateFinder(0)
    for bad in (0.0, -0.5):  # the config refuses it before any row is read, naming the field
        with pytest.raises(ValueError, match=f"near_duplicate_threshold must be above 0 .* got {bad}"):
            CurateConfig(near_duplicate_threshold=bad)
    assert CurateConfig(near_duplicate_threshold=1.5).near_duplicate_threshold == 1.5


def test_the_batch_log_index_reads_entries_back_in_batch_order(tmp_path):
    log = tmp_path / "batches.jsonl"
    append_log(log, [{"batch": 2, "ids": ["e", "f"], "rows": "2 first"}, {"batch": 0, "ids": ["a", "b"], "rows": "0"}])
    append_log(log, [{"batch": 2, "ids": ["e", "f"], "rows": "2 again"}])  # redone after a kill: the last counts
    with open(log, "a") as fh:
        fh.write('{"batch": 1, "ids": ["c"')  # cut by a kill: not finished
    with DiskIndex(tmp_path / "index.sqlite") as index:
        batches = BatchLog(index)
        batches.scan(log)
        assert [entry["rows"] for entry in batches.entries()] == ["0", "2 again"]
        assert batches.ids_hash(0) == ids_hash(["a", "b"]) and batches.ids_hash(1) is None and batches.last() == 2
        with pytest.raises(ValueError, match="batch 2"):
            BatchLog(index).scan(log, owns=lambda batch: batch % 2 == 1)
    assert not (tmp_path / "index.sqlite").exists()  # scratch: gone when the run ends


def write_rows(path: Path, count: int, bad_last: bool = False) -> Path:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(count):
            question = " ".join(f"w{rng.randrange(5000)}" for _ in range(16))
            fh.write(json.dumps({"id": f"r{i}", "question": question, "answer": "1", "answer_type": "numeric"}) + "\n")
        if bad_last:
            fh.write("{not json\n")
    return path


class StopAtFirstBatch(Exception):
    pass


def test_batches_go_out_before_the_input_is_read_to_its_end(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", 64, bad_last=True)

    def first_batch_only(records):
        raise StopAtFirstBatch

    with pytest.raises(StopAtFirstBatch):
        run_curation(None, [rows], tmp_path / "out", CurateConfig(batch_size=8), progress=False,
                     pool=LocalPool(first_batch_only))
    assert (tmp_path / "out" / "input_rejects.jsonl").read_text() == ""  # the bad last row was not read yet
    summary = run_curation(None, [rows], tmp_path / "out", CurateConfig(batch_size=8), progress=False,
                           pool=LocalPool(lambda records: ([], [])))
    assert summary["total"]["rejected"] == 1  # read to the end, it is found
    assert not (tmp_path / "out" / ".curate_index.sqlite").exists()


def python_peak(run) -> int:
    """Peak bytes Python allocated while `run()` ran (SQLite's page cache, bounded, is not Python's)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("stage", ["curate", "eval"])
def test_the_drivers_memory_does_not_grow_with_the_row_count(tmp_path, stage):
    """Eight times the rows, the same peak: well under the 40 bytes a row that even a list of ids would cost (the
    driver before issue 39 held every record: about 800 bytes a row, bench/RESULTS.md)."""
    def run(rows: int):
        path = write_rows(tmp_path / f"{stage}{rows}.jsonl", rows)
        out = tmp_path / f"{stage}{rows}"
        if stage == "curate":
            return lambda: run_curation(None, [path], out, CurateConfig(batch_size=16), progress=False,
                                        pool=LocalPool(lambda records: ([], [])))
        return lambda: run_eval(None, [path], out, EvalConfig(modes=["no_think"], batch_size=16), progress=False,
                                pool=LocalPool(lambda chunk: []))

    small, large = 1000, 8000
    growth = python_peak(run(large)) - python_peak(run(small))
    assert growth < 40 * (large - small), f"{growth / (large - small):.0f} bytes a row"
