"""`bimode <command>`: the recipe's stages from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _probability(text: str) -> float:
    """argparse type of a think threshold: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


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


def _cmd_chat(args) -> int:
    from bimode.chat import run_chat
    from bimode.generation.defaults import default_max_new_tokens
    from bimode.models.loading import adapter_base

    # the checkpoint's generation_config.json is read as a file (an adapter's: its base's); the model itself
    # is loaded once, in run_chat
    max_new_tokens = default_max_new_tokens(adapter_base(args.model) or args.model, args.max_new_tokens)
    return run_chat(args.model, args.prompt, args.image, args.mode, args.budget, max_new_tokens,
                    args.temperature, args.threshold, args.trust_remote_code)


def _cmd_serve(args) -> int:
    from bimode.serve.app import serve

    try:
        kwargs = json.loads(args.default_chat_template_kwargs) if args.default_chat_template_kwargs else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --default-chat-template-kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise SystemExit("error: --default-chat-template-kwargs must be a JSON object")
    serve(args.model, host=args.host, port=args.port, allow_image_dir=args.allow_image_dir,
          trust_remote_code=args.trust_remote_code, max_batch=args.max_batch,
          request_timeout_s=args.request_timeout, served_model_name=args.served_model_name,
          api_key=args.api_key or os.environ.get("BIMODE_API_KEY") or None, max_model_len=args.max_model_len,
          max_tokens=args.max_tokens, default_chat_template_kwargs=kwargs,
          allow_remote_images=args.allow_remote_images, remote_image_max_bytes=args.remote_image_max_bytes,
          remote_image_timeout_s=args.remote_image_timeout, think_threshold=args.think_threshold)
    return 0


def _cmd_eval(args) -> int:
    import shutil

    from bimode.eval.report import write_report
    from bimode.eval.runner import EvalConfig, read_samples, run_eval
    from bimode.generation.backends import build_backend
    from bimode.generation.openai_backend import EndpointError

    if (args.model is None) == (args.endpoint is None):
        raise SystemExit("error: bimode eval takes a local model directory or --endpoint URL (one of the two)")
    if args.endpoint_model and not args.endpoint:
        raise SystemExit("error: --model names the model at an --endpoint; a local model is the positional MODEL")
    out = Path(args.out)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    try:
        judge = build_backend(args.judge, model_name=args.judge_model) if args.judge else None
        if args.endpoint:
            # the modes travel as chat_template_kwargs.thinking_mode, one request per (question, mode)
            api_key = args.api_key or os.environ.get("BIMODE_API_KEY") or os.environ.get("OPENAI_API_KEY")
            engine = build_backend(args.endpoint, model_name=args.endpoint_model, api_key=api_key,
                                   concurrency=args.concurrency, timeout_s=args.request_timeout)
            title = f"bimode eval of {engine.model} at {args.endpoint}"
        else:
            engine = build_backend(args.model, trust_remote_code=args.trust_remote_code,
                                   max_batch_rows=args.batch_size * 3)
            title = f"bimode eval of {args.model}"
        cfg = EvalConfig(modes=tuple(m.strip() for m in args.modes.split(",")), max_new_tokens=args.max_new_tokens,
                         max_thinking_tokens=args.budget, think_threshold=args.threshold, batch_size=args.batch_size,
                         limit=args.limit, judge=judge)
        samples = run_eval(engine, args.bench, out, cfg)
    except EndpointError as exc:  # what is scored is kept: the same command resumes
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"error: {exc}" + (f"; run {again} to resume" if (out / "samples.jsonl").exists() else ""),
              file=sys.stderr)
        return 2
    metrics = write_report(read_samples(samples), out, title=title)
    rejected = metrics["rejected"]["total"]
    if rejected:
        print(f"rejected {rejected} rows (not scored; reasons in {out / 'rejects.jsonl'})")
    print(f"report: {out / 'report.md'}; metrics: {out / 'metrics.json'}; samples: {samples}")
    return 0


def _cmd_eval_compare(argv: list[str]) -> int:
    from bimode.eval.report import compare_runs

    parser = argparse.ArgumentParser(prog="bimode eval compare",
                                     description="two eval runs side by side (say, before and after BPO)")
    parser.add_argument("run_a", help="first run directory (with metrics.json)")
    parser.add_argument("run_b", help="second run directory")
    args = parser.parse_args(argv)
    print(compare_runs(Path(args.run_a), Path(args.run_b)))
    return 0


