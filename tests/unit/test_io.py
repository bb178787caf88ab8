"""bimode.io: atomic rewrites and the resumable JSONL logs of curation and evaluation."""

from bimode.io import append_log, atomic_write_text, read_log, write_jsonl


def test_a_cut_last_line_is_skipped_and_ended_before_the_next_append(tmp_path):
    log = tmp_path / "log.jsonl"
    append_log(log, [{"batch": 0}])
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"batch": 1, "rows": [1, 2')  # killed mid-write
    assert read_log(log) == [{"batch": 0}]
    append_log(log, [{"batch": 1}, {"batch": 2}])
    assert read_log(log) == [{"batch": 0}, {"batch": 1}, {"batch": 2}]
    assert log.read_text(encoding="utf-8").count("\n") == 4  # the cut line stays, ended, and is skipped


def test_missing_or_empty_logs_read_as_nothing(tmp_path):
    assert read_log(tmp_path / "none.jsonl") == []
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    assert read_log(tmp_path / "empty.jsonl") == []
    append_log(tmp_path / "new.jsonl", [{"a": "é"}])
    assert read_log(tmp_path / "new.jsonl") == [{"a": "é"}]


def test_atomic_writes_replace_the_whole_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_text(path, "old\n")
    write_jsonl(path, [{"x": 1}, {"y": 2}])
    assert read_log(path) == [{"x": 1}, {"y": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_samples_file_without_its_keys_is_refused_naming_file_row_and_field(tmp_path):
    import pytest

    from bimode.eval.runner import read_samples

    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [{"bench": "b", "id": "1", "mode": "think"}, {"bench": "b", "mode": "think"}])
    with pytest.raises(ValueError, match=r"samples.jsonl: sample 2 has no 'id' field"):
        read_samples(path)
