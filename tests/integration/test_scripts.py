"""The experiment scripts the docs quote run end to end (tiny sizes here; the documented numbers come from
their full sizes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bpo_miniature_runs_and_reports(tmp_path):
    out = tmp_path / "mini"
    stdout = run_script("scripts/bpo_miniature.py", "--out", str(out), "--n-train", "48", "--n-eval", "12",
                        "--anneal-steps", "2", "--steps", "2", "--runs", "BPO, mode tokens on",
                        "GRPO (auto rollouts)")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"no RL (annealed)", "BPO, mode tokens on", "GRPO (auto rollouts)"}
    for name, m in results.items():
        assert f"| {name} | {100 * m['modes']['auto']['accuracy']:.1f} |" in stdout
    assert [p["step"] for p in results["BPO, mode tokens on"]["probe"]] == [0]


def test_anneal_table3_runs_and_reports(tmp_path):
    out = tmp_path / "t3"
    stdout = run_script("scripts/anneal_table3.py", "--out", str(out), "--n-train", "48", "--n-eval", "12",
                        "--steps", "2")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"non-reasoning only", "reasoning only", "NR then R", "mixed"}
    assert f"| mixed | {100 * results['mixed']['modes']['think']['accuracy']:.1f} |" in stdout


def test_lora_comparison_runs_and_reports(tmp_path):
    out = tmp_path / "lora"
    stdout = run_script("scripts/lora_comparison.py", "--out", str(out), "--n-train", "48", "--n-eval", "6",
                        "--anneal-steps", "2", "--bpo-steps", "1", "--bpo-prompts", "2", "--lora-r", "4")
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert list(runs) == ["anneal, full", "anneal, LoRA", "BPO, full", "BPO, LoRA"]
    assert runs["anneal, LoRA"]["trainable"] < runs["anneal, full"]["trainable"] == runs["anneal, full"]["total"]
    for name, m in runs.items():
        assert f"| {name} | {m['trainable']:,} " in stdout and m["steps"] > 0
    assert (out / "bpo_lora" / "final" / "adapter_config.json").exists()


def test_r4b_pipeline_runs_from_parts_to_bpo(tmp_path):
    out = tmp_path / "pipeline"
    stdout = run_script("scripts/r4b_pipeline.py", "--out", str(out), "--n-train", "48", "--n-eval", "8",
                        "--steps", "2", "--bpo-steps", "1")
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["composed", "r4b_stage1_projector", "r4b_stage2_alignment", "r4b_stage3_joint",
                             "tiny_anneal", "tiny_bpo"]
    for name, m in results.items():
        assert f"| {name} | " in stdout and 0 <= m["modes"]["think"]["accuracy"] <= 1
    assert (out / "composed" / "config.json").exists() and (out / "bpo" / "final" / "config.json").exists()


def test_gpu_check_runs_its_cpu_form_and_prints_one_table(tmp_path):
    """`make gpu-check` where there is no GPU (forced with --cpu): the tiny Qwen3-VL model, one BPO step and one
    packed annealing step, with the plan's estimate, in one table (scripts/gpu_check.py)."""
    markdown = tmp_path / "gpu_check.md"
    stdout = run_script("scripts/gpu_check.py", "--cpu", "--markdown", str(markdown))
    assert "CPU form (no GPU)" in stdout and markdown.read_text() in stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| tiny ")]
    assert [r[:3] for r in rows] == [["tiny Qwen3-VL", "bpo", "1"], ["tiny Qwen3-VL", "anneal", "1"]]
    for r in rows:
        assert float(r[3]) > 0 and r[5] == "-" and float(r[6].split()[0]) > 0 and r[7] == "no GPU", r
    # the paths the GPU run measures: the shared forward, packs attended row by row
    assert rows[0][4].endswith("shared-prefix forward") and rows[1][4].startswith("packs, bimode_varlen_sdpa"), rows


def test_server_soak_memory_settles_after_warm_up(tmp_path, tiny_dir):
    """`bimode serve` under 2,000 mixed requests (each thinking mode, images, n = 2, streams read to the end and
    dropped midway, plain requests given up on): no answer is an error, and its resident memory grows by less than
    16 MB after the first 1,000 (measured: 1.0 MB over 2,000 requests after 1,000; docs/serving_and_eval.md has the
    by-hand soak). scripts/server_soak.py exits 1 past the bound; the figures are read here too."""
    out = tmp_path / "soak.json"
    stdout = run_script("scripts/server_soak.py", str(tiny_dir), "--requests", "2000", "--warmup", "1000",
                        "--max_tokens", "2", "--max_growth_mb", "16", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["errors"] == {} and f"growth after the first 1000 requests: {result['growth_after_warmup_mb']}" \
        in stdout
    kinds = {key.split(":")[0] for key in result["outcomes"]}
    assert kinds == {"plain", "image", "n2", "stream", "stream_dropped", "plain_dropped"}
    assert result["outcomes"].get("stream_dropped:dropped", 0) > 0 and sum(result["outcomes"].values()) == 2000
    assert result["growth_after_warmup_mb"] < 16 and len(result["rss_mb"]) > 8
