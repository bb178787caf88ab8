"""Reports from eval rows: metrics.json, report.md and PNG plots; and two runs side by side."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from bimode.data.rejects import REJECTS_FILE, read_rejects
from bimode.eval.metrics import MODES, group_metrics

PLOTS = ("thinking_rate_by_level.png", "accuracy_tokens.png", "threshold_curve.png")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(rows: list[dict], out_dir: Path, title: str = "bimode evaluation",
                 rejects: list[dict] | None = None) -> dict:
    """metrics.json, report.md and the plots in out_dir. `rejects` (default: out_dir/rejects.jsonl, what
    run_eval wrote there) are counted in both: metrics["rejected"] = {"total", "by_bench"}."""
    out_dir = Path(out_dir)
    metrics = group_metrics(rows)
    if rejects is None:
        rejects = read_rejects(out_dir / REJECTS_FILE)
    by_bench = Counter(r.get("bench") or "unknown" for r in rejects)
    metrics["rejected"] = {"total": len(rejects), "by_bench": dict(sorted(by_bench.items()))}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plots(metrics, out_dir)
    (out_dir / "report.md").write_text(render_markdown(metrics, title))
    return metrics


def render_markdown(metrics: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    rejected = metrics.get("rejected") or {"total": 0, "by_bench": {}}
    per_bench = "".join(f"; {bench}: {n}" for bench, n in rejected["by_bench"].items())
    lines += [f"Rejected rows (not scored; file, row, field and reason in rejects.jsonl): {rejected['total']}"
              f"{per_bench}", ""]
    lines += ["## Per benchmark: accuracy (%) and mean tokens, non-thinking / auto / thinking", "",
              "| benchmark | n | acc N-T | acc auto | acc T | tok N-T | tok auto | tok T | auto thinks | oracle acc | oracle tok |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for bench, m in metrics["benchmarks"].items():
        modes = m["modes"]
        get = lambda mode, key: modes.get(mode, {}).get(key)
        n = max((s["n"] for s in modes.values()), default=0)
        lines.append(f"| {bench} | {n} | " + " | ".join(_pct(get(mo, "accuracy")) for mo in MODES) + " | "
                     + " | ".join(_num(get(mo, "tokens")) for mo in MODES) + f" | {_pct(get('auto', 'thinking_rate'))} | "
                     f"{_pct(m['oracle'].get('accuracy'))} | {_num(m['oracle'].get('tokens'))} |")
    for bench, m in metrics["benchmarks"].items():
        lines += ["", f"## {bench}", "", "| mode | n | accuracy % (95% CI) | tokens | thinking | answer | thinking rate |",
                  "|---|---|---|---|---|---|---|"]
        for mode, s in m["modes"].items():
            lines.append(f"| {mode} | {s['n']} | {_pct(s['accuracy'])} ({_pct(s['ci95'][0])}-{_pct(s['ci95'][1])}) | "
                         f"{_num(s['tokens'])} | {_num(s['thinking_tokens'])} | {_num(s['answer_tokens'])} | "
                         f"{_pct(s['thinking_rate'])} |")
        o, sel, eff = m["oracle"], m["selection"], m["auto_vs_think"]
        if o.get("n"):
            lines.append(f"| oracle router | {o['n']} | {_pct(o['accuracy'])} | {_num(o['tokens'])} | | | "
                         f"{_pct(o['thinking_rate'])} |")
        if sel.get("n"):
            lines += ["", f"Mode selection: Hybrid Accuracy {_pct(sel['hybrid_accuracy'])}%, MCC {sel['mcc']:.3f}, "
                          f"oracle needs thinking on {_pct(sel['need_think_rate'])}% of queries."]
        if eff:
            lines += [f"Auto vs think: accuracy {100 * eff['accuracy_delta']:+.1f} points at "
                      f"{_pct(eff['token_ratio'])}% of the tokens."]
        for key in ("level", "family"):
            groups = m.get(f"by_{key}") or {}
            if not groups:
                continue
            lines += ["", f"By {key}:", "", f"| {key} | n | acc N-T | acc auto | acc T | auto thinks | tok auto | oracle acc |",
                      "|---|---|---|---|---|---|---|---|"]
            for value, g in groups.items():
                gm = g["modes"]
                n = max((s["n"] for s in gm.values()), default=0)
                lines.append(f"| {value} | {n} | " + " | ".join(_pct(gm.get(mo, {}).get("accuracy")) for mo in MODES)
                             + f" | {_pct(gm.get('auto', {}).get('thinking_rate'))} | {_num(gm.get('auto', {}).get('tokens'))}"
                             f" | {_pct(g['oracle'].get('accuracy'))} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _plots(metrics: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = metrics["benchmarks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for bench, m in benches.items():
        levels = m.get("by_level") or {}
        xs = [lv for lv, g in levels.items() if "auto" in g["modes"]]
        if xs:
            ax.plot(xs, [100 * levels[lv]["modes"]["auto"]["thinking_rate"] for lv in xs], marker="o", label=bench)
    ax.set_xlabel("difficulty level"), ax.set_ylabel("auto-mode thinking rate (%)"), ax.set_ylim(-5, 105)
    ax.set_title("Thinking rate by difficulty")
    _legend(ax)
    fig.tight_layout(), fig.savefig(out_dir / PLOTS[0], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"no_think": "s", "auto": "o", "think": "^"}
    for bench, m in benches.items():
        for mode, s in m["modes"].items():
            ax.scatter(s["tokens"], 100 * s["accuracy"], marker=markers[mode], label=f"{bench} {mode}")
        if m["oracle"].get("n"):
            ax.scatter(m["oracle"]["tokens"], 100 * m["oracle"]["accuracy"], marker="*", s=150, label=f"{bench} oracle")
    ax.set_xlabel("mean tokens"), ax.set_ylabel("accuracy (%)"), ax.set_title("Accuracy and tokens per mode")
    _legend(ax)
    fig.tight_layout(), fig.savefig(out_dir / PLOTS[1], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for bench, m in benches.items():
        curve = m.get("threshold_curve") or []
        if curve:
            ax.plot([c["tokens"] for c in curve], [100 * c["accuracy"] for c in curve], marker=".", label=bench)
    ax.set_xlabel("mean tokens"), ax.set_ylabel("accuracy (%)")
    ax.set_title("think_threshold sweep over p_think")
    _legend(ax)
    fig.tight_layout(), fig.savefig(out_dir / PLOTS[2], dpi=100), plt.close(fig)


def compare_runs(run_a: Path, run_b: Path) -> str:
    """Two runs' metrics side by side, with changes and whether each is outside A's 95% interval."""
    a = json.loads((Path(run_a) / "metrics.json").read_text())
    b = json.loads((Path(run_b) / "metrics.json").read_text())
    lines = [f"# {run_a} -> {run_b}", "",
             "| benchmark | mode | acc A | acc B | change | outside A's 95% CI | tok A | tok B | think rate A | think rate B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bench in sorted(set(a["benchmarks"]) | set(b["benchmarks"])):
        ma = a["benchmarks"].get(bench, {}).get("modes", {})
        mb = b["benchmarks"].get(bench, {}).get("modes", {})
        for mode in MODES:
            sa, sb = ma.get(mode), mb.get(mode)
            if not sa or not sb:
                continue
            change = sb["accuracy"] - sa["accuracy"]
            outside = sb["accuracy"] < sa["ci95"][0] or sb["accuracy"] > sa["ci95"][1]
            lines.append(f"| {bench} | {mode} | {_pct(sa['accuracy'])} | {_pct(sb['accuracy'])} | {100 * change:+.1f} | "
                         f"{'yes' if outside else 'no'} | {_num(sa['tokens'])} | {_num(sb['tokens'])} | "
                         f"{_pct(sa['thinking_rate'])} | {_pct(sb['thinking_rate'])} |")
    return "\n".join(lines) + "\n"


def card_table(metrics: dict, source: str) -> str:
    """The eval table a model card carries (`bimode eval --card`): per benchmark, each mode's accuracy, tokens
    and thinking rate, then per difficulty level; `source` says what was run (files, settings)."""
    lines = [f"{source}", "", "Accuracy in % with its 95% bootstrap interval; tokens: mean generated tokens "
             "(thinking and answer); thinks: the share of answers with reasoning.", "",
             "| benchmark | mode | n | accuracy % (95% CI) | tokens | thinking tokens | thinks % |",
             "|---|---|---|---|---|---|---|"]
    for bench, m in metrics["benchmarks"].items():
        for mode, s in m["modes"].items():
            lines.append(f"| {bench} | {mode} | {s['n']} | {_pct(s['accuracy'])} ({_pct(s['ci95'][0])}-"
                         f"{_pct(s['ci95'][1])}) | {_num(s['tokens'])} | {_num(s['thinking_tokens'])} | "
                         f"{_pct(s['thinking_rate'])} |")
    for bench, m in metrics["benchmarks"].items():
        levels = m.get("by_level") or {}
        if not levels:
            continue
        lines += ["", f"By difficulty level, {bench}:", "",
                  "| level | n | acc no_think | acc auto | acc think | auto thinks % | tok auto | tok think |",
                  "|---|---|---|---|---|---|---|---|"]
        for level, g in levels.items():
            gm = g["modes"]
            get = lambda mode, key: gm.get(mode, {}).get(key)
            n = max((s["n"] for s in gm.values()), default=0)
            lines.append(f"| {level} | {n} | " + " | ".join(_pct(get(mo, "accuracy")) for mo in MODES)
                         + f" | {_pct(get('auto', 'thinking_rate'))} | {_num(get('auto', 'tokens'))} | "
                         f"{_num(get('think', 'tokens'))} |")
    return "\n".join(lines)


def card_source(bench: list, cfg) -> str:
    """The line above a card's eval table: what `bimode eval` ran (cfg: its EvalConfig)."""
    settings = [f"modes {', '.join(cfg.modes)}",
                f"max_new_tokens {cfg.max_new_tokens if cfg.max_new_tokens else 'the model default'}"]
    settings += [f"{name} {getattr(cfg, name)}" for name in ("max_thinking_tokens", "think_threshold", "limit")
                 if getattr(cfg, name) is not None]
    files = ", ".join(f"`{Path(b).name}`" for b in bench)
    return f"`bimode eval` on {files}, greedy: " + "; ".join(settings) + "."
