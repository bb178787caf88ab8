"""The one sample schema every stage reads and writes, on disk as JSONL, Parquet or a saved HF dataset.

A record is one question (with its images) and what is known about answering it:

    id            unique string; outputs are keyed by it (resume, dedup)
    question      user text; `<image>` marks where each image goes (images without a marker go first)
    answer        gold answer, for verification ("" when unknown: open-ended samples)
    answer_type   "math" | "numeric" | "mc" | "text" | None (None: infer when scoring)
    images        list of images: a PIL image in memory; on disk a path relative to the data file,
                  or embedded bytes ({"bytes": ...} in Parquet/HF, {"base64": ...} in JSONL)
    reasoning     a step-by-step trace ending in the answer (the thinking target), or None
    direct_answer the non-thinking response text, or None (then `answer` is used)
    mode          the training target's mode, "think" | "no_think", or None (not curated yet)
    choices       option texts of a multiple-choice question, or None
    family, level, domain   what the sample is, for per-difficulty reports
    system        an optional system prompt
    meta          free-form provenance (curation pass counts, judge verdicts, sources)
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from bimode.errors import OutputExistsError, UsageError
from bimode.io import write_jsonl
from bimode.modes import ThinkingMode

ANSWER_TYPES = ("math", "numeric", "mc", "text")
TARGET_MODES = (ThinkingMode.THINK, ThinkingMode.NO_THINK)


class RecordError(UsageError):
    """A bad row: says which file, row and field, and what is wrong."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, row: int | None = None,
                 field_name: str | None = None):
        self.path, self.row, self.field = path, row, field_name
        where = ", ".join(p for p in (
            f"file {path}" if path is not None else "",
            f"row {row}" if row is not None else "",
            f"field '{field_name}'" if field_name else "",
        ) if p)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Record:
    id: str
    question: str
    answer: str = ""
    answer_type: str | None = None
    images: list[Any] = field(default_factory=list)
    reasoning: str | None = None
    direct_answer: str | None = None
    mode: str | None = None
    choices: list[str] | None = None
    family: str | None = None
    level: int | None = None
    domain: str | None = None
    system: str | None = None
    meta: dict = field(default_factory=dict)

    def messages(self, with_target: str | None = None) -> list[dict]:
        """Chat messages for the template; with_target ("think"/"no_think") appends the assistant turn."""
        content: list[dict] = []
        parts = self.question.split("<image>")
        n_markers = len(parts) - 1
        if n_markers not in (0, len(self.images)):
            raise RecordError(f"{n_markers} <image> markers for {len(self.images)} images", row=None,
                              field_name="question")
        if n_markers == 0:
            content += [{"type": "image"} for _ in self.images]
            content.append({"type": "text", "text": self.question})
        else:
            for i, part in enumerate(parts):
                if part:
                    content.append({"type": "text", "text": part})
                if i < n_markers:
                    content.append({"type": "image"})
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": content})
        if with_target is not None:
            messages.append(self.target_message(with_target))
        return messages

    def target_message(self, mode: str) -> dict:
        if mode == ThinkingMode.THINK:
            if not self.reasoning:
                raise RecordError("a thinking target needs a reasoning trace", field_name="reasoning")
            return {"role": "assistant", "content": self.answer, "reasoning_content": self.reasoning}
        if mode == ThinkingMode.NO_THINK:
            return {"role": "assistant", "content": self.direct_answer or self.answer, "reasoning_content": ""}
        raise RecordError(f"unknown target mode {mode!r}; expected one of {', '.join(TARGET_MODES)}", field_name="mode")

    def load_images(self) -> list[Image.Image]:
        return [to_pil(img) for img in self.images]


_FIELD_TYPES = {
    "id": (str,), "question": (str,), "answer": (str,), "answer_type": (str, type(None)),
    "images": (list,), "reasoning": (str, type(None)), "direct_answer": (str, type(None)),
    "mode": (str, type(None)), "choices": (list, type(None)), "family": (str, type(None)),
    "level": (int, type(None)), "domain": (str, type(None)), "system": (str, type(None)), "meta": (dict,),
}
RECORD_FIELDS = tuple(f.name for f in fields(Record))


