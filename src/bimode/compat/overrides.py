"""Private methods of library classes that bimode's classes override.

BPOTrainer overrides TRL's `GRPOTrainer._generate_and_score_completions` and `_get_per_token_logps_and_entropies`,
both trainers transformers' `Trainer._load_from_checkpoint` (StrictResumeMixin), and bimode's vLLM generation TRL's
`VLLMGeneration._fix_param_name_to_vllm` and `_iter_named_params`. The libraries call them by
keyword, so a parameter renamed in a release would be dropped without an error; `check_overrides` compares
every private override with the method it replaces and refuses to build the trainer when they differ, or when the
library no longer has one of the methods bimode replaces (the override would then never be called).
"""

from __future__ import annotations

import inspect

# library methods bimode's trainers replace: each must still exist (a bimode-only private helper need not)
REPLACED = ("_generate_and_score_completions", "_get_per_token_logps_and_entropies", "_load_from_checkpoint",
            "_fix_param_name_to_vllm", "_iter_named_params")


def _ours(klass: type) -> bool:
    return klass.__module__.split(".")[0] == "bimode"


def check_overrides(cls: type) -> None:
    """Refuse a class whose private method overrides take other parameters than the library methods they
    replace (checked by name and order, what a keyword call depends on)."""
    mro = cls.__mro__
    for position, klass in enumerate(mro):
        if not _ours(klass):
            continue
        for name, ours in vars(klass).items():
            if not (name.startswith("_") and not name.startswith("__") and callable(ours)):
                continue
            owner = next((b for b in mro[position + 1:] if not _ours(b) and name in vars(b)), None)
            if owner is None:
                if name in REPLACED:
                    raise RuntimeError(
                        f"bimode's {klass.__name__}.{name} replaces a library method that no base class of "
                        f"{cls.__name__} has any more, so it would never be called: this library release changed "
                        "an internal bimode relies on (docs/internals.md); install the versions pyproject.toml names")
                continue
            theirs = list(inspect.signature(vars(owner)[name]).parameters)
            mine = list(inspect.signature(ours).parameters)
            if mine != theirs:
                raise RuntimeError(
                    f"{owner.__module__}.{owner.__qualname__}.{name} takes ({', '.join(theirs)}), but bimode's "
                    f"{klass.__name__}.{name} overrides it with ({', '.join(mine)}): this library release "
                    "changed an internal bimode relies on (docs/internals.md); install the versions pyproject.toml "
                    "names")
