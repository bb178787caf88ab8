"""The trained tiny model: the tiny model after a short bi-mode SFT on two families, and the cache that keeps it
between test sessions (the `trained_tiny` fixture in tests/conftest.py)."""

import hashlib
import os
import shutil
from pathlib import Path

TRAINED_FAMILIES = ("count", "shell")
TRAINED_MAX_LEVEL = 3

ROOT = Path(__file__).resolve().parents[2]


def source_digest() -> str:
    """A digest of bimode's package files (code, chat template, prompts) and this file: what the trained model
    depends on besides the libraries."""
    files = [p for p in (ROOT / "src" / "bimode").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    digest = hashlib.sha256()
    for path in sorted(files) + [Path(__file__).resolve()]:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> str:
    import torch
    import transformers

    return f"torch{torch.__version__}-transformers{transformers.__version__}".replace("+", "_")


def cached_trained_tiny(cache_mkdir, scratch: Path) -> Path:
    """The trained model kept in pytest's cache (`cache_mkdir`: its `config.cache.mkdir`) under
    trained_tiny-<code digest>-<versions>/sft, trained into `scratch` first when absent; with
    BIMODE_TESTS_ANY_TRAINED_VERSION=1, one trained by the same code under other library versions will do.
    Models of other code are deleted: never used again."""
    from filelock import FileLock

    code = source_digest()
    cached = cache_mkdir(f"trained_tiny-{code}-{library_versions()}") / "sft"
    # `make test`'s workers (pytest-xdist) share the cache: one trains, the others wait for its model
    with FileLock(str(cached.parent.parent / "trained_tiny.lock")):
        return _cached_or_trained(cached, code, scratch)


def _cached_or_trained(cached: Path, code: str, scratch: Path) -> Path:
    cache_root = cached.parent.parent
    if (cached / "config.json").exists():
        return cached
    if os.environ.get("BIMODE_TESTS_ANY_TRAINED_VERSION") == "1":
        others = sorted(cache_root.glob(f"trained_tiny-{code}-*/sft/config.json"), key=lambda p: p.stat().st_mtime)
        if others:
            return others[-1].parent
    for old in cache_root.glob("trained_tiny-*"):
        if not old.name.startswith(f"trained_tiny-{code}-"):
            shutil.rmtree(old, ignore_errors=True)
    out = train_tiny(scratch)
    staging = cached.with_name(f"sft.partial-{os.getpid()}")
    shutil.copytree(out, staging)
    staging.rename(cached)  # whole or absent: a run cut off midway leaves no half model behind
    return cached


def train_tiny(base_dir: Path) -> Path:
    """Build the tiny model in base_dir/base and save it after SFT in base_dir/sft (about 100 s, on one thread)."""
    import torch

    from bimode.data import synthetic
    from bimode.models import load_model
    from bimode.models.tiny import build_tiny
    from bimode.train.sft_warmup import SimpleSFTConfig, train_sft

    path = build_tiny(base_dir / "base")
    model, processor = load_model(path, dtype=torch.float32)
    records = [s.to_record() for s in synthetic.generate(1500, seed=11, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    # One thread, however the session runs (alone with a thread per core, or as one of `make test`'s workers):
    # the thread count changes the sums' rounding and so the trained weights, which the tests then read.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Measured: 400-500 steps of 16 give 0.79-0.83 think-mode accuracy on held-out samples (chance ~0.3).
        train_sft(model, processor, records, cfg=SimpleSFTConfig(steps=450, batch_size=16, progress=False))
    finally:
        torch.set_num_threads(threads)
    out = path.parent / "sft"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
