"""A benchmark with unreadable images, shared by the eval tests and the CLI tests."""

import io
import json
from pathlib import Path

from bimode.data import synthetic
from bimode.data.records import write_records
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

# row number -> what is wrong with its image: a missing file, a PNG cut in half (the header reads, the pixels
# do not), bytes that only start like a PNG
BAD_IMAGE_ROWS = {2: "missing", 7: "cut", 12: "missing", 18: "garbage", 25: "missing"}


def write_pool_with_bad_images(folder: Path, n: int = 25) -> tuple[Path, list[str]]:
    """A record file of n image questions of which the rows in BAD_IMAGE_ROWS have an image that cannot be
    used; returns its path and the ids of all n rows."""
    path = folder / "pool.jsonl"
    samples = synthetic.generate(n, seed=5, split="eval", families=TRAINED_FAMILIES, max_level=TRAINED_MAX_LEVEL)
    write_records([s.to_record() for s in samples], path)
    buffer = io.BytesIO()
    samples[0].render().save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == n and all(len(r["images"]) == 1 for r in rows)
    for row_number, kind in BAD_IMAGE_ROWS.items():
        rows[row_number - 1]["images"] = ["nope.png" if kind == "missing" else f"{kind}.png"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r["id"] for r in rows]


def write_curation_pool(path: Path, n: int, without_trace: int, unreadable_row: bool = False) -> Path:
    """n records of the trained families (a few repeat: duplicates), the first `without_trace` with no trace of
    their own (a thinking label then needs the reasoner's), and optionally a last row that cannot be read."""
    records = [s.to_record() for s in synthetic.generate(n, seed=31, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    for r in records[:without_trace]:
        r.reasoning = None
    write_records(records, path)
    if unreadable_row:
        with open(path, "a") as fh:
            fh.write('{"id": "bad", "question": 3}\n')
    return path


def curation_outputs(folder: Path) -> tuple:
    """What two curations that label alike share: curated.jsonl, rejects.jsonl, and the summary but for its time."""
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("seconds")
    return (folder / "curated.jsonl").read_text(), (folder / "rejects.jsonl").read_text(), summary
