"""Model cards on disk: the facts a card states, read from the start model's folder and the data files, and
the README.md written into a checkpoint folder (models/card.py renders it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from bimode.io import atomic_write_text
from bimode.models.card import CARD_FILE, MADE, PIPELINE_TAG, CardFacts, looks_like_hub_id, marked_part, \
    render_card, with_eval_table

FRONT_MATTER = re.compile(r"---[ \t]*\n(.*?)\n---[ \t]*(?:\n|$)", re.S)


def read_card(folder: str | Path) -> tuple[dict, str]:
    """A folder's card: (its YAML metadata, its whole text); ({}, "") where it has none. Metadata that does not
    parse counts as none: a card written by hand must not stop a training run."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8", errors="replace")
    front = FRONT_MATTER.match(text)  # the Hub's rule: YAML between a first line "---" and the next such line
    try:
        meta = yaml.safe_load(front.group(1)) if front else {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text


def hub_id_of(folder: str | Path) -> str | None:
    """The Hub id a local model folder came from, where its path or config says so: a Hugging Face cache
    snapshot (`models--ORG--NAME/snapshots/SHA`), or a config.json whose `_name_or_path` is a Hub id rather than
    a path. None otherwise: a card must not name a local path as its base model."""
    folder = Path(folder)
    for part in folder.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            org, name = part[len("models--"):].split("--", 1)
            return f"{org}/{name}"
    config = _config(folder)
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and looks_like_hub_id(name) and not Path(name).exists() else None


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def lineage(start: str | Path) -> tuple[list[str], str | None, str]:
    """What a model made from `start` inherits: (base_model Hub ids, license, earlier stages). A bimode card
    in `start` passes on its own base models, license and stages; any other folder is itself the base where its
    Hub id is known (hub_id_of), with the license its card or config names. A LoRA adapter folder without a
    bimode card stands for its base model."""
    from bimode.models.loading import adapter_base

    start = Path(start)
    meta, text = read_card(start)
    if "bimode" in (meta.get("tags") or []):
        base = meta.get("base_model") or []
        base = [base] if isinstance(base, str) else [b for b in base if isinstance(b, str)]
        license_ = meta.get("license")
        return base, license_ if isinstance(license_, str) else None, marked_part(text, MADE) or ""
    if not (start / "config.json").exists() and (start / "adapter_config.json").exists():
        try:
            base_folder = adapter_base(start)
        except (OSError, ValueError):
            base_folder = None
        return lineage(base_folder)[:2] + ("",) if base_folder is not None else ([], None, "")
    hub_id = hub_id_of(start)
    license_ = meta.get("license") or _config(start).get("license")
    return ([hub_id] if hub_id else []), license_ if isinstance(license_, str) else None, ""


def row_counts(files) -> list[tuple[str, int | None]]:
    """(file name, rows) of each record file, counted without reading the records; None where it cannot be."""
    return [(Path(f).name, _rows(Path(f))) for f in files]


def _rows(path: Path) -> int | None:
    try:
        if path.is_dir():
            import datasets

            return len(datasets.load_from_disk(str(path)))
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                return sum(1 for line in fh if line.strip())
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            return len(rows) if isinstance(rows, list) else None
    except (OSError, ValueError):
        return None
    return None


def write_card(folder: str | Path, facts: CardFacts, title: str | None = None) -> Path:
    """Write the card into a checkpoint folder (replacing one a previous run left there). Its title: `title`, else
    the folder's name (its run's, for a training run's final/)."""
    folder = Path(folder)
    path = folder / CARD_FILE
    name = folder.resolve().name
    atomic_write_text(path, render_card(facts, title or (folder.resolve().parent.name if name == "final" else name)))
    return path


def write_eval_table(folder: str | Path, table: str) -> Path:
    """Put `bimode eval`'s table into a model folder's card, replacing the table a previous eval wrote. A folder
    without a card gets a short one holding the metadata bimode knows and the table."""
    folder = Path(folder)
    _, text = read_card(folder)
    atomic_write_text(folder / CARD_FILE, with_eval_table(text or _bare_card(folder), table))
    return folder / CARD_FILE


def _bare_card(folder: Path) -> str:
    adapter = not (folder / "config.json").exists() and (folder / "adapter_config.json").exists()
    meta = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": PIPELINE_TAG}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {folder.resolve().name}\n"
