"""Model cards (README.md in the Hub's format) in every checkpoint bimode writes, read back with huggingface_hub:
the pure builder, the lineage a next stage inherits, anneal / bpo / export --merge / compose, `bimode eval --card`."""

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from bimode.cli import main
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.models.card import TRANSFORMERS_USAGE, CardFacts, config_settings, marked_part, render_card, \
    with_eval_table
from bimode.models.card_files import hub_id_of, lineage, write_card

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "bimode-tests/tiny-vlm"  # what the start model says it is on the Hub


def load_checked(folder: Path) -> ModelCard:
    """The card, read by huggingface_hub from the file alone, with metadata as the Hub reads it. ModelCard.validate
    asks the Hub's server, so the fields are checked here: the Hub's own field names and kinds, base models that
    are Hub ids (never local paths), the pipeline tag for image-text-to-text models."""
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data  # the metadata round-trips through the library's own class
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] in ("transformers", "peft")
    assert {"bimode", "r4b", "auto-thinking"} <= set(data["tags"])
    bases = data.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        validate_repo_id(base)  # raises on a path
        assert not Path(base).exists(), base
    assert "license" not in data or isinstance(data["license"], str)
    return card


def test_rendered_card_has_the_hubs_metadata_and_says_how_it_was_made():
    facts = CardFacts(stage="bpo", start_model="runs/anneal/final", base_model=["Qwen/Qwen3-4B"],
                      license="apache-2.0", settings={"beta": 0.001, "num_generations": 16},
                      data=[("rl_math.jsonl", 1200)], earlier="### Stage: anneal\n\nAnnealed.")
    text = render_card(facts, "r4b-bpo")
    card = ModelCard(text)
    assert card.data.to_dict() == {"base_model": "Qwen/Qwen3-4B", "library_name": "transformers",
                                   "pipeline_tag": "image-text-to-text", "license": "apache-2.0",
                                   "tags": ["bimode", "r4b", "auto-thinking", "bpo"]}
    made = marked_part(text, "made")
    assert made.index("### Stage: anneal") < made.index("### Stage: bpo")  # the stages in order, oldest first
    assert "`rl_math.jsonl` (1,200 rows)" in made and "| `beta` | `0.001` |" in made
    assert "Start model: `runs/anneal/final`" in made
    assert 'thinking_mode="auto"' in text and "--reasoning-parser qwen3" in text and "chat_template_kwargs" in text
    assert "bimode serve" in text and "from openai import OpenAI" in text
    assert "## Evaluation" not in text  # no table until eval has run
    # unknown facts are left out, an adapter is PEFT's, two parts are two base models
    bare = ModelCard(render_card(CardFacts(stage="tiny"), "t")).data.to_dict()
    assert "base_model" not in bare and "license" not in bare
    lora = ModelCard(render_card(CardFacts(stage="anneal", adapter=True, base_model=["a/b", "c/d"]), "x"))
    assert lora.data.library_name == "peft" and lora.data.base_model == ["a/b", "c/d"] and "lora" in lora.data.tags
    with pytest.raises(ValueError, match="card stage 'sft'"):
        CardFacts(stage="sft")


def test_eval_table_is_replaced_not_repeated():
    text = render_card(CardFacts(stage="tiny"), "t")
    once = with_eval_table(text, "| first |")
    twice = with_eval_table(once, "| second |")
    assert once.count("## Evaluation") == twice.count("## Evaluation") == 1
    assert marked_part(twice, "eval") == "| second |" and "| first |" not in twice
    assert twice.split("## Evaluation")[0] == text.rstrip("\n") + "\n\n"  # the rest of the card untouched
    assert ModelCard(twice).data.to_dict() == ModelCard(text).data.to_dict()


def test_recipe_settings_are_the_fields_that_differ_from_the_defaults():
    from bimode.recipes import load_recipe
    from bimode.train.anneal import AnnealConfig

    cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path="m", train_files=["a.jsonl"], output_dir="o",
                      max_steps=3)
    settings = config_settings(cfg)
    assert settings["max_steps"] == 3 and settings["learning_rate"] == 0.003
    assert settings["lr_scheduler_type"] == "cosine_with_min_lr"  # an enum as its value
    for where in ("output_dir", "model_path", "train_files", "report_to", "logging_steps", "save_steps"):
        assert where not in settings, where
    assert "weight_decay" not in settings  # the recipe's 0.0 is the default


