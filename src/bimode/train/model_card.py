"""The model card of a trained checkpoint (`bimode anneal` / `bimode bpo` final/, the demo's models)."""

from __future__ import annotations

from pathlib import Path

from bimode.models.card import CardFacts, config_settings
from bimode.models.card_files import lineage, row_counts, write_card


def training_card_facts(stage: str, cfg, model_args=None, folder: str | Path | None = None) -> CardFacts:
    """A training stage's card: its start model (cfg.model_path, else TRL's model_name_or_path), its record
    files with their rows, and the recipe's fields that differ from the defaults (TRL's ModelConfig's too:
    LoRA settings). `folder`: the saved checkpoint, an adapter folder when it holds adapter_config.json."""
    start = getattr(cfg, "model_path", "") or getattr(model_args, "model_name_or_path", "") or ""
    base, license_, earlier = lineage(start) if start else ([], None, "")
    files = list(getattr(cfg, "train_files", []) or [])  # what it trained on (BPO's probe files only watch)
    adapter = folder is not None and (Path(folder) / "adapter_config.json").exists() \
        and not (Path(folder) / "config.json").exists()
    return CardFacts(stage=stage, start_model=start or None, base_model=base, license=license_, adapter=adapter,
                     settings=config_settings(cfg, model_args), data=row_counts(files), earlier=earlier)


def write_training_card(folder: str | Path, stage: str, cfg, model_args=None) -> Path:
    """Write the card of a trained checkpoint into its folder."""
    return write_card(folder, training_card_facts(stage, cfg, model_args, folder))
