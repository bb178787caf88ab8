"""Bi-mode curation: `heuristics` labels a query thinking or non-thinking (performance- and difficulty-based,
the judge's verdict, near-duplicates); `pipeline` is the `bimode curate` stage (batches, resume, outputs)."""

from bimode.curate.pipeline import CurateConfig, check_record, curate_batch, default_judge_prompt, run_curation

__all__ = ["CurateConfig", "check_record", "curate_batch", "default_judge_prompt", "run_curation"]