def test_start_models_pass_on_what_is_known_and_nothing_else(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-4B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3-4B-Base\n---\n# Qwen3\n")
    # a Hub snapshot is its own base (not its card's base_model: that is its parent), with its card's license
    assert hub_id_of(snapshot) == "Qwen/Qwen3-4B" and lineage(snapshot) == (["Qwen/Qwen3-4B"], "apache-2.0", "")
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": HUB_ID, "license": "mit"}))
    assert lineage(named) == ([HUB_ID], "mit", "")
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(named)}))
    assert lineage(local) == ([], None, "")  # a path is never a base model
    (local / "config.json").write_text(json.dumps({"_name_or_path": "./some/dir"}))
    assert hub_id_of(local) is None
    made = tmp_path / "made"
    made.mkdir()
    write_card(made, CardFacts(stage="anneal", base_model=["Qwen/Qwen3-4B"], license="apache-2.0"))
    base, license_, earlier = lineage(made)  # a bimode card passes on its base, license and stages
    assert (base, license_) == (["Qwen/Qwen3-4B"], "apache-2.0") and earlier.startswith("### Stage: anneal")
    (made / "README.md").write_text("---\n: [unclosed\n---\n")
    assert lineage(made) == ([], None, "")  # a broken card stops nothing


def test_the_cards_transformers_example_runs(tiny_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "picture.png")
    code = re.search(r"```python\n(.*?)```", TRANSFORMERS_USAGE, re.S).group(1)
    code = code.replace("path/to/this/model", str(tiny_dir)).replace("picture.png", str(tmp_path / "picture.png"))
    namespace = {}
    exec(code.replace("max_new_tokens=1024", "max_new_tokens=4"), namespace)  # noqa: S102 (the card's own code)
    assert namespace["text"].endswith("<|im_start|>assistant\n<think>")  # thinking_mode reached the template
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_the_cards_openai_client_example_runs_against_bimode_serve(tiny_dir, monkeypatch):
    import base64
    import io

    from PIL import Image

    import bimode.serve.app
    from bimode.models.card import SERVING_USAGE
    from tests.helpers.servers import serve_in_thread

    apps = []
    monkeypatch.setattr(bimode.serve.app, "run_app", lambda app, *args: apps.append(app))  # what `serve` would run
    assert main(["serve", str(tiny_dir), "--max-tokens", "64"]) == 0 and len(apps) == 1
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    code = re.findall(r"```python\n(.*?)```", SERVING_USAGE, re.S)[0]
    base, stop = serve_in_thread(apps[0])
    try:
        code = code.replace("http://127.0.0.1:8000/v1", base + "/v1").replace("max_tokens=1024", "max_tokens=6")
        namespace = {}
        exec(code.replace("data:image/png;base64,...",  # noqa: S102 (the card's own code)
                          "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()), namespace)
    finally:
        stop()
    message = namespace["message"]
    assert namespace["response"].usage.completion_tokens > 0 and message.content is not None
    assert hasattr(message, "reasoning_content")  # the field the example prints, as bimode serve sends it


@pytest.fixture
def hub_tiny(tiny_dir, tmp_path):
    """The tiny model as if downloaded from the Hub: its config names its Hub id, its card a license."""
    folder = shutil.copytree(tiny_dir, tmp_path / "hub_tiny")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/its-parent\n---\n# tiny\n")
    return folder


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(16, seed=1, families=["count"], max_level=2)], path)
    return path


COMMON = ["--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--max_steps", "1"]


def test_anneal_lora_export_and_bpo_each_write_a_card_that_carries_the_lineage(hub_tiny, records, tmp_path):
    anneal, merged, bpo = tmp_path / "anneal", tmp_path / "merged", tmp_path / "bpo"
    assert main(["anneal", "--config", "tiny_anneal", "--model_path", str(hub_tiny), "--train_files", str(records),
                 "--output_dir", str(anneal), "--per_device_train_batch_size", "4", "--use_peft", "true",
                 "--lora_r", "4", *COMMON]) == 0
    card = load_checked(anneal / "final")  # an adapter folder: PEFT's own README replaced by ours
    assert card.data.library_name == "peft" and card.data.base_model == HUB_ID and card.data.license == "apache-2.0"
    assert "anneal" in card.data.tags and "`train.jsonl` (16 rows)" in card.text
    assert "| `use_peft` | `True` |" in card.text and "| `lora_r` | `4` |" in card.text  # TRL's ModelConfig too
    assert f"Start model: `{hub_tiny}`" in card.text

    assert main(["export", "--merge", str(anneal / "final"), "--out", str(merged)]) == 0
    card = load_checked(merged)
    assert card.data.library_name == "transformers" and card.data.base_model == HUB_ID
    made = marked_part(card.text, "made")
    assert made.index("### Stage: anneal") < made.index("### Stage: lora-merged")

    assert main(["bpo", "--config", "tiny_bpo", "--model_path", str(merged), "--train_files", str(records),
                 "--output_dir", str(bpo), "--num_generations", "4", "--per_device_train_batch_size", "4",
                 "--max_completion_length", "6", "--probe_files", str(records), "--probe_steps", "0", *COMMON]) == 0
    card = load_checked(bpo / "final")
    assert card.data.base_model == HUB_ID and card.data.license == "apache-2.0" and "bpo" in card.data.tags
    made = marked_part(card.text, "made")
    assert [m.group(1) for m in re.finditer(r"### Stage: (\S+)", made)] == ["anneal", "lora-merged", "bpo"]
    assert "| `num_generations` | `4` |" in made.split("### Stage: bpo")[1]


