"""`bimode demo`: the R-4B recipe on the embedded default, stage by stage.

world -> tiny model -> annotator warm-up (SFT in both formats) -> curation (performance-based heuristic,
N = 8) -> bi-mode annealing on the curated mix (TRL SFTTrainer) -> BPO (TRL GRPOTrainer) -> evaluation of
the annealed and the BPO model in auto, think and no_think mode -> report.md.
Each stage writes into the run directory and is skipped when its output is there, so a re-run resumes;
delete a stage's folder to run it again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bimode.data import synthetic
from bimode.data.records import TARGET_MODES, read_records, write_records
from bimode.errors import UsageError


@dataclass
class DemoConfig:
    """The demo's run: sizes, and the few settings where it departs from the tiny recipes it runs
    (the shipped recipes tiny_{curate,anneal,bpo,eval}, in bimode/configs/recipes). The sizes come from a
    recipe: demo.yaml (the default of `bimode demo`) or demo_quick.yaml (`--quick`)."""

    n_train: int = field(metadata={"help": "synthetic training samples"})
    n_eval: int = field(metadata={"help": "held-out eval samples"})
    families: list[str] = field(metadata={"help": "world families (demo.yaml says why shell_text is left out)"})
    warmup_steps: int = field(metadata={"help": "annotator warm-up SFT steps (both formats)"})
    anneal_steps: int = field(metadata={"help": "annealing steps"})
    bpo_steps: int = field(metadata={"help": "BPO steps"})
    bpo_prompts: int = field(metadata={"help": "prompts per BPO step, each with tiny_bpo.yaml's num_generations "
                                               "rollouts"})
    out: str = field(default="runs/demo", metadata={"help": "run directory"})
    overwrite: bool = field(default=False, metadata={"help": "start again in a non-empty run directory"})
    seed: int = field(default=0, metadata={
        "help": "seed of every stage (world, model, sampling); scripts/demo_seeds.py compares seeds"})
    curate_n_samples: int | None = field(default=None, metadata={
        "help": "N of the performance heuristic (default: tiny_curate.yaml's)"})
    curate_max_correct: int | None = field(default=None, metadata={
        "help": "k of the performance heuristic (default: tiny_curate.yaml's)"})
    bpo_mode_token_loss: str | None = field(default=None, metadata={
        "help": "BPO mode-token loss (default: tiny_bpo.yaml's)"})
    bpo_beta: float | None = field(default=None, metadata={"help": "BPO KL weight (default: tiny_bpo.yaml's)"})
    bpo_recipe: str = field(default="tiny_bpo", metadata={
        "help": "the BPO stage's recipe: tiny_bpo (the paper's BPO) or tiny_bpo_router (the decision learned per "
                "query, docs/bpo.md; `make demo ROUTER=1`). A run folder whose BPO stage used another recipe runs "
                "BPO and its evaluation again from the annealed model"})

    def __post_init__(self):
        from bimode.recipes import recipe_path

        synthetic.check_families(self.families)
        recipe_path(self.bpo_recipe)  # an unknown recipe fails now, not after the stages before BPO
        for name in ("n_train", "n_eval", "warmup_steps", "anneal_steps", "bpo_steps", "bpo_prompts"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")


# What every trainer of the demo shares, over its recipe: no checkpoints or loggers, progress bars shown
_TRAINER_COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=False)


def _overrides(**values) -> dict:
    """The demo's settings that are set (None: the recipe's value stands)."""
    return {k: v for k, v in values.items() if v is not None}


def _stage(name: str, done: Path, out: Path) -> bool:
    """True when the stage must run; says what is skipped."""
    if done.exists():
        print(f"[{name}] already done ({done.relative_to(out)}), skipping", flush=True)
        return False
    print(f"[{name}] running", flush=True)
    return True


BPO_RECIPE_FILE = "bpo_recipe.txt"  # the recipe the run folder's BPO stage used (none: tiny_bpo, runs before it)


def _forget_other_bpo_recipe(out: Path, recipe: str) -> None:
    """A BPO stage done with another recipe is not this run's: its model, run and evaluation go, so that they
    run again from the annealed model (the stages before are shared)."""
    marker = out / BPO_RECIPE_FILE
    done = marker.read_text().strip() if marker.exists() else "tiny_bpo"
    if done == recipe or not (out / "bpo").exists():
        return
    print(f"[BPO] the run folder's BPO stage used {done}, this run {recipe}: running BPO and its evaluation again",
          flush=True)
    for name in ("bpo", "bpo_run", "eval_bpo"):
        shutil.rmtree(out / name, ignore_errors=True)
    marker.unlink(missing_ok=True)


def _save(model, processor, path: Path, card) -> None:
    """The model, its processor and its card (models/card.py's CardFacts) in `path`."""
    from bimode.models.card_files import write_card

    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_card(tmp, card, title=path.name)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a model folder exists only once complete: resume can trust it


def run_demo(cfg: DemoConfig) -> int:
    import torch

    from bimode.curate import CurateConfig, run_curation
    from bimode.eval.report import card_source, card_table, write_report
    from bimode.eval.runner import EvalConfig, read_samples, run_eval
    from bimode.generation.backends import build_backend
    from bimode.models import load_model
    from bimode.models.card import CardFacts
    from bimode.models.card_files import lineage, row_counts, write_card, write_eval_table
    from bimode.models.tiny import build_tiny
    from bimode.recipes import load_recipe, recipe_values
    from bimode.train.anneal import AnnealConfig
    from bimode.train.anneal import build_trainer as anneal_trainer
    from bimode.train.bpo.trainer import BPOConfig
    from bimode.train.bpo.trainer import build_trainer as bpo_trainer
    from bimode.train.model_card import training_card_facts
    from bimode.train.sft_warmup import SimpleSFTConfig, train_sft

    out, seed = Path(cfg.out), cfg.seed
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    timings_file = out / "timings.json"  # seconds per stage, kept across resumed runs
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def timed(name, fn):
        t = time.time()
        fn()
        timings[name] = round(time.time() - t, 1)
        timings_file.write_text(json.dumps(timings, indent=1))

    data = out / "data"
    if _stage("world", data / "eval.jsonl", out):
        def world():
            for split, n in (("train", cfg.n_train), ("eval", cfg.n_eval)):
                write_records((s.to_record() for s in synthetic.generate(n, seed, split, families=cfg.families)),
                              data / f"{split}.jsonl", overwrite=True)
        timed("world", world)
    if _stage("tiny model", out / "tiny" / "config.json", out):
        def tiny():
            build_tiny(out / "tiny")
            write_card(out / "tiny", CardFacts(stage="tiny"))
        timed("tiny model", tiny)
    # The annotator learns both formats: curation samples its non-thinking answers, and annealing starts from
    # it. A non-thinking-only warm-up answered level-1 shell questions at chance, so its labels did not
    # follow difficulty, and annealing from it learned traces poorly (docs/demo_results.md).
    if _stage("annotator warm-up (SFT in both formats)", out / "annotator" / "config.json", out):
        def warmup():
            model, processor = load_model(out / "tiny", dtype=torch.float32)
            train_sft(model, processor, read_records(data / "train.jsonl"), modes=TARGET_MODES,
                      cfg=SimpleSFTConfig(steps=cfg.warmup_steps, seed=seed))
            _save(model, processor, out / "annotator", CardFacts(
                stage="sft-warmup", start_model=str(out / "tiny"), earlier=lineage(out / "tiny")[2],
                settings={"steps": cfg.warmup_steps, "modes": ", ".join(m.value for m in TARGET_MODES), "seed": seed},
                data=row_counts([data / "train.jsonl"])))
        timed("annotator warm-up", warmup)
    curate_cfg = load_recipe(CurateConfig, "tiny_curate", seed=seed, annotator_name="tiny annotator (both-format "
                             "warm-up)", **_overrides(
        n_samples=cfg.curate_n_samples, max_correct=cfg.curate_max_correct))
    if _stage(f"curation (performance-based, N = {curate_cfg.n_samples}, k = {curate_cfg.max_correct})",
              out / "curation" / "summary.json", out):
        def curate():
            run_curation(build_backend(str(out / "annotator")), [data / "train.jsonl"], out / "curation", curate_cfg)
        timed("curation", curate)
    summary = json.loads((out / "curation" / "summary.json").read_text())
    print("labelled thinking, by level: " + ", ".join(
        f"L{lv} {100 * share:.0f}%" for lv, share in summary["think_share_by_level"].items()), flush=True)
    if _stage("bi-mode annealing on the curated mix", out / "annealed" / "config.json", out):
        def anneal():
            anneal_cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path=str(out / "annotator"),
                                     train_files=[str(out / "curation" / "curated.jsonl")],
                                     output_dir=str(out / "anneal_run"), max_steps=cfg.anneal_steps,
                                     logging_steps=50, seed=seed, **_TRAINER_COMMON)
            trainer = anneal_trainer(anneal_cfg)
            trainer.train()
            _save(trainer.model, trainer.processing_class, out / "annealed", training_card_facts("anneal", anneal_cfg))
        timed("annealing", anneal)
    _forget_other_bpo_recipe(out, cfg.bpo_recipe)
    if _stage(f"BPO (bi-mode rollouts, mixed-group advantages; {cfg.bpo_recipe})", out / "bpo" / "config.json", out):
        def bpo():
            shutil.rmtree(out / "bpo_run", ignore_errors=True)  # a re-run starts its probe log afresh
            group = recipe_values("tiny_bpo")["num_generations"]  # rollouts per prompt
            bpo_cfg = load_recipe(BPOConfig, cfg.bpo_recipe, model_path=str(out / "annealed"),
                                  train_files=[str(data / "train.jsonl")], probe_files=[str(data / "eval.jsonl")],
                                  output_dir=str(out / "bpo_run"), max_steps=cfg.bpo_steps,
                                  per_device_train_batch_size=group * cfg.bpo_prompts,
                                  probe_steps=max(1, cfg.bpo_steps // 10), seed=seed, **_TRAINER_COMMON,
                                  **_overrides(mode_token_loss=cfg.bpo_mode_token_loss, beta=cfg.bpo_beta))
            trainer = bpo_trainer(bpo_cfg)
            trainer.train()
            _save(trainer.model, trainer.processing_class, out / "bpo", training_card_facts("bpo", bpo_cfg))
            (out / BPO_RECIPE_FILE).write_text(cfg.bpo_recipe + "\n")
        timed("BPO", bpo)
    for name, title in (("annealed", "Annealed tiny model"), ("bpo", "Tiny model after BPO")):
        if _stage(f"evaluation of the {name} model (auto, think, no_think)", out / f"eval_{name}" / "report.md", out):
            def evaluate(name=name, title=title):
                eval_cfg = load_recipe(EvalConfig, "tiny_eval")
                engine = build_backend(str(out / name), max_batch_rows=eval_cfg.batch_size * 3)
                samples = run_eval(engine, [data / "eval.jsonl"], out / f"eval_{name}", eval_cfg)
                write_report(read_samples(samples), out / f"eval_{name}", title=title)
            timed(f"evaluation ({name})", evaluate)
        # each model's card carries its eval table (rewritten from the metrics, so a resumed run has it too)
        metrics = json.loads((out / f"eval_{name}" / "metrics.json").read_text())
        write_eval_table(out / name, card_table(metrics, card_source([data / "eval.jsonl"],
                                                                     load_recipe(EvalConfig, "tiny_eval"))))
    _write_report(out, summary, timings, time.time() - start, cfg.bpo_recipe)
    _print_samples(out / "eval_bpo" / "samples.jsonl", "model after BPO")
    print((out / "report.md").read_text())
    print(f"done in {time.time() - start:.0f} s; the final model is in {out / 'bpo'}, its model card with its eval "
          f"table in {out / 'bpo' / 'README.md'} (try `bimode chat {out / 'bpo'}` or `bimode serve {out / 'bpo'}`)")
    return 0


def _print_samples(samples_path: Path, model: str, per_family: int = 1) -> None:
    """One eval question per family with `model`'s response in each mode (its eval's samples_path)."""
    from bimode.eval.runner import read_samples

    rows = read_samples(samples_path)
    by_query: dict = {}
    for r in rows:
        by_query.setdefault((r["family"], r["id"]), {})[r["mode"]] = r
    shown: dict = {}
    print(f"\nSamples from the eval split ({model}):")
    for (family, _), modes in sorted(by_query.items(), key=lambda kv: (kv[0][0], -(next(iter(kv[1].values()))["level"] or 0))):
        if shown.get(family, 0) >= per_family or len(modes) < 3:
            continue
        shown[family] = shown.get(family, 0) + 1
        first = next(iter(modes.values()))
        print(f"- {family} level {first['level']}, gold {first['gold']}:")
        for mode in ("no_think", "think", "auto"):
            r = modes[mode]
            print(f"    {mode:>8} {'right' if r['score'] else 'wrong'}: {r['response']!r}")
    print()


def _level_table(bench: dict) -> list[str]:
    lines = ["| level | n | no_think acc | think acc | auto acc | auto thinks | auto tokens | think tokens |",
             "|---|---|---|---|---|---|---|---|"]
    rows = list(bench.get("by_level", {}).items()) + [("all", bench)]
    for lv, g in rows:
        m = g["modes"]
        lines.append(f"| {lv} | {m['think']['n']} | {100 * m['no_think']['accuracy']:.1f} | "
                     f"{100 * m['think']['accuracy']:.1f} | {100 * m['auto']['accuracy']:.1f} | "
                     f"{100 * m['auto']['thinking_rate']:.0f}% | {m['auto']['tokens']:.1f} | {m['think']['tokens']:.1f} |")
    return lines


def demo_targets(annealed: dict, bpo: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets as (what, measured, met), from the two models' eval metrics."""
    levels = sorted(bpo["by_level"], key=int)
    easy, hard = levels[0], levels[-1]

    def acc(bench, mode, level=None):
        return 100 * (bench["by_level"][level] if level else bench)["modes"][mode]["accuracy"]

    def rate(bench, level):
        return 100 * bench["by_level"][level]["modes"]["auto"]["thinking_rate"]

    def gap(bench, level):  # think minus no_think accuracy; at the easy level no_think may also be better
        return acc(bench, "think", level) - acc(bench, "no_think", level)

    gap_hard, gap_easy = gap(annealed, hard), gap(annealed, easy)
    auto, think = bpo["modes"]["auto"], bpo["modes"]["think"]
    token_share = 100 * auto["tokens"] / max(think["tokens"], 1e-9)
    return [
        (f"premise: think - no_think on level {hard} >= 30 pts (annealed)",
         f"{gap_hard:+.1f} pts (after BPO {gap(bpo, hard):+.1f})", gap_hard >= 30),
        (f"premise: think - no_think on level {easy} <= 2 pts (annealed)",
         f"{gap_easy:+.1f} pts (after BPO {gap(bpo, easy):+.1f})", gap_easy <= 2),
        (f"after BPO, auto thinks on level {easy} <= 20%", f"{rate(bpo, easy):.0f}%", rate(bpo, easy) <= 20),
        (f"after BPO, auto thinks on level {hard} >= 80%", f"{rate(bpo, hard):.0f}%", rate(bpo, hard) >= 80),
        ("after BPO, auto acc within 2 pts of think acc", f"{100 * (auto['accuracy'] - think['accuracy']):+.1f} pts",
         100 * (think["accuracy"] - auto["accuracy"]) <= 2),
        ("after BPO, auto tokens <= 60% of think tokens", f"{token_share:.0f}%", token_share <= 60),
        ("after BPO, auto acc above the annealed model's", f"{acc(annealed, 'auto'):.1f} -> {acc(bpo, 'auto'):.1f}",
         acc(bpo, "auto") > acc(annealed, "auto")),
    ]


def plot_probe(probe_file: Path, png: Path) -> None:
    """Auto-mode p_think per level over BPO steps (the paper's trigger-rate curves) from probe.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in probe_file.read_text().splitlines() if line.strip()]
    levels = sorted({k.split("level_")[1] for r in rows for k in r if k.startswith("p_think/")}, key=str)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for level in levels:
        ax.plot([r["step"] for r in rows], [r.get(f"p_think/level_{level}") for r in rows], marker=".",
                label=f"level {level}")
    ax.set(xlabel="BPO step", ylabel="mean auto-mode p_think", ylim=(-0.02, 1.02),
           title="Thinking probability on held-out probes during BPO")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _write_report(out: Path, curation: dict, timings: dict, seconds: float, bpo_recipe: str = "tiny_bpo") -> None:
    from transformers import AutoTokenizer

    from bimode.eval.metrics import oracle_summary
    from bimode.eval.runner import read_samples
    from bimode.modes import decision_tokens

    benches = {name: next(iter(json.loads((out / f"eval_{name}" / "metrics.json").read_text())["benchmarks"].values()))
               for name in ("annealed", "bpo")}
    counts = decision_tokens(AutoTokenizer.from_pretrained(str(out / "bpo")))
    lines = ["# bimode demo: the R-4B recipe on the embedded default", "",
             "## Curation: share labelled thinking by difficulty level", "",
             "| level | labelled thinking |", "|---|---|"]
    lines += [f"| {lv} | {100 * s:.0f}% |" for lv, s in curation["think_share_by_level"].items()]
    lines += ["", f"{curation['total']['think']} thinking and {curation['total']['no_think']} non-thinking samples "
              f"curated; {curation['total']['rejected']} rejected.", ""]
    for name, title in (("annealed", "Annealed model"), ("bpo", f"After BPO ({bpo_recipe})")):
        lines += [f"## {title}, held-out eval split", ""] + _level_table(benches[name]) + [""]
    lines += ["## Auto mode against the oracle router (per query, the cheaper forced mode that is right)", "",
              "Decision agreement: the share of questions where auto mode thinks exactly where the oracle does. "
              "The oracle's tokens are the forced modes'; charged as auto mode pays (its decision token, and a "
              f"direct answer's closing tags: {counts['think']} and {counts['no_think']} tokens), in brackets.", "",
              "| model | auto acc | auto tokens | decision agreement | oracle acc | oracle tokens (as auto pays) |",
              "|---|---|---|---|---|---|"]
    for name in ("annealed", "bpo"):
        auto, agreement = benches[name]["modes"]["auto"], benches[name]["selection"]["hybrid_accuracy"]
        oracle = oracle_summary(read_samples(out / f"eval_{name}" / "samples.jsonl"), counts)
        lines.append(f"| {name} | {100 * auto['accuracy']:.1f} | {auto['tokens']:.1f} | {100 * agreement:.0f}% | "
                     f"{100 * oracle['accuracy']:.1f} | {oracle['tokens']:.1f} ({oracle['tokens_as_auto']:.1f}) |")
    lines += ["", "## Targets (issue #8), measured", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {'yes' if met else 'no'} |"
              for what, measured, met in demo_targets(benches["annealed"], benches["bpo"])]
    plot_probe(out / "bpo_run" / "probe.jsonl", out / "bpo_p_think.png")
    lines += ["", "## Thinking probability by level during BPO", "", "![p_think during BPO](bpo_p_think.png)", "",
              "Full reports with plots: eval_annealed/report.md, eval_bpo/report.md; the probe's numbers: "
              "bpo_run/probe.jsonl", "", "## Time per stage (s, as measured when the stage ran)", ""]
    lines += [f"- {name}: {s}" for name, s in timings.items()]
    lines += [f"- all stages: {sum(timings.values()):.0f}", f"- this run (stages not skipped): {seconds:.0f}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ---- what the experiments in scripts/ share: training to out/final and evaluating with the tiny recipes ----

def needs_reasoning(record) -> bool:
    """Whether a synthetic question needs a trace, by the world's ground truth rather than curation: shell and
    shell_text from level 2, tally from level 3."""
    return (record.family in ("shell", "shell_text") and record.level >= 2) or (
        record.family == "tally" and record.level >= 3)


def save_final(trainer, out: Path) -> Path:
    """The trained model and its processor in out/final."""
    final = out / "final"
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    return final


def train_to_final(cfg, out: Path, log_history: bool = True) -> Path:
    """Train (BPO, or annealing for an AnnealConfig), save the model and processor to out/final and, with
    log_history, the log history beside it (out/log_history.json)."""
    from bimode.train import anneal
    from bimode.train.bpo.trainer import build_trainer as bpo_trainer

    trainer = (anneal.build_trainer if isinstance(cfg, anneal.AnnealConfig) else bpo_trainer)(cfg)
    trainer.train()
    final = save_final(trainer, out)
    if log_history:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return final


def anneal_tiny(model_dir: Path, files: list[Path], out: Path, steps: int, seed: int,
                target_modes: str = "labelled") -> Path:
    """The tiny_anneal recipe from model_dir on `files` for `steps` steps; the model in out/final."""
    import torch

    from bimode.recipes import load_recipe
    from bimode.train.anneal import AnnealConfig

    cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path=str(model_dir), train_files=[str(f) for f in files],
                      output_dir=str(out), target_modes=target_modes, max_steps=steps, report_to=[],
                      save_strategy="no", logging_steps=50, seed=seed, use_cpu=not torch.cuda.is_available())
    return train_to_final(cfg, out, log_history=False)


def tiny_eval_samples(model_dir: Path, bench: Path, out: Path, modes, merge_adapter: bool = False,
                      think_threshold: float | None = None) -> Path:
    """The tiny_eval recipe on one benchmark file in `modes`, the model in float32 (a LoRA adapter merged with
    merge_adapter: the same outputs, faster), auto mode at `think_threshold` when given; the samples file."""
    import torch

    from bimode.eval.runner import EvalConfig, run_eval
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model
    from bimode.recipes import load_recipe

    model, processor = load_model(model_dir, dtype=torch.float32, merge_adapter=merge_adapter)
    return run_eval(TransformersEngine(model, processor, max_batch_rows=96), [bench], out,
                    load_recipe(EvalConfig, "tiny_eval", modes=list(modes), think_threshold=think_threshold),
                    progress=False)


def evaluate_tiny(model_dir: Path, bench: Path, out: Path, modes, merge_adapter: bool = False) -> dict:
    """tiny_eval_samples' metrics (overall, by mode, by level) of its one benchmark."""
    from bimode.eval.metrics import group_metrics
    from bimode.eval.runner import read_samples

    samples = tiny_eval_samples(model_dir, bench, out, modes, merge_adapter)
    return next(iter(group_metrics(read_samples(samples))["benchmarks"].values()))
