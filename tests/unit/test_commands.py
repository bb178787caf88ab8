"""Every command is configured one way: dataclass configs, a YAML recipe plus flags, `--help` from the fields."""

import dataclasses
import importlib
import os
from pathlib import Path

import pytest

from bimode.cli import main
from bimode.commands import COMMANDS, find_command
from bimode.recipes import RECIPES, load_recipe, recipe_values

ROOT = Path(__file__).resolve().parents[2]


def parser_of(words):
    return importlib.import_module(f"bimode.commands.{COMMANDS[words][0]}").make_parser(prog="bimode " + " ".join(words))


@pytest.mark.parametrize("words", [w for w in COMMANDS if w not in (("anneal",), ("bpo",))], ids=" ".join)
def test_help_is_generated_from_every_field_of_the_commands_configs(words):
    parser = parser_of(words)
    text = " ".join(parser.format_help().split())
    assert text.startswith(f"usage: bimode {' '.join(words)} ")
    squeezed = "".join(text.split())  # argparse wraps at hyphens too
    for config in parser.dataclass_types:
        for f in dataclasses.fields(config):
            assert f"--{f.name}" in text, (words, f.name)  # no field unreachable from the command line
            assert "".join(f.metadata["help"].split()) in squeezed, (words, f.name)


def test_the_longest_command_wins_and_a_group_alone_is_refused(capsys):
    assert find_command(["eval", "compare", "a", "b"]) == (("eval", "compare"), ["a", "b"])
    assert find_command(["eval", "m", "--bench", "b"]) == (("eval",), ["m", "--bench", "b"])
    with pytest.raises(SystemExit) as exit_:
        main(["data"])
    assert exit_.value.code == 2 and "synth, convert" in capsys.readouterr().err


def test_a_recipe_sets_fields_and_flags_beside_it_win():
    from bimode.commands import curate

    cmd, cfg, _ = curate.make_parser().parse_args_and_config([
        "--config", str(RECIPES / "tiny_curate.yaml"), "--input", "a.jsonl", "--out", "o", "--annotator", "m",
        "--n_samples", "6"])
    assert (cfg.n_samples, cfg.max_correct, cfg.temperature) == (6, 3, 0.5)  # flag, then the recipe's values
    assert cmd.input == ["a.jsonl"]


def test_positional_model_and_flag_are_the_same_field():
    from bimode.commands import chat

    by_position = chat.make_parser().parse_args_and_config(["m1", "--mode", "short"])[0]
    by_flag = chat.make_parser().parse_args_and_config(["--model", "m1", "--mode", "short"])[0]
    assert by_position == by_flag and by_flag.mode == "no_think"  # R-4B's name, parsed by ThinkingMode


