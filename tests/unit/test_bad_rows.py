"""Bad training rows: found before step 1 by their headers and texts (train/row_checks.py), and rows whose pixels
fail to decode during training skipped and counted (train/bad_rows.py), in `bimode anneal` and `bimode bpo`."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bimode.data import synthetic
from bimode.data.records import Record, write_records
from bimode.data.rejects import reject
from bimode.train.bad_rows import RowImages
from bimode.train.row_checks import (BadRowsError, CheckedRow, TextLimit, check_training_rows, find_bad_rows,
                                     read_rows)

SIDE = synthetic.IMAGE_PX  # the synthetic images' side; max_image_pixels below lets exactly these through
LONG_QUESTION = "count the cells again " * 300  # over 1,024 tokens of text
# the rows each test file adds after its good rows: (id, image or None, question, what the check says)
BAD_KINDS = {"missing": "image file not found", "header_cut": "cannot open image", "not_an_image": "cannot open image",
             "oversized": "over the limit of", "long_text": "tokens of text, over"}


def png(side: int = SIDE) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_fail(path: Path) -> Path:
    """A PNG whose header is whole (it opens) and whose pixel data is cut short (it does not decode)."""
    data = png()
    path.write_bytes(data[: len(data) // 2])
    return path


def bad_image(folder: Path, kind: str) -> str | None:
    path = folder / f"{kind}.png"
    if kind == "missing":
        return str(path)
    if kind == "header_cut":
        path.write_bytes(png()[:20])  # the PNG signature and half its IHDR chunk
    elif kind == "not_an_image":
        path.write_text("id,question\n1,what?\n")
    elif kind == "oversized":
        path.write_bytes(png(SIDE + 1))
    else:
        return None
    return str(path)


def training_file(folder: Path, good: int, bad: tuple[str, ...] = tuple(BAD_KINDS), pixels_fail_rows: int = 0,
                  answer: str = "1") -> Path:
    """`good` synthetic rows with images, then one row of each bad kind, then rows whose pixels fail to decode."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(good, seed=3, families=["count", "shell"], max_level=2)],
                  path)
    lines = []
    for kind in bad:
        image = bad_image(folder, kind)
        question = LONG_QUESTION if kind == "long_text" else "How many cells are filled?"
        lines.append({"id": kind, "question": question, "answer": answer, "images": [image] if image else []})
    for i in range(pixels_fail_rows):
        lines.append({"id": f"pixels_fail_{i}", "question": "How many cells are filled?", "answer": answer,
                      "images": [str(pixels_fail(folder / f"pixels_fail_{i}.png"))]})
    with open(path, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def rejects_of(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def assert_names_every_bad_kind(error: str, out: Path, train: Path, good: int, extra: tuple = ()) -> None:
    kinds = {**BAD_KINDS, **dict(extra)}
    assert f"{len(kinds)} bad training rows, each named in {out / 'rejects.jsonl'}" in error
    assert f"the first: file {train}, row {good + 1}, field 'images': image file not found" in error
    assert "(record missing)" in error and "--skip_bad_rows true" in error
    rejects = rejects_of(out)
    assert set(rejects) == set(kinds)
    rows = {kind: good + 1 + i for i, kind in enumerate(kinds)}
    for kind, says in kinds.items():
        r = rejects[kind]
        assert (r["file"], r["row"], r["step"]) == (str(train), rows[kind], None), r
        assert says in r["reason"], r
        assert r["field"] == {"long_text": "question", "no_answer": "answer"}.get(kind, "images"), r


# ---- the check itself --------------------------------------------------------------------------------------------
def test_the_check_reads_headers_and_texts_and_names_each_bad_row(tmp_path):
    train = training_file(tmp_path, good=2, pixels_fail_rows=1)
    with open(train, "a") as f:
        f.write('{"id": "broken", "question": \n')
    read = read_rows([str(train)])
    assert [r.row for r in read.rows] == list(range(1, 9))
    assert [(r["row"], r["id"]) for r in read.unreadable] == [(9, "train.jsonl:row9")]
    words = TextLimit(lambda r: (r.question, "question"), lambda texts: [len(t.split()) for t in texts], 100,
                      "100 words")
    good, rejects = check_training_rows(read.rows, max_image_pixels=SIDE * SIDE, text=words)
    # a header that opens passes: its pixels are decoded only during training
    assert [r.record.id for r in good] == [read.rows[0].record.id, read.rows[1].record.id, "pixels_fail_0"]
    assert [(r["id"], r["row"], r["field"]) for r in rejects] == [
        ("missing", 3, "images"), ("header_cut", 4, "images"), ("not_an_image", 5, "images"),
        ("oversized", 6, "images"), ("long_text", 7, "question")]
    assert rejects[3]["reason"] == f"{SIDE + 1}x{SIDE + 1} = {(SIDE + 1) ** 2:,} pixels, over the limit of {SIDE * SIDE:,}"
    assert rejects[4]["reason"] == "1,200 tokens of text, over 100 words (template and image tokens not counted)"
    no_answer = find_bad_rows(read.rows[:1], row_error=lambda r: ("answer", "no answer to reward"))
    assert [(r["field"], r["reason"]) for r in no_answer] == [("answer", "no answer to reward")]


def test_every_process_of_a_launch_takes_the_same_decision(tmp_path):
    """Two processes each check every other row and gather what both found: each returns the single process's
    good rows and rejects, in file order, though each found only its share."""
    train = training_file(tmp_path, good=3)
    rows = read_rows([str(train)]).rows
    limits = dict(max_image_pixels=SIDE * SIDE)
    alone = check_training_rows(rows, **limits)
    found = [find_bad_rows(rows[rank::2], **limits) for rank in (0, 1)]
    assert all(found) and not {r["id"] for r in found[0]} & {r["id"] for r in found[1]}
    for rank in (0, 1):
        def gather(mine, rank=rank):
            assert mine == found[rank]
            return [mine if r == rank else found[r] for r in (0, 1)]

        assert check_training_rows(rows, rank=rank, world=2, gather=gather, **limits) == alone


def _checked_on_rank(rank: int, train: Path, out: Path, results) -> None:
    """One of two processes joined by gloo through a file store (no network): the command's own check, gather and
    decision (`checked_rows`), with a config standing in for TrainingArguments'."""
    from types import SimpleNamespace

    import torch.distributed as dist

    import bimode.train.bad_rows as bad_rows
    import bimode.train.row_checks as row_checks

    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    writes = []
    row_checks.write_rejects = lambda path, rows: writes.append(len(rows))  # which process writes
    cfg = SimpleNamespace(device=None, world_size=2, process_index=rank, output_dir=str(out), skip_bad_rows=True,
                          max_image_pixels=SIDE * SIDE)
    good = row_checks.checked_rows(cfg, read_rows([str(train)]))
    # then a row that failed to decode on each process: both count both, one writes them
    bad_rows.write_rejects = lambda path, rows: writes.append([r["id"] for r in rows])
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, device="cpu", is_main_process=rank == 0),
                              state=SimpleNamespace(global_step=4), args=SimpleNamespace(output_dir=str(out),
                                                                                         max_bad_rows=1),
                              bad_row_keys=set(), bad_rows_stop=False)
    bad_rows.BadRowsMixin.note_bad_rows(trainer, [reject("cannot decode image", file="f", row=rank, id=f"r{rank}")])
    results.put((rank, [r.record.id for r in good], writes, trainer.bad_rows_stop))
    dist.destroy_process_group()


