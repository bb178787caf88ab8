import json
from pathlib import Path

import pytest
from PIL import Image

from bimode.data import synthetic
from bimode.data.records import Record, RecordError, read_records, to_pil, write_records

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _samples(n=12):
    return [s.to_record() for s in synthetic.generate(n, seed=5)]


def _same(a: Record, b: Record):
    assert (a.id, a.question, a.answer, a.answer_type, a.reasoning, a.choices, a.family, a.level, a.domain,
            a.meta) == (b.id, b.question, b.answer, b.answer_type, b.reasoning, b.choices, b.family, b.level,
                        b.domain, b.meta)
    assert [to_pil(x).tobytes() for x in a.images] == [to_pil(x).tobytes() for x in b.images]


@pytest.mark.parametrize("name", ["data.jsonl", "data.parquet", "dataset_dir"])
def test_round_trip_every_format(tmp_path, name):
    records = _samples()
    records[0].meta = {"source": "unit", "pass_count": 3}
    path = write_records(records, tmp_path / name)
    back = read_records(path)
    assert len(back) == len(records)
    for a, b in zip(records, back):
        _same(a, b)


def test_jsonl_images_are_files_next_to_the_data(tmp_path):
    path = write_records(_samples(3), tmp_path / "d.jsonl")
    row = json.loads(path.read_text().splitlines()[0])
    assert not Path(row["images"][0]).is_absolute()
    assert (tmp_path / row["images"][0]).exists()


def test_no_silent_overwrite(tmp_path):
    write_records(_samples(2), tmp_path / "d.jsonl")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_records(_samples(2), tmp_path / "d.jsonl")
    write_records(_samples(3), tmp_path / "d.jsonl", overwrite=True)
    assert len(read_records(tmp_path / "d.jsonl")) == 3


@pytest.mark.parametrize("row, field, message", [
    ({"id": "", "question": "q"}, "id", "missing id"),
    ({"id": "a"}, "question", "missing question"),
    ({"id": "a", "question": 5}, "question", "expected str"),
    ({"id": "a", "question": "q", "level": "hard"}, "level", "expected int"),
    ({"id": "a", "question": "q", "answer_type": "essay"}, "answer_type", "unknown answer_type"),
    ({"id": "a", "question": "q", "mode": "medium"}, "mode", "unknown mode"),
    ({"id": "a", "question": "<image><image>q", "images": ["x.png"]}, "question", "2 <image> markers"),
    ({"id": "a", "question": "q", "images": [3]}, "images", "image 0"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, message):
    path = tmp_path / "bad.jsonl"
    good = {"id": "ok", "question": "fine", "answer": "1"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError) as info:
        read_records(path)
    err = info.value
    assert (err.path, err.row, err.field) == (path, 2, field)
    assert message in str(err) and str(path) in str(err) and "row 2" in str(err)


def test_invalid_json_line_is_reported_with_its_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "question": "q"}\n{"id": \n')
    with pytest.raises(RecordError, match="row 2: invalid JSON"):
        read_records(path)


def test_undecodable_image_names_what_failed(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "<image>q", "images": ["broken.png"]}) + "\n")
    record = read_records(path)[0]  # decoding is lazy: reading the rows stays cheap
    with pytest.raises(ValueError, match="cannot decode image"):
        record.load_images()
    with pytest.raises(ValueError, match="not found"):
        to_pil(str(tmp_path / "missing.png"))


def test_plain_benchmark_json_reads_as_records():
    math = read_records(BENCHMARKS / "math500.json")
    gsm = read_records(BENCHMARKS / "gsm8k_test.json")
    assert len(math) == 500 and len(gsm) == 1319
    assert math[0].id == "test/precalculus/807.json" and math[0].level == 2 and math[0].answer
    assert gsm[0].id == "gsm8k_test-1" and gsm[0].answer == "18" and gsm[0].question.startswith("Janet")


def test_messages_place_images_at_markers_or_first():
    image = Image.new("RGB", (4, 4))
    marked = Record(id="a", question="left <image> right", images=[image])
    assert marked.messages()[0]["content"] == [
        {"type": "text", "text": "left "}, {"type": "image"}, {"type": "text", "text": " right"}]
    unmarked = Record(id="b", question="what?", images=[image, image], system="sys")
    messages = unmarked.messages(with_target="no_think")
    assert messages[0] == {"role": "system", "content": "sys"}
    assert [p["type"] for p in messages[1]["content"]] == ["image", "image", "text"]
    assert messages[2] == {"role": "assistant", "content": "", "reasoning_content": ""}
    with pytest.raises(RecordError, match="needs a reasoning trace"):
        unmarked.messages(with_target="think")
