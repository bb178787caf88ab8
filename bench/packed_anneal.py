"""Packed annealing against padded batches at realistic shapes, on a bi-mode length mix (issue 26, item 4).

    .venv/bin/python -m bench.packed_anneal runs/realistic --rows 30 --batch 4 --max-length 6144 [--markdown PATH]
    .venv/bin/python -m bench.packed_anneal qwen3_vl --rows 30 --batch 4 --max-length 6144   # the Qwen3-VL model
    .venv/bin/python -m bench.packed_anneal tiny_qwen3_vl --rows 3 --batch 2 --max-length 2048  # its smoke run

The model of bench/realistic_model.py (576 image tokens a row; `qwen3_vl`: its Qwen3-VL-shaped one). The rows:
synthetic-world images and questions with targets of a bi-mode length mix, drawn with a fixed seed: 2/3 direct
answers of 10-200 tokens, 1/3 thinking targets of 500-4,000 tokens (trace plus answer). Four sides, one after the
other in this process, each one whole epoch of the same rows (fp32, no checkpointing): padded random batches of
`--batch` rows, padded batches grouped by length (transformers' LengthGroupedSampler), `pack_rows` with packs of up
to `--max-length` tokens, one pack a step (attention row by row, `bimode_varlen_sdpa`), and the same packs with
transformers' block-diagonal mask over the whole pack (what SDPA does with a pack by itself). Reported: real
(non-pad) tokens per second, computed tokens per second, the padding share, the ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from bench import report
from bench.anneal_throughput import timed_epoch
from bench.realistic_model import resolve_model
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.recipes import load_recipe
from bimode.train.anneal import AnnealConfig, build_trainer


def text_of(tokens: int, tokenizer, rng: random.Random) -> str:
    """About `tokens` tokens of words (scaled from this tokenizer's tokens per character)."""
    words = ["count", "the", "shapes", "left", "of", "red", "circle", "so", "we", "have", "three", "plus", "two"]
    sample = " ".join(rng.choice(words) for _ in range(200))
    per_char = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / len(sample)
    out = []
    while len(" ".join(out)) * per_char < tokens:
        out.append(rng.choice(words))
    return " ".join(out)


def bimode_rows(n: int, tokenizer, seed: int = 0, longest: int = 4000) -> list:
    """n records, a third thinking with 500 to `longest` tokens of reasoning, the rest direct with 10 to 200."""
    rng = random.Random(seed)
    records = [s.to_record() for s in synthetic.generate(n, seed=2, families=["count", "shell", "tally"])]
    for r in records:
        if rng.random() < 1 / 3:
            r.mode, r.reasoning = "think", text_of(rng.randint(500, longest), tokenizer, rng)
        else:
            r.mode, r.reasoning = "no_think", None
            r.answer = r.direct_answer = text_of(rng.randint(10, 200), tokenizer, rng)
    return records


def side(model: str, data: Path, out: Path, name: str, batch: int, max_length: int) -> dict:
    trainer = side_trainer(model, data, out, name, batch, max_length)
    return {**timed_epoch(trainer), "packed": packs_rows(trainer)}


def packs_rows(trainer) -> bool:
    """Whether the trainer draws packs (a model whose positions cannot pack trains padded, with the reason logged)."""
    return "pack" in trainer.train_dataset.column_names


def side_trainer(model: str, data: Path, out: Path, name: str, batch: int, max_length: int, model_args=None,
                 **overrides):
    """The annealing trainer of one side (one epoch, fp32 on CPU unless `overrides` say otherwise, e.g. max_steps,
    bf16, use_cpu); model_args: TRL's ModelConfig (dtype, attn_implementation)."""
    settings = {"padded random": dict(per_device_train_batch_size=batch),
                "padded grouped": dict(per_device_train_batch_size=batch, train_sampling_strategy="group_by_length"),
                "packed": dict(per_device_train_batch_size=1, pack_rows=True, max_length=max_length),
                "packed, block mask": dict(per_device_train_batch_size=1, pack_rows=True, max_length=max_length),
                }[name]
    values = dict(model_path=model, train_files=[str(data)], output_dir=str(out), target_modes="labelled",
                  max_steps=-1, num_train_epochs=1, report_to=[], save_strategy="no", use_cpu=True,
                  logging_steps=10_000, disable_tqdm=True, **settings)
    cfg = load_recipe(AnnealConfig, "tiny_anneal", **{**values, **overrides})
    trainer = build_trainer(cfg, model_args=model_args)
    if name == "packed, block mask":  # transformers' own reading of a pack on SDPA: one mask over the whole pack
        trainer.model.set_attn_implementation({"text_config": "sdpa"})
    return trainer


SIDES = ("padded random", "padded grouped", "packed", "packed, block mask")
SHORT = {"random": "padded random", "grouped": "padded grouped", "packed": "packed", "block": "packed, block mask"}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (bench/realistic_model.py builds runs/realistic), or llava / "
                                      "qwen3_vl (a family's realistic model, built when missing) / tiny / "
                                      "tiny_qwen3_vl")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="rows per padded batch")
    parser.add_argument("--max-length", type=int, default=6144, help="tokens per pack")
    parser.add_argument("--sides", default=",".join(SHORT),
                        help=f"comma-separated subset of {','.join(SHORT)} (or the sides' names without a comma, "
                             "e.g. 'padded random'); random, the baseline, always runs")
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    args.model = resolve_model(args.model, work)
    records = bimode_rows(args.rows, AutoTokenizer.from_pretrained(args.model))
    write_records(records, work / "train.jsonl")
    asked = [s.strip() for s in args.sides.split(",")]
    unknown = [s for s in asked if s not in SHORT and s not in SIDES]
    if unknown:
        parser.error(f"--sides: unknown {unknown}; choose from {', '.join(SHORT)}")
    chosen = {SHORT.get(s, s) for s in asked} | {"padded random"}
    results = {s: side(args.model, work / "train.jsonl", work / s.replace(" ", "_"), s, args.batch, args.max_length)
               for s in SIDES if s in chosen}
    labels = {"padded random": f"padded random ({args.batch} rows)",
              "padded grouped": f"padded, grouped by length ({args.batch} rows)",
              "packed": f"**packed** (`pack_rows`, packs of {args.max_length:,} tokens, attention row by row)",
              "packed, block mask": "packed, transformers' block-diagonal mask over the whole pack"}
    rows = [[labels[name], r["steps"], f"{r['s']:.1f}", f"{r['real_tok_s']:.0f}", f"{r['padded_tok_s']:.0f}",
             f"{100 * r['padding']:.1f}%", f"{r['real_tok_s'] / results['padded random']['real_tok_s']:.2f}x"]
            for name, r in results.items()]
    for row, name in zip(rows, results):
        if name == "packed":  # the packed path, the one the issue asks about
            row[-1] = f"**{row[-1]}**"
    unpacked = [name for name in ("packed", "packed, block mask") if name in results and not results[name]["packed"]]
    note = (f"\nNOT AS LABELLED: {' and '.join(unpacked)} trained padded, one row a batch: this model's positions "
            "cannot be packed yet (the log says why).\n" if unpacked else "")
    report.emit(f"Model {args.model}.\n\n" + report.table(["batches", "steps", "s", "real tok/s", "computed tok/s",
                                                           "padding", "ratio (real tok/s)"], rows) + note,
                args.markdown)


if __name__ == "__main__":
    main()
