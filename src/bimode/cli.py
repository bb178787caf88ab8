"""`bimode <command>`: the recipe's stages from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_tiny(args) -> int:
    from bimode.models.tiny import TinyConfig, build_tiny

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    build_tiny(out, TinyConfig(seed=args.seed))
    print(f"tiny model written to {out}")
    return 0


def _cmd_data_synth(args) -> int:
    from bimode.data import synthetic
    from bimode.data.records import write_records

    families = tuple(args.families.split(",")) if args.families else synthetic.DEFAULT_FAMILIES
    samples = synthetic.generate(args.n, seed=args.seed, split=args.split, families=families,
                                 max_level=args.max_level, progress=True)
    out = Path(args.out)
    path = out / f"{args.split}.{args.format}" if out.suffix not in (".jsonl", ".parquet") else out
    write_records((s.to_record() for s in samples), path, overwrite=args.overwrite)
    print(f"{len(samples)} {args.split} samples written to {path}")
    return 0


def _cmd_demo(args) -> int:
    from bimode.demo import run_demo

    return run_demo(out=Path(args.out), quick=args.quick, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bimode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny", help="build the embedded tiny VLM (SigLIP + Qwen3, LLaVA layout) offline")
    tiny.add_argument("--out", required=True, help="directory to write the model and processor to")
    tiny.add_argument("--seed", type=int, default=0, help="initialisation seed")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    tiny.set_defaults(func=_cmd_tiny)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic multimodal reasoning world")
    synth.add_argument("--out", required=True, help="output directory (writes SPLIT.FORMAT) or a .jsonl/.parquet file")
    synth.add_argument("--n", type=int, default=1000, help="number of samples")
    synth.add_argument("--seed", type=int, default=0, help="generation seed")
    synth.add_argument("--split", choices=["train", "eval"], default="train",
                       help="which split; the two never share an image-question pair")
    synth.add_argument("--families", default=None, help="comma-separated families from count,shell,tally,shell_text,shell_mc "
                       "(default: all but shell_mc)")
    synth.add_argument("--max-level", type=int, default=6, help="highest difficulty level (reasoning steps)")
    synth.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="file format")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    synth.set_defaults(func=_cmd_data_synth)

    demo = sub.add_parser("demo", help="run the recipe on the embedded default")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    demo.add_argument("--overwrite", action="store_true", help="start again in a non-empty run directory")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