def record_from_dict(row: Any, path=None, row_number: int | None = None, base_dir: Path | None = None) -> Record:
    """Validate one row and build a Record; image paths resolve against base_dir."""
    def fail(msg, name=None):
        raise RecordError(msg, path, row_number, name)

    if not isinstance(row, dict):
        fail(f"expected an object, got {type(row).__name__}")
    row = dict(row)
    if isinstance(row.get("answer"), (int, float)) and not isinstance(row.get("answer"), bool):
        row["answer"] = str(row["answer"])  # numeric gold answers (GSM8K-style JSON) are common
    if isinstance(row.get("level"), float) and float(row["level"]).is_integer():
        row["level"] = int(row["level"])
    if isinstance(row.get("meta"), str):  # Parquet/HF store meta as a JSON string (see _for_arrow)
        try:
            row["meta"] = json.loads(row["meta"])
        except json.JSONDecodeError:
            fail("meta is not valid JSON", "meta")
    if "id" not in row or row["id"] in (None, ""):
        fail("missing id", "id")
    row["id"] = str(row["id"])
    unknown = set(row) - set(RECORD_FIELDS)
    if unknown:
        row.setdefault("meta", {})
        row["meta"] = {**(row.get("meta") or {}), **{k: row.pop(k) for k in sorted(unknown)}}
    for name in RECORD_FIELDS:
        if name in row and row[name] is None and name in ("images", "meta"):
            row[name] = [] if name == "images" else {}
        if name in row and not isinstance(row[name], _FIELD_TYPES[name]) or name == "level" and isinstance(row.get(name), bool):
            fail(f"expected {' or '.join(t.__name__ for t in _FIELD_TYPES[name])}, got {type(row[name]).__name__}", name)
    if "question" not in row:
        fail("missing question", "question")
    if row.get("answer_type") is not None and row["answer_type"] not in ANSWER_TYPES:
        fail(f"unknown answer_type {row['answer_type']!r}; expected one of {ANSWER_TYPES}", "answer_type")
    if row.get("mode") is not None and row["mode"] not in TARGET_MODES:
        fail(f"unknown mode {row['mode']!r}; expected one of {', '.join(TARGET_MODES)}", "mode")
    images = []
    for i, img in enumerate(row.get("images", [])):
        try:
            images.append(_image_from_disk_form(img, base_dir))
        except (ValueError, TypeError) as exc:
            fail(f"image {i}: {exc}", "images")
    row["images"] = images
    n_markers = row["question"].count("<image>")
    if n_markers not in (0, len(images)):
        fail(f"{n_markers} <image> markers for {len(images)} images", "question")
    return Record(**row)


def _image_from_disk_form(img: Any, base_dir: Path | None):
    """Keep paths as absolute paths and bytes as bytes; images are decoded only when used."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, dict):
        if img.get("bytes") is not None:
            return bytes(img["bytes"])
        if img.get("base64") is not None:
            return base64.b64decode(img["base64"])
        if img.get("path"):
            img = img["path"]
        else:
            raise UsageError("an image object needs 'bytes', 'base64' or 'path'")
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    if isinstance(img, str):
        path = Path(img)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path)
    raise TypeError(f"expected a path, bytes or an image object, got {type(img).__name__}")


def to_pil(img: Any) -> Image.Image:
    """Decode an image held as PIL, bytes or a path; raises ValueError naming what failed."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    try:
        if isinstance(img, (bytes, bytearray)):
            with Image.open(io.BytesIO(img)) as opened:
                return opened.convert("RGB")
        with Image.open(img) as opened:
            return opened.convert("RGB")
    except FileNotFoundError as exc:
        raise UsageError(f"image file not found: {img}") from exc
    except Exception as exc:  # PIL raises several types for undecodable data
        what = f"{len(img)} bytes" if isinstance(img, (bytes, bytearray)) else str(img)
        raise UsageError(f"cannot decode image ({what}): {exc}") from exc


def image_header_size(img: Any) -> tuple[int, int]:
    """(width, height) from the image's header alone (PIL's Image.open without .load(): no pixel decoded); raises
    ValueError naming what failed. Pixel data broken past a valid header is found only by `to_pil`."""
    if isinstance(img, Image.Image):
        return img.size
    try:
        with Image.open(io.BytesIO(img) if isinstance(img, (bytes, bytearray)) else img) as opened:
            return opened.size
    except FileNotFoundError as exc:
        raise UsageError(f"image file not found: {img}") from exc
    except Exception as exc:  # PIL raises several types for what is not an image (or a decompression bomb)
        what = f"{len(img)} bytes" if isinstance(img, (bytes, bytearray)) else str(img)
        raise UsageError(f"cannot open image ({what}): {exc}") from exc


