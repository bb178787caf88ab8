"""How many new tokens a command generates when the user does not say.

The rule (eval, chat, curation): an explicit limit wins; else the `max_new_tokens` the model's own generation
config sets (its checkpoint's `generation_config.json`); else 8,192, what the paper evaluates with
(docs/r4b.md, section 7). A thinking model's trace is often thousands of tokens: a small fixed limit cuts it
and the cut response scores 0.

Only `max_new_tokens` counts. transformers' GenerationConfig defaults (`max_length=20`, `max_new_tokens=None`)
are what every model gets without a file, not a choice of the checkpoint, and `max_length` counts the prompt
too, so neither is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bimode.errors import UsageError

PAPER_MAX_NEW_TOKENS = 8192
# the rule as `--help` states it for every limit flag
DEFAULT_LIMIT_HELP = (f"the model's generation_config.json max_new_tokens, else {PAPER_MAX_NEW_TOKENS:,}, "
                      "the paper's evaluation limit")


def configured_max_new_tokens(source: Any) -> int | None:
    """The `max_new_tokens` a model's generation config sets, or None.

    `source`: a model (its `.generation_config`), an engine (its `.model`), a GenerationConfig, a dict (a
    parsed generation_config.json), or a checkpoint folder / generation_config.json path (read as JSON,
    so nothing is loaded).
    """
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / "generation_config.json" if path.is_dir() else path
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if isinstance(source, dict):
        value = source.get("max_new_tokens")
    else:
        config = source
        if not hasattr(config, "max_new_tokens"):  # not a GenerationConfig: a model, or an engine over one
            config = getattr(source, "generation_config", None) or getattr(
                getattr(source, "model", None), "generation_config", None)
        value = getattr(config, "max_new_tokens", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def default_max_new_tokens(source: Any = None, explicit: int | None = None) -> int:
    """The limit to generate with: `explicit` when given, else the model's configured one, else 8,192."""
    if explicit is not None:
        if explicit < 1:
            raise UsageError("max_new_tokens must be at least 1")
        return explicit
    return configured_max_new_tokens(source) or PAPER_MAX_NEW_TOKENS