@pytest.mark.parametrize("argv, message", [
    (["chat", "m", "--think_threshold", "1.5"], "think_threshold must be between 0 and 1, got 1.5"),
    (["chat", "m", "--mode", "maybe"], "unknown thinking mode 'maybe'"),
    (["eval", "m", "--bench", "b", "--out", "o", "--modes", "auto,sometimes"], "unknown thinking mode 'sometimes'"),
    (["curate", "--input", "i", "--out", "o", "--annotator", "m", "--n_samples", "4", "--max_correct", "4"],
     "max_correct must be in [0, n_samples)"),
    (["serve", "m", "--default_chat_template_kwargs", "[1]"], "must be a JSON object"),
    (["demo", "--quick", "--config", "x.yaml"], "give --quick or --config, not both"),
    (["eval", "calibrate", "run"], "give one goal"),
    (["eval", "calibrate", "run", "--max_drop", "1", "--holdout", "r2", "--holdout_fraction", "0.3"],
     "give one of the two"),
    (["eval", "m", "--endpoint", "http://x", "--bench", "b", "--out", "o"], "the model id at an endpoint is --endpoint_model"),
    (["eval", "m", "--bench", "b", "--out", "o", "--judge_model", "j"], "--judge_model names the model at a --judge URL"),
    (["demo", "--quick", "--families", "count", "chess"], "families: unknown families ['chess']"),
    (["curate", "--input", "i", "--out", "o", "--annotator", "m", "--blocked_keywords_file", "nowhere.txt"],
     "blocked_keywords_file: no file nowhere.txt"),
    (["eval", "compare", "a"], "takes two run directories, got 1"),
    (["eval", "calibrate", "run", "--max_drop", "1", "--confidence", "1"], "--confidence must be in [0, 1), got 1.0"),
    (["bpo", "--output_dir", "o", "--mode_objective", "router"], "mode_objective must be one of"),
    (["bpo", "--output_dir", "o", "--repetition_penalty", "1.2"], "repetition_penalty 1.2: without use_vllm"),
    (["anneal", "--output_dir", "o", "--optim", "adalomo"], "optim adalomo: this optimizer picks its own parameters"),
    (["anneal", "--output_dir", "o", "--dataset_num_proc", "8"], "dataset_num_proc 8: bimode anneal does not read it"),
    (["data", "synth", "--out", "s.jsonl", "--format", "parquet"], "is a jsonl file but format is parquet"),
    (["plan", "--recipe", "tiny_anneal", "--gpu_gib", "0"], "gpu_gib must be above 0"),
])
def test_bad_settings_are_refused_naming_the_field(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_refuses_prompt_tokens_for_an_anneal_recipe(tiny_dir, capsys):
    """prompt_tokens sizes BPO's rollouts: an anneal plan would ignore it."""
    assert main(["plan", "--recipe", "tiny_anneal", "--model", str(tiny_dir), "--prompt_tokens", "100"]) == 2
    assert "prompt_tokens sizes BPO's rollouts; tiny_anneal plans bimode anneal" in capsys.readouterr().err


def test_blocked_keywords_given_a_file_name_point_to_the_file_flag(tmp_path):
    """--blocked-keywords FILE was the old flag: a lone existing path is refused, not taken as one keyword."""
    from bimode.curate.pipeline import CurateConfig

    words = tmp_path / "words.txt"
    words.write_text("solution manual\n\nanswer key\n")
    with pytest.raises(ValueError, match="use --blocked_keywords_file"):
        CurateConfig(blocked_keywords=[str(words)])
    assert CurateConfig(blocked_keywords_file=str(words)).blocked_keywords == ["solution manual", "answer key"]


def test_image_repeats_and_takes_several():
    from bimode.commands import chat

    (cfg,) = chat.make_parser().parse_args_and_config(["m", "--image", "a.png", "--image", "b.png", "c.png"])
    assert cfg.image == ["a.png", "b.png", "c.png"] and cfg.model == "m"


def test_eval_modes_take_commas_or_spaces():
    from bimode.eval.runner import EvalConfig

    assert EvalConfig(modes=["auto,think", "short"]).modes == ["auto", "think", "no_think"]


RECIPE_CONFIGS = {"tiny_curate": "bimode.curate.pipeline:CurateConfig", "tiny_eval": "bimode.eval.runner:EvalConfig",
                  "demo": "bimode.demo:DemoConfig", "demo_quick": "bimode.demo:DemoConfig",
                  "tiny_anneal": "bimode.train.anneal:AnnealConfig", "r4b_anneal": "bimode.train.anneal:AnnealConfig",
                  **{f"r4b_stage{s}": "bimode.train.anneal:AnnealConfig" for s in ("1_projector", "2_alignment", "3_joint")},
                  "tiny_bpo": "bimode.train.bpo.trainer:BPOConfig", "r4b_bpo": "bimode.train.bpo.trainer:BPOConfig",
                  "tiny_bpo_router": "bimode.train.bpo.trainer:BPOConfig"}


def test_every_recipe_loads_into_its_config():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(RECIPE_CONFIGS)
    for recipe, target in RECIPE_CONFIGS.items():
        module, name = target.split(":")
        config_class = getattr(importlib.import_module(module), name)
        extra = {"use_cpu": True, "bf16": False} if "Config" in name and "train" in module else {}
        cfg = load_recipe(config_class, recipe, **extra)
        assert isinstance(cfg, config_class), recipe


def test_the_router_recipe_is_tiny_bpo_with_the_decision_learned_per_query():
    """Recipes do not inherit, so the router's copy of tiny_bpo is held to it here: only these fields differ."""
    plain, router = recipe_values("tiny_bpo"), recipe_values("tiny_bpo_router")
    differs = {k for k in plain.keys() | router.keys() if plain.get(k) != router.get(k)}
    assert differs == {"decision_target", "output_dir"} and router["decision_target"] == "majority"


def test_a_recipe_with_an_unknown_field_names_the_file_and_field(tmp_path):
    from bimode.eval.runner import EvalConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_new_tokens: 8\nmax_new_token: 9\n")
    with pytest.raises(ValueError, match=r"bad.yaml: EvalConfig has no field max_new_token"):
        load_recipe(EvalConfig, bad)
    with pytest.raises(FileNotFoundError, match="no recipe 'nope'"):
        load_recipe(EvalConfig, "nope")


def test_the_demo_and_scripts_run_the_committed_recipes_not_copies():
    """The tiny recipes' values are written once: the demo and scripts load them with overrides."""
    for path in [ROOT / "src/bimode/demo.py", *sorted((ROOT / "scripts").glob("*.py"))]:
        text = path.read_text()
        for restated in ("learning_rate=3e-3", "learning_rate=1e-4", "adam_beta2=0.98", "max_completion_length=40",
                         "max_new_tokens=48", "BPOConfig(", "AnnealConfig(", "CurateConfig(", "EvalConfig("):
            assert restated not in text, (path.name, restated)


def test_a_recipe_reads_the_same_by_name_by_path_and_through_load_recipe(tmp_path, monkeypatch):
    """One recipe path (TrlParser's --config) for the CLI, the demo and scripts: a shipped recipe's name works
    where a file does, and load_recipe applies a recipe's `env` block and its overrides as the CLI does."""
    from bimode.commands import eval as eval_command
    from bimode.eval.runner import EvalConfig

    _, by_name, _ = eval_command.make_parser().parse_args_and_config(["m", "--config", "tiny_eval", "--bench", "b.jsonl",
                                                                 "--out", "o", "--batch_size", "3"])
    _, by_path, _ = eval_command.make_parser().parse_args_and_config(["m", "--config", str(RECIPES / "tiny_eval.yaml"),
                                                                 "--bench", "b.jsonl", "--out", "o", "--batch_size", "3"])
    loaded = load_recipe(EvalConfig, "tiny_eval", batch_size=3)
    assert by_name == by_path == loaded and loaded.max_new_tokens == 48
    recipe = tmp_path / "with_env.yaml"
    recipe.write_text("env:\n  BIMODE_RECIPE_TEST: seen\nmax_new_tokens: 7\n")
    monkeypatch.delenv("BIMODE_RECIPE_TEST", raising=False)
    assert load_recipe(EvalConfig, recipe).max_new_tokens == 7
    assert os.environ["BIMODE_RECIPE_TEST"] == "seen"


def test_bimode_configs_lists_the_shipped_files_and_prints_ones_path(capsys):
    from bimode.recipes import LAUNCH_CONFIGS

    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "tiny_bpo" in listing and "r4b_anneal" in listing and "cpu2_zero3" in listing
    assert main(["configs", "zero2"]) == 0
    assert capsys.readouterr().out.strip() == str(LAUNCH_CONFIGS / "zero2.yaml")
    assert main(["configs", "tiny_bpo"]) == 0
    assert capsys.readouterr().out.strip() == str(RECIPES / "tiny_bpo.yaml")
    assert main(["configs", "nope"]) == 2
    assert "no recipe or launch config 'nope'" in capsys.readouterr().err