def _cmd_eval_calibrate(argv: list[str]) -> int:
    from bimode.eval.calibrate import CalibrationError, calibrate, render_calibration
    from bimode.eval.runner import read_samples

    parser = argparse.ArgumentParser(
        prog="bimode eval calibrate",
        description="Pick auto mode's think_threshold from an eval run's p_think and think / no_think outcomes "
                    "(greedy: no generation), on part of its questions, and report it on the rest (or on a "
                    "second run). Writes calibration.json and calibration.md to the run directory.")
    parser.add_argument("run", help="eval run directory (samples.jsonl with think and no_think rows)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-drop", type=float, default=None,
                      help="accuracy points auto may lose against think mode: the fewest tokens within it")
    goal.add_argument("--token-share", type=float, default=None,
                      help="share of think mode's mean tokens auto may use (0.5 = half): the best accuracy within it")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--holdout-fraction", type=float, default=0.5,
                      help="share of the run's questions held out to report on, never used to pick (default 0.5)")
    held.add_argument("--holdout", default=None,
                      help="a second eval run of other questions to report on; then all of RUN picks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    args = parser.parse_args(argv)
    run = Path(args.run)
    for folder in (run, Path(args.holdout) if args.holdout else None):
        if folder is not None and not (folder / "samples.jsonl").is_file():
            print(f"error: no samples.jsonl in {folder}: give the directory of a `bimode eval` run", file=sys.stderr)
            return 2
    try:
        rows = read_samples(run / "samples.jsonl")
        holdout = read_samples(Path(args.holdout) / "samples.jsonl") if args.holdout else None
        result = calibrate(rows, max_drop=args.max_drop, token_share=args.token_share,
                           holdout_fraction=args.holdout_fraction, seed=args.seed, holdout_rows=holdout)
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render_calibration(result, str(run))
    (run / "calibration.json").write_text(json.dumps(result, indent=2))
    (run / "calibration.md").write_text(text)
    print(text, end="")
    return 0


def _cmd_curate(args) -> int:
    from bimode.curate import CurateConfig, run_curation
    from bimode.generation.backends import build_backend

    options = {"trust_remote_code": args.trust_remote_code, "concurrency": args.concurrency,
               "timeout_s": args.request_timeout}
    annotator = build_backend(args.annotator, model_name=args.annotator_model, **options)
    reasoner = None
    if args.reasoner:
        reasoner = annotator if args.reasoner == args.annotator else build_backend(args.reasoner, **options)
    keywords = CurateConfig.blocked_keywords
    if args.blocked_keywords:
        keywords = tuple(k.strip() for k in Path(args.blocked_keywords).read_text().splitlines() if k.strip())
    cfg = CurateConfig(n_samples=args.n, max_correct=args.k, temperature=args.temperature,
                       max_new_tokens=args.max_new_tokens, trace_max_new_tokens=args.trace_max_new_tokens,
                       batch_size=args.batch_size, seed=args.seed,
                       judge_prompt=args.judge_prompt, blocked_keywords=keywords,
                       max_question_chars=args.max_question_chars, annotator_name=args.annotator)
    summary = run_curation(annotator, args.input, Path(args.out), cfg, reasoner=reasoner, overwrite=args.overwrite,
                           input_format=args.input_format)
    total = summary["total"]
    print(f"curated {total['curated']} ({total['think']} thinking, {total['no_think']} non-thinking), "
          f"rejected {total['rejected']}; see {Path(args.out) / 'summary.md'}")
    return 0


def _cmd_data_convert(args) -> int:
    from bimode.data.convert import convert_file

    n = convert_file(args.input, args.out, args.format, overwrite=args.overwrite)
    print(f"{n} records written to {args.out}")
    return 0


def _cmd_export(args) -> int:
    import torch

    from bimode.models.loading import export_merged

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    out = export_merged(args.merge, args.out, dtype=dtype, trust_remote_code=args.trust_remote_code,
                        overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return 0


def _cmd_demo(args) -> int:
    from bimode.demo import run_demo

    return run_demo(out=Path(args.out), quick=args.quick, overwrite=args.overwrite, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS

    default_limit = (f"the model's generation_config.json max_new_tokens, else {PAPER_MAX_NEW_TOKENS:,}, "
                     "the paper's evaluation limit")
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
    conv = data_sub.add_parser("convert", help="convert LLaVA / ShareGPT / QA files into records")
    conv.add_argument("--input", required=True, help="JSON or JSONL file")
    conv.add_argument("--out", required=True, help="output .jsonl / .parquet / directory")
    conv.add_argument("--format", default="auto", choices=["auto", "llava", "sharegpt", "qa"], help="input layout")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    conv.set_defaults(func=_cmd_data_convert)

    chat = sub.add_parser("chat", help="chat with a model: streamed, reasoning shown apart from the answer")
    chat.add_argument("model", help="local model directory or LoRA adapter folder (loaded with its base)")
    chat.add_argument("--prompt", "-p", default=None, help="one-shot question (omit for an interactive session)")
    chat.add_argument("--image", action="append", default=[], help="image file for the first turn (repeatable)")
    chat.add_argument("--mode", default="auto", help="auto | think (long) | no_think (short)")
    chat.add_argument("--budget", type=int, default=None, help="thinking budget in tokens")
    chat.add_argument("--think-threshold", "--threshold", dest="threshold", type=_probability, default=None,
                      help="auto mode thinks iff p_think >= this (pick it with `bimode eval calibrate`)")
    chat.add_argument("--max-new-tokens", type=int, default=None,
                      help=f"generated-token limit (default: {default_limit})")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    chat.set_defaults(func=_cmd_chat)

    srv = sub.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions, /v1/models, /health)")
    srv.add_argument("model", help="local model directory or LoRA adapter folder (loaded with its base)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address")
    srv.add_argument("--port", type=int, default=8000, help="port")
    srv.add_argument("--allow-image-dir", default=None, help="serve local image paths under this directory only")
    srv.add_argument("--allow-remote-images", action="store_true",
                     help="fetch http(s) image URLs (off by default: it lets any client make the server open URLs)")
    srv.add_argument("--remote-image-max-bytes", type=int, default=20 * 1024 * 1024,
                     help="largest remote image fetched (default 20 MiB)")
    srv.add_argument("--remote-image-timeout", type=float, default=10.0,
                     help="seconds for a whole remote image fetch, at most 3 redirects (default 10)")
    srv.add_argument("--think-threshold", type=_probability, default=None,
                     help="auto mode thinks iff p_think >= this, for requests that set no think_threshold "
                          "(pick it with `bimode eval calibrate`)")
    srv.add_argument("--max-batch", type=int, default=32, help="most samples generated together")
    srv.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request fails (504)")
    srv.add_argument("--served-model-name", default=None,
                     help="model id reported (default: folder name); NAME:auto, NAME:think and NAME:no_think "
                          "are listed too and force that mode")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $BIMODE_API_KEY; /health and "
                          "/metrics stay open)")
    srv.add_argument("--max-model-len", type=int, default=None,
                     help="most prompt tokens (default: the model's position limit, else 32768)")
    srv.add_argument("--max-tokens", type=int, default=32768,
                     help="most new tokens a request may ask for (a request without max_tokens gets the model's "
                          "own limit, else 8192)")
    srv.add_argument("--default-chat-template-kwargs", default=None,
                     help='JSON applied under each request\'s chat_template_kwargs, e.g. \'{"thinking_mode": "short"}\'')
    srv.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    srv.set_defaults(func=_cmd_serve)

    ev = sub.add_parser(
        "eval", help="evaluate a model in each mode, local or at an endpoint (`bimode eval compare A B` compares "
                     "runs; `bimode eval calibrate RUN` picks a think threshold)",
        description="Evaluate a local model directory, or a model behind an OpenAI-compatible server "
                    "(--endpoint), in each mode. `bimode eval compare A B` compares two runs; "
                    "`bimode eval calibrate RUN` picks auto mode's think threshold from a run.")
    ev.add_argument("model", nargs="?", default=None,
                    help="local model directory or LoRA adapter folder (or give --endpoint)")
    ev.add_argument("--endpoint", default=None,
                    help="OpenAI-compatible base URL (bimode serve, vLLM) to evaluate instead of a local model; "
                         "modes are forced through chat_template_kwargs.thinking_mode")
    ev.add_argument("--model", dest="endpoint_model", default=None,
                    help="model id at --endpoint (default: the first /v1/models lists)")
    ev.add_argument("--api-key", default=None,
                    help="bearer key for --endpoint (default: $BIMODE_API_KEY, else $OPENAI_API_KEY)")
    ev.add_argument("--concurrency", type=int, default=8, help="parallel requests to --endpoint")
    ev.add_argument("--request-timeout", type=float, default=600.0, help="seconds per --endpoint request")
    ev.add_argument("--bench", nargs="+", required=True, help="benchmark record files (JSONL/JSON/Parquet)")
    ev.add_argument("--modes", default="auto,think,no_think", help="comma-separated modes")
    ev.add_argument("--out", required=True, help="run directory (samples.jsonl, metrics.json, report.md, PNGs)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"generated-token limit per sample (default: {default_limit}; an --endpoint gets "
                         f"{PAPER_MAX_NEW_TOKENS:,}); a cut response scores 0")
    ev.add_argument("--budget", type=int, default=None, help="thinking budget in tokens")
    ev.add_argument("--think-threshold", "--threshold", dest="threshold", type=_probability, default=None,
                    help="auto mode thinks iff p_think >= this (pick it with `bimode eval calibrate`)")
    ev.add_argument("--batch-size", type=int, default=32, help="questions per generation batch")
    ev.add_argument("--limit", type=int, default=None, help="first N records of each benchmark")
    ev.add_argument("--judge", default=None, help="OpenAI-compatible URL of an LLM judge for text answers")
    ev.add_argument("--judge-model", default=None, help="judge model id (default: the endpoint's first)")
    ev.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    ev.set_defaults(func=_cmd_eval)

    cur = sub.add_parser("curate", help="label samples thinking / non-thinking (R-4B's heuristics) and build targets")
    cur.add_argument("--input", nargs="+", required=True, help="record, LLaVA, ShareGPT or QA files")
    cur.add_argument("--input-format", default="auto", choices=["auto", "llava", "sharegpt", "qa"],
                     help="layout of the input files (auto detects per row)")
    cur.add_argument("--out", required=True, help="output directory (curated.jsonl, rejects.jsonl, summary.*)")
    cur.add_argument("--annotator", required=True, help="local model directory or OpenAI-compatible URL")
    cur.add_argument("--annotator-model", default=None, help="model id at the endpoint (default: its first)")
    cur.add_argument("--reasoner", default=None,
                     help="model or URL that writes missing reasoning traces (thinking mode; kept if verified)")
    cur.add_argument("--n", type=int, default=8, help="non-thinking samples per verifiable query (N)")
    cur.add_argument("--k", type=int, default=0, help="at most k of N right -> thinking (0 = all wrong)")
    cur.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    cur.add_argument("--max-new-tokens", type=int, default=None,
                     help=f"tokens per sampled non-thinking answer (default: the annotator's generation_config.json "
                          f"max_new_tokens, else {PAPER_MAX_NEW_TOKENS:,}; an endpoint annotator gets "
                          f"{PAPER_MAX_NEW_TOKENS:,}): a cut answer counts as wrong and pushes the label to thinking")
    cur.add_argument("--trace-max-new-tokens", type=int, default=None,
                     help=f"tokens per reasoning trace the reasoner writes (default: its generation_config.json "
                          f"max_new_tokens, else {PAPER_MAX_NEW_TOKENS:,}): a cut trace fails verification")
    cur.add_argument("--batch-size", type=int, default=16, help="queries per batch (the resume unit)")
    cur.add_argument("--seed", type=int, default=0, help="base seed")
    cur.add_argument("--judge-prompt", default=None, help="prompt file for the difficulty judge ({question})")
    cur.add_argument("--blocked-keywords", default=None, help="file of keywords (one a line) that drop a trace")
    cur.add_argument("--max-question-chars", type=int, default=8000, help="longer questions are rejected")
    cur.add_argument("--concurrency", type=int, default=8, help="parallel requests to an endpoint")
    cur.add_argument("--request-timeout", type=float, default=120.0, help="seconds per endpoint request")
    cur.add_argument("--overwrite", action="store_true", help="redo a finished curation")
    cur.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    cur.set_defaults(func=_cmd_curate)

    sub.add_parser("anneal", add_help=False,
                   help="bi-mode annealing on TRL's SFTTrainer: --config RECIPE.yaml [--field value ...]")
    sub.add_parser("bpo", add_help=False,
                   help="Bi-mode Policy Optimization on TRL's GRPOTrainer: --config RECIPE.yaml [--field value ...]")

    exp = sub.add_parser("export", help="merge a LoRA adapter folder into its base: a plain checkpoint for "
                                        "transformers, vLLM and every bimode command")
    exp.add_argument("--merge", required=True, metavar="ADAPTER",
                     help="adapter folder saved by `bimode anneal` / `bimode bpo` with use_peft (its "
                          "adapter_config.json names the base model)")
    exp.add_argument("--out", required=True, help="directory to write the merged model and processor to")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights' dtype (auto: the base checkpoint's)")
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    exp.add_argument("--trust-remote-code", action="store_true", help="allow the base checkpoint's own code")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="run the recipe on the embedded default")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    demo.add_argument("--overwrite", action="store_true", help="start again in a non-empty run directory")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of every stage (world, model, sampling); scripts/demo_seeds.py compares seeds")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from bimode.data.records import RecordError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["eval", "compare"]:
        return _cmd_eval_compare(argv[2:])
    if argv[:2] == ["eval", "calibrate"]:
        return _cmd_eval_calibrate(argv[2:])
    if argv[:1] == ["bpo"]:  # TRL's parser: --config RECIPE.yaml plus any GRPOConfig / BPOConfig field
        from bimode.train.bpo import main as bpo_main

        return bpo_main(argv[1:])
    if argv[:1] == ["anneal"]:  # TRL's parser: --config RECIPE.yaml plus any SFTConfig / AnnealConfig field
        from bimode.train.anneal import main as anneal_main

        return anneal_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecordError, FileNotFoundError, FileExistsError, ValueError) as exc:
        if os.environ.get("BIMODE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
