"""The rejects shared by curation and eval, as pure functions."""


from PIL import Image

from bimode.data.records import Record, RecordError, iter_records
from bimode.data.records import iter_numbered_records as numbered_records
from bimode.data.rejects import from_error, image_error, read_rejects, reject, write_rejects


def test_shape_and_names():
    row = reject("why", file="a/b.jsonl", row=3, field="images", id="x", bench="b")
    assert row == {"file": "a/b.jsonl", "row": 3, "field": "images", "id": "x", "reason": "why", "bench": "b"}
    error = from_error(RecordError("bad", "data/in.jsonl", 9, "question"))
    assert (error["id"], error["file"], error["row"], error["field"]) == ("in.jsonl:row9", "data/in.jsonl", 9, "question")
    assert error["reason"] == "file data/in.jsonl, row 9, field 'question': bad"


def test_image_error(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert image_error(Record(id="a", question="q", images=[str(tmp_path / "ok.png")])) is None
    assert "image file not found" in image_error(Record(id="a", question="q", images=[str(tmp_path / "no.png")]))
    assert "cannot decode image" in image_error(Record(id="a", question="q", images=[str(tmp_path / "bad.png")]))


def test_written_once_read_past_a_cut_line(tmp_path):
    path = tmp_path / "rejects.jsonl"
    rows = [reject("r1", id="a"), reject("r2", id="b", row=2)]
    assert write_rejects(path, rows + rows) == rows  # found twice (a re-run), listed once
    assert read_rejects(path) == rows
    path.write_text(path.read_text() + '{"id": "c", "rea')  # a kill mid-line
    assert read_rejects(path) == rows and read_rejects(tmp_path / "none.jsonl") == []


def test_numbered_records_are_iter_records_with_their_rows(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "question": "q"}\n\n{"id": "b", "question": 3}\n{broken\n{"id": "c", "question": "q"}\n')
    errors = []
    numbered = list(numbered_records(path, on_error=errors.append))
    assert [(row, r.id) for row, r in numbered] == [(1, "a"), (5, "c")]
    assert [r for _, r in numbered] == list(iter_records(path, on_error=lambda e: None))
    assert [(e.row, e.field) for e in errors] == [(3, "question"), (4, None)]
