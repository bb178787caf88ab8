"""Seeds derived from names, so that what a row samples does not depend on where or with whom it runs.

A run seed and a row id give the row's seed (`row_seed`); a row's seed and a sample index give that sample's
(`sample_seed`). Curation seeds every query this way, so the single process, each shard of a sharded run and each
Ray worker draw the same samples for it, whatever batch or worker it lands in (docs/cluster.md).
"""

from __future__ import annotations

import hashlib

_SEED_BITS = 63  # torch.Generator, vLLM and OpenAI's `seed` all take a non-negative 64-bit signed integer


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from any parts (their `repr`s, in order): stable across processes and Python versions,
    unlike `hash()`."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def row_seed(run_seed: int, row_id: str, purpose: str = "") -> int:
    """The seed of one row of a run (`purpose` keeps two uses of the same row apart, e.g. answers and traces)."""
    return derive_seed("row", run_seed, row_id, purpose)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` drawn for a prompt seeded `seed`."""
    return derive_seed("sample", seed, index)
