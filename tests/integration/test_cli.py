"""The console commands, run as a user runs them."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bimode.data import synthetic
from bimode.data.records import read_records
from tests.helpers.eval_helpers import BAD_IMAGE_ROWS, write_pool_with_bad_images

BIMODE = [sys.executable, "-m", "bimode.cli"]


def run(*args, input=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*BIMODE, *args], capture_output=True, text=True, input=input, check=check, env=env)


def test_help_lists_every_command():
    out = run("--help").stdout
    for command in ("tiny", "data", "chat", "serve", "eval", "curate", "anneal", "bpo", "export", "demo", "configs"):
        assert command in out


def test_training_commands_help_names_the_command_and_our_fields():
    for command, field in (("anneal", "--target_modes"), ("bpo", "--mode_token_loss")):
        out = run(command, "--help").stdout
        assert out.startswith(f"usage: bimode {command} ") and field in out


def test_generation_limits_default_to_the_models_own_then_8192():
    """eval, chat and curate leave the limit to the model (its generation config, else the paper's 8,192)
    unless a flag sets it; before, eval cut every response at 256 tokens, chat at 512, curation at 256."""
    from bimode.commands import find_command
    from bimode.commands import chat, curate, eval as eval_command

    for module, argv in ((eval_command, ["eval", "m", "--bench", "b.jsonl", "--out", "o"]), (chat, ["chat", "m"]),
                         (curate, ["curate", "--input", "i.jsonl", "--out", "o", "--annotator", "m"])):
        assert find_command(argv)[0] == (argv[0],)
        generation = lambda parsed: next(c for c in parsed if hasattr(c, "max_new_tokens"))  # noqa: E731
        assert generation(module.make_parser().parse_args_and_config(argv[1:])).max_new_tokens is None
        parsed = module.make_parser().parse_args_and_config(argv[1:] + ["--max-new-tokens", "64"])
        assert generation(parsed).max_new_tokens == 64
    parsed = curate.make_parser().parse_args_and_config(["--input", "i", "--out", "o", "--annotator", "m"])
    assert parsed[1].trace_max_new_tokens is None
    for command in ("eval", "chat", "curate"):
        text = " ".join(run(command, "--help").stdout.split())
        assert "generation_config.json max_new_tokens, else 8,192" in text, command


def test_eval_rejects_rows_with_unreadable_images_and_scores_the_rest(trained_tiny, tmp_path):
    path, ids = write_pool_with_bad_images(tmp_path)
    out = tmp_path / "run"
    args = ("eval", str(trained_tiny), "--bench", str(path), "--out", str(out), "--modes", "no_think",
            "--max-new-tokens", "8")
    first = run(*args, check=False)
    assert first.returncode == 0, first.stderr  # before: "error: image file not found: .../nope.png", exit 2
    assert f"rejected {len(BAD_IMAGE_ROWS)} rows" in first.stdout
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == sorted(BAD_IMAGE_ROWS) and len(samples) == 20
    assert {r["id"] for r in rejects} | {s["id"] for s in samples} == set(ids)
    assert json.loads((out / "metrics.json").read_text())["rejected"]["total"] == 5
    again = run(*args, check=False)  # resumed: no crash, nothing generated again, no duplicate rejects
    assert again.returncode == 0, again.stderr
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 5
    assert len((out / "samples.jsonl").read_text().splitlines()) == 20


def test_tiny_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path):
    run("tiny", "--out", str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "chat_template.jinja").exists()
    again = run("tiny", "--out", str(tmp_path / "m"), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    run("tiny", "--out", str(tmp_path / "m"), "--overwrite")


def test_data_synth_writes_records(tmp_path):
    run("data", "synth", "--out", str(tmp_path), "--n", "20", "--seed", "3", "--split", "eval")
    records = read_records(tmp_path / "eval.jsonl")
    expected = synthetic.generate(20, seed=3, split="eval")
    assert [r.id for r in records] == [s.id for s in expected]
    assert [r.answer for r in records] == [s.answer for s in expected]
    run("data", "synth", "--out", str(tmp_path / "x.parquet"), "--n", "5", "--families", "shell_mc,shell_text")
    assert {r.family for r in read_records(tmp_path / "x.parquet")} == {"shell_mc", "shell_text"}
    bad = run("data", "synth", "--out", str(tmp_path), "--n", "5", "--families", "chess", check=False)
    assert bad.returncode == 2 and "unknown families" in bad.stderr


def test_chat_one_shot_and_interactive(trained_tiny, tmp_path):
    sample = synthetic.generate(1, seed=2, split="eval", families=["shell"], levels=[2])[0]
    sample.render().save(tmp_path / "grid.png")
    think = run("chat", str(trained_tiny), "-p", sample.question, "--image", str(tmp_path / "grid.png"),
                "--mode", "think", "--max-new-tokens", "64").stdout
    assert "[thinking] " in think and "[answer] " in think and "thinking +" in think
    assert think.index("[thinking]") < think.index("[answer]")
    short = run("chat", str(trained_tiny), "-p", sample.question, "--image", str(tmp_path / "grid.png"),
                "--mode", "short", "--max-new-tokens", "64").stdout
    assert "[thinking]" not in short and "[answer] " in short and "0 thinking +" in short
    session = run("chat", str(trained_tiny), "--image", str(tmp_path / "grid.png"), "--mode", "think", "--max-new-tokens", "64",
                  input=f"{sample.question}\nAnd now?\n\n").stdout
    assert session.count("[answer] ") == 2
    missing = run("chat", str(trained_tiny), "-p", "hi", "--image", str(tmp_path / "nope.png"), check=False)
    assert missing.returncode == 2 and "image file not found" in missing.stderr


@pytest.fixture(scope="module")
def wheel_bimode(tmp_path_factory) -> Path:
    """`bimode` installed from a wheel into a fresh environment that has no source tree: what `pip install
    bimode` gives a user. The environment borrows this one's installed libraries (a .pth line) so it costs
    seconds, not a download of torch."""
    root, work = Path(__file__).resolve().parents[2], tmp_path_factory.mktemp("wheel")
    shutil.copytree(root / "src", work / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, work / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(work), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                   check=True, capture_output=True)
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "borrowed_libraries.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = (work / "dist").glob("bimode-*.whl")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    where = subprocess.run([str(python), "-c", "import bimode; print(bimode.__file__)"], cwd=work, check=True,
                           capture_output=True, text=True).stdout
    assert where.startswith(site), where  # the wheel's copy, not the source tree's
    return env / "bin" / "bimode"


def test_quick_demo_runs_every_stage_and_resumes_from_a_wheel_install(tmp_path, wheel_bimode):
    """From the wheel, run where no source tree is: the recipes ship inside the package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}

    def run(*args):
        done = subprocess.run([str(wheel_bimode), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    out = tmp_path / "demo"
    first = run("demo", "--quick", "--out", str(out)).stdout
    assert "Samples from the eval split (model after BPO):" in first  # it prints the BPO eval's samples
    for stage in ("[world] running", "[tiny model] running", "[annotator warm-up (SFT in both formats)] running",
                  "[curation (performance-based, N = 4, k = 1)] running", "[bi-mode annealing on the curated mix] running",
                  "[BPO (bi-mode rollouts, mixed-group advantages; tiny_bpo)] running",
                  "[evaluation of the annealed model (auto, think, no_think)] running",
                  "[evaluation of the bpo model (auto, think, no_think)] running"):
        assert stage in first
    for path in ("data/eval.jsonl", "annotator/model.safetensors", "curation/curated.jsonl",
                 "annealed/model.safetensors", "bpo/model.safetensors", "bpo/chat_template.jinja",
                 "bpo_run/probe.jsonl", "eval_annealed/metrics.json", "eval_bpo/metrics.json",
                 "eval_bpo/report.md", "report.md", "bpo_p_think.png"):
        assert (out / path).exists(), path
    # the report's numbers are the metrics files'
    report = (out / "report.md").read_text()
    for name, title in (("annealed", "## Annealed model"), ("bpo", "## After BPO")):
        metrics = json.loads((out / f"eval_{name}" / "metrics.json").read_text())
        modes = next(iter(metrics["benchmarks"].values()))["modes"]
        section = report.split(title)[1].split("## ")[0]
        assert (f"| all | {modes['think']['n']} | {100 * modes['no_think']['accuracy']:.1f} | "
                f"{100 * modes['think']['accuracy']:.1f} | {100 * modes['auto']['accuracy']:.1f} |") in section
    assert "| after BPO, auto thinks on level 1 <= 20% |" in report
    # every model folder carries a card the Hub's library reads, its stages from the tiny model on; each trained
    # model's card carries its eval table, the metrics files' numbers
    from huggingface_hub import ModelCard

    for name, stages in (("tiny", ["tiny"]), ("annotator", ["tiny", "sft-warmup"]),
                         ("annealed", ["tiny", "sft-warmup", "anneal"]), ("bpo", ["tiny", "sft-warmup", "anneal", "bpo"])):
        card = ModelCard.load(out / name / "README.md")
        assert card.data.pipeline_tag == "image-text-to-text" and stages[-1] in card.data.tags, name
        assert [line.split(": ")[1] for line in card.text.splitlines() if line.startswith("### Stage: ")] == stages
    for name in ("annealed", "bpo"):
        [(bench, metrics)] = json.loads((out / f"eval_{name}" / "metrics.json").read_text())["benchmarks"].items()
        table = (out / name / "README.md").read_text().split("<!-- bimode-eval:start -->")[1]
        auto = metrics["modes"]["auto"]
        assert f"| {bench} | auto | {auto['n']} | {100 * auto['accuracy']:.1f} (" in table, name
        assert f"By difficulty level, {bench}:" in table
    curation = json.loads((out / "curation" / "summary.json").read_text())
    for level, share in curation["think_share_by_level"].items():
        assert f"| {level} | {100 * share:.0f}% |" in report
    second = run("demo", "--quick", "--out", str(out)).stdout
    assert "[bi-mode annealing on the curated mix] already done" in second and "[world] already done" in second
    assert (out / "bpo" / "README.md").read_text().count("<!-- bimode-eval:start -->") == 1  # replaced, not added
    # `make demo ROUTER=1` in the same folder: only BPO (with the router recipe) and its evaluation run again
    third = run("demo", "--quick", "--out", str(out), "--bpo_recipe", "tiny_bpo_router").stdout
    assert "[BPO] the run folder's BPO stage used tiny_bpo, this run tiny_bpo_router" in third
    assert "[BPO (bi-mode rollouts, mixed-group advantages; tiny_bpo_router)] running" in third
    assert "[bi-mode annealing on the curated mix] already done" in third
    assert "| `decision_target` | `majority` |" in (out / "bpo" / "README.md").read_text()
    report = (out / "report.md").read_text()
    assert "## After BPO (tiny_bpo_router)" in report
    for name in ("annealed", "bpo"):  # the decision agreement column is the metrics file's
        bench = next(iter(json.loads((out / f"eval_{name}" / "metrics.json").read_text())["benchmarks"].values()))
        assert (f"| {name} | {100 * bench['modes']['auto']['accuracy']:.1f} | {bench['modes']['auto']['tokens']:.1f} "
                f"| {100 * bench['selection']['hybrid_accuracy']:.0f}% |") in report


def test_demo_passes_its_seed_to_every_stage(monkeypatch, tmp_path, capsys):
    import bimode.demo
    from bimode.cli import main

    seen = {}
    monkeypatch.setattr(bimode.demo, "run_demo", lambda cfg: seen.update(cfg=cfg) or 0)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--seed", "3"]) == 0
    assert seen["cfg"].seed == 3 and seen["cfg"].n_train == 240  # demo_quick.yaml's size
    seen.clear()  # an unknown BPO recipe is refused before any stage runs
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--bpo_recipe", "tiny_bpo_rooter"]) != 0
    assert "no recipe 'tiny_bpo_rooter'" in capsys.readouterr().err and not seen