def png_bytes(img: Any) -> bytes:
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    buffer = io.BytesIO()
    to_pil(img).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def record_to_dict(record: Record, image_dir: Path | None = None, base_dir: Path | None = None,
                   embed: bool = False) -> dict:
    """A JSON-able row: images written under image_dir (paths relative to base_dir) or embedded."""
    row = asdict(record)
    disk_images = []
    for i, img in enumerate(record.images):
        if embed:
            disk_images.append({"bytes": png_bytes(img)})
        elif isinstance(img, str) and image_dir is None:
            disk_images.append(img if base_dir is None else os.path.relpath(img, base_dir))
        elif image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            target = image_dir / f"{_safe_name(record.id)}_{i}.png"
            target.write_bytes(png_bytes(img))
            disk_images.append(str(target.relative_to(base_dir)) if base_dir else str(target))
        else:
            disk_images.append({"base64": base64.b64encode(png_bytes(img)).decode()})
    row["images"] = disk_images
    return row


def read_records(path: str | os.PathLike) -> list[Record]:
    return list(iter_records(path))


def iter_records(path: str | os.PathLike, on_error=None) -> Iterator[Record]:
    """Records from a .jsonl, .json (a list), .parquet file or a `datasets.save_to_disk` directory.

    Plain question/answer files work too: `problem` is read as `question`, and a missing id becomes
    `<file stem>-<row>`. A bad row raises RecordError naming file, row and field; with `on_error`, the
    error is passed to it instead and reading goes on with the next row.
    """
    for _, record in iter_numbered_records(path, on_error):
        yield record


def iter_numbered_records(path: str | os.PathLike, on_error=None) -> Iterator[tuple[int, Record]]:
    """`iter_records` with the row number each record came from, so a record found bad later (an image that
    does not open) can still be reported by file and row."""
    path = Path(path)
    if not path.exists():
        raise RecordError("no such file or directory", path)
    for row_number, row in iter_raw_rows(path, on_error):
        try:
            yield row_number, record_from_dict(normalize_plain(row, path, row_number), path, row_number,
                                               path.parent)
        except RecordError as exc:
            if on_error is None:
                raise
            on_error(exc)


def normalize_plain(row: Any, path: Path, row_number: int) -> Any:
    if not isinstance(row, dict):
        return row
    row = dict(row)
    if "question" not in row and "problem" in row:
        row["question"] = row.pop("problem")
    if "id" not in row:
        row["id"] = row.pop("unique_id", None) or f"{path.stem}-{row_number}"
    if "difficulty" in row and "level" not in row:
        difficulty = row.pop("difficulty")
        row["level"] = int(difficulty) if isinstance(difficulty, (int, float)) else difficulty
    return row


def count_rows(path: str | os.PathLike) -> int | None:
    """How many rows a record file has, read cheaply (lines of a .jsonl, a .parquet's metadata), or None where that
    would mean parsing it: for progress bars."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl" and path.is_file():
            count, last = 0, b"\n"
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 16), b""):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
            return count + (last != b"\n")
        if path.suffix == ".parquet" and path.is_file():
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except OSError:
        return None
    return None


def iter_raw_rows(path: Path, on_error=None) -> Iterator[tuple[int, Any]]:
    """(row number, raw row) of a record file, read as a stream (a .json list is parsed whole: use .jsonl or
    .parquet for large inputs)."""
    if path.is_dir():
        import datasets

        for i, row in enumerate(datasets.load_from_disk(str(path)), start=1):
            yield i, row
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    error = RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}", path, i)
                    if on_error is None:
                        raise error from None
                    on_error(error)
                    continue
                yield i, row
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"invalid JSON: {exc.msg} at line {exc.lineno}", path) from None
        if not isinstance(data, list):
            raise RecordError("a .json record file must hold a list of objects", path)
        yield from enumerate(data, start=1)
    elif path.suffix == ".parquet":  # a record batch at a time: a large file is never held whole
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        yield from enumerate(rows, start=1)
    else:
        raise RecordError(f"unknown record format {path.suffix!r}: use .jsonl, .json, .parquet or a dataset dir",
                          path)


def write_records(records: Iterable[Record], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write atomically. JSONL stores images as PNG files in `<stem>_images/`; Parquet and HF embed them."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = list(records)
    if path.suffix == ".jsonl":
        image_dir = path.parent / f"{path.stem}_images"
        rows = [record_to_dict(r, image_dir=image_dir, base_dir=path.parent) for r in records]
        write_jsonl(path, rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [_for_arrow(record_to_dict(r, embed=True)) for r in records]
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    elif path.suffix == "" or path.is_dir():
        import datasets

        rows = [_for_arrow(record_to_dict(r, embed=True)) for r in records]
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise RecordError(f"unknown record format {path.suffix!r}: use .jsonl, .parquet or a directory", path)
    return path


def _for_arrow(row: dict) -> dict:
    # Arrow needs one type per column: free-form meta travels as a JSON string.
    row = dict(row)
    row["meta"] = json.dumps(row["meta"])
    return row