def test_two_processes_joined_by_gloo_take_the_same_decisions(tmp_path):
    """The real gather of a launch: each process checks half the rows and both set aside the same rows; during
    training, both count the rows that failed on either and stop together; one process writes."""
    import multiprocessing

    train = training_file(tmp_path, good=3)
    context = multiprocessing.get_context("fork")  # torch is imported already: a fork starts at once
    results = context.Queue()
    processes = [context.Process(target=_checked_on_rank, args=(rank, train, tmp_path, results)) for rank in (0, 1)]
    try:
        for p in processes:
            p.start()
        got = {rank: rest for rank, *rest in (results.get(timeout=60) for _ in processes)}
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    expected = [r.record.id for r in check_training_rows(read_rows([str(train)]).rows, max_image_pixels=SIDE * SIDE)[0]]
    assert len(expected) == 4  # no text limit given: the long text trains
    assert got[0] == [expected, [len(BAD_KINDS) - 1, ["r0", "r1"]], True]
    assert got[1] == [expected, [], True]  # past max_bad_rows 1 on both: both stop


def test_a_row_whose_pixels_fail_gives_its_place_to_the_next_that_decodes(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    records = [Record(id="a", question="q", images=[str(tmp_path / "ok.png")]),
               Record(id="b", question="q", images=[str(pixels_fail(tmp_path / "b.png"))]),
               Record(id="c", question="q", images=[str(pixels_fail(tmp_path / "c.png"))])]
    images = RowImages(records, [("f.jsonl", 1), ("f.jsonl", 2), ("f.jsonl", 3)])
    used, decoded, found = images.load(1)
    assert used == 0 and decoded[0].size == (SIDE, SIDE)  # b and c fail: the next that decodes, round to a
    assert [(r["file"], r["row"], r["field"], r["id"]) for r in found] == [("f.jsonl", 2, "images", "b"),
                                                                             ("f.jsonl", 3, "images", "c")]
    assert "cannot decode image" in found[0]["reason"]
    assert images.load(2)[0] == 0 and images.load(2)[2] == []  # known: passed over, not named twice


# ---- bimode anneal -----------------------------------------------------------------------------------------------
def anneal_cfg(out: Path, train: Path, tiny_dir, **kw):
    from bimode.train.anneal import AnnealConfig

    base = dict(model_path=str(tiny_dir), train_files=[str(train)], output_dir=str(out), max_steps=1,
                per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                seed=0, use_cpu=True, target_modes="no_think", dataloader_num_workers=0, gradient_checkpointing=False,
                max_image_pixels=SIDE * SIDE)
    base.update(kw)
    return AnnealConfig(**base)


def test_anneal_stops_before_step_1_naming_every_bad_row(tmp_path, tiny_dir):
    from bimode.train.anneal import build_trainer

    train = training_file(tmp_path / "data", good=4)
    with pytest.raises(BadRowsError) as raised:
        build_trainer(anneal_cfg(tmp_path / "out", train, tiny_dir))
    assert_names_every_bad_kind(str(raised.value), tmp_path / "out", train, good=4)


def test_anneal_skips_bad_rows_when_asked_and_rows_failing_in_training(tmp_path, tiny_dir):
    """--skip_bad_rows: the rest train; a row whose pixels fail in a batch is skipped and named with its step."""
    from bimode.train.anneal import build_trainer

    train = training_file(tmp_path / "data", good=5, pixels_fail_rows=1)
    out = tmp_path / "out"
    trainer = build_trainer(anneal_cfg(out, train, tiny_dir, skip_bad_rows=True, per_device_train_batch_size=6))
    assert len(trainer.train_dataset) == 6  # the 5 good rows and the one whose header passes
    trainer.train()
    assert trainer.state.global_step == 1
    rejects = rejects_of(out)
    assert set(rejects) == set(BAD_KINDS) | {"pixels_fail_0"}
    failed = rejects["pixels_fail_0"]
    assert (failed["file"], failed["row"], failed["field"], failed["step"]) == (str(train), 11, "images", 1)
    assert "cannot decode image" in failed["reason"]


def test_anneal_past_max_bad_rows_saves_a_checkpoint_and_stops(tmp_path, tiny_dir):
    from bimode.train.anneal import build_trainer
    from bimode.train.run import train_and_save

    train = training_file(tmp_path / "data", good=2, bad=(), pixels_fail_rows=2)
    out = tmp_path / "out"
    trainer = build_trainer(anneal_cfg(out, train, tiny_dir, max_bad_rows=1, max_steps=3))
    with pytest.raises(BadRowsError, match=f"stopped after step 1: 2 rows failed to decode during training, more than "
                                           f"max_bad_rows 1 .*checkpoint saved to {out / 'checkpoint-1'}"):
        train_and_save(trainer)
    assert (out / "checkpoint-1" / "trainer_state.json").exists() and not (out / "final").exists()
    assert {r["id"]: r["step"] for r in rejects_of(out).values()} == {"pixels_fail_0": 1, "pixels_fail_1": 1}


# ---- bimode bpo --------------------------------------------------------------------------------------------------
def bpo_trainer(out: Path, train: Path, tiny_dir, **kw):
    from bimode.train.bpo.trainer import BPOConfig, build_trainer

    args = dict(model_path=str(tiny_dir), train_files=[str(train)], output_dir=str(out), num_generations=2,
                per_device_train_batch_size=4, max_completion_length=4, max_steps=1, learning_rate=1e-3,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, probe_steps=0, seed=0,
                rewards=["tests.helpers.bpo_helpers:no_think_wins"], max_image_pixels=SIDE * SIDE,
                gradient_checkpointing=False)
    args.update(kw)
    return build_trainer(BPOConfig(**args))


def test_bpo_stops_before_step_1_naming_every_bad_row(tmp_path, tiny_dir):
    train = training_file(tmp_path / "data", good=3)
    with open(train, "a") as f:
        f.write(json.dumps({"id": "no_answer", "question": "How many?", "answer": ""}) + "\n")
    with pytest.raises(BadRowsError) as raised:
        bpo_trainer(tmp_path / "out", train, tiny_dir)
    assert_names_every_bad_kind(str(raised.value), tmp_path / "out", train, good=3,
                                extra=(("no_answer", "no answer to reward"),))
    assert "over 1,020 (the model's 1,024 positions less max_completion_length 4)" in \
        rejects_of(tmp_path / "out")["long_text"]["reason"]


def test_bpo_skips_bad_rows_when_asked_and_rows_failing_in_training(tmp_path, tiny_dir):
    train = training_file(tmp_path / "data", good=1, pixels_fail_rows=1)
    out = tmp_path / "out"
    trainer = bpo_trainer(out, train, tiny_dir, skip_bad_rows=True, probe_steps=1, probe_size=2)
    assert [r.id for r in trainer.records][1:] == ["pixels_fail_0"]
    trainer.train()  # both rows in the step's 2 groups; the failing one's place goes to the good row
    assert trainer.state.global_step == 1
    assert len(trainer.p_think_probe.records) == 1  # the probe (the training rows) leaves it out, and runs
    assert [json.loads(line)["step"] for line in (out / "probe.jsonl").read_text().splitlines()] == [0]
    failed = rejects_of(out)["pixels_fail_0"]
    assert (failed["row"], failed["field"], failed["step"]) == (7, "images", 1)
    assert len(rejects_of(out)) == len(BAD_KINDS) + 1


def test_bpo_past_max_bad_rows_saves_a_checkpoint_and_stops(tmp_path, tiny_dir):
    from bimode.train.run import train_and_save

    train = training_file(tmp_path / "data", good=1, bad=(), pixels_fail_rows=1)
    out = tmp_path / "out"
    trainer = bpo_trainer(out, train, tiny_dir, max_bad_rows=0, max_steps=3)
    with pytest.raises(BadRowsError, match=f"stopped after step 1: 1 row failed .*{out / 'checkpoint-1'}"):
        train_and_save(trainer)
    assert (out / "checkpoint-1" / "trainer_state.json").exists() and not (out / "final").exists()