def test_compose_writes_a_card_naming_the_parts_the_hub_knows(tmp_path):
    from tests.helpers.hf_fixtures import build_tiny_encoder, build_tiny_llm

    encoder = build_tiny_encoder(tmp_path / "siglip", "siglip")
    llm = build_tiny_llm(tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc", "qwen3")
    for part in (encoder, llm):
        (part / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    out = tmp_path / "composed"
    assert main(["compose", "--vision", str(encoder), "--llm", str(llm), "--out", str(out)]) == 0
    card = load_checked(out)
    assert card.data.base_model == "Qwen/Qwen3-0.6B"  # the encoder's Hub id is unknown: left out
    assert card.data.license == "apache-2.0" and "composed" in card.data.tags
    assert "fresh, untrained projector" in card.text


def test_eval_card_writes_the_table_and_a_rerun_replaces_it(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    write_card(model, CardFacts(stage="tiny"))
    bench = tmp_path / "eval.jsonl"
    write_records([s.to_record() for s in synthetic.generate(4, seed=2, split="eval", families=["count"])], bench)
    run = ["eval", str(model), "--bench", str(bench), "--modes", "no_think,auto", "--max_new_tokens", "4", "--card"]
    assert main([*run, "--out", str(tmp_path / "a"), "--limit", "4"]) == 0
    card = load_checked(model)
    table = marked_part(card.text, "eval")
    [(name, metrics)] = json.loads((tmp_path / "a" / "metrics.json").read_text())["benchmarks"].items()
    no_think = metrics["modes"]["no_think"]
    assert (f"| {name} | no_think | 4 | {100 * no_think['accuracy']:.1f} (" in table and "modes no_think, auto" in table
            and "`eval.jsonl`" in table and f"By difficulty level, {name}:" in table)
    assert main([*run, "--out", str(tmp_path / "b"), "--limit", "2"]) == 0
    text = (model / "README.md").read_text()
    assert text.count("<!-- bimode-eval:start -->") == 1 and f"| {name} | no_think | 2 |" in marked_part(text, "eval")
    assert "### Stage: tiny" in text  # the rest of the card kept
    assert main(["eval", "--endpoint", "http://127.0.0.1:9/v1", "--bench", str(bench), "--out", str(tmp_path / "c"),
                 "--card"]) == 2  # no local folder to write into


def test_a_sharded_eval_writes_the_card_when_merged(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    bench = tmp_path / "eval.jsonl"
    write_records([s.to_record() for s in synthetic.generate(2, seed=2, split="eval", families=["count"])], bench)
    run = ["eval", str(model), "--bench", str(bench), "--modes", "no_think", "--max_new_tokens", "2",
           "--batch_size", "1", "--num_shards", "2"]
    assert main([*run, "--shard_index", "0", "--out", str(tmp_path / "s0"), "--card"]) == 2  # a shard has no table
    for i in (0, 1):
        assert main([*run, "--shard_index", str(i), "--out", str(tmp_path / f"s{i}")]) == 0
    assert not (model / "README.md").exists()
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all"),
                 "--card"]) == 0
    table = marked_part(load_checked_bare(model), "eval")
    assert "in 2 shards, merged" in table and re.search(r"\| \S+ \| no_think \| 2 \|", table)


def load_checked_bare(folder: Path) -> str:
    """A card eval wrote into a folder that had none: the Hub's metadata, no bimode tags (bimode did not make it)."""
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict() == {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
    return card.text
