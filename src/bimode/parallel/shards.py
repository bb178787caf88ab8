"""Shards: K processes started apart (SLURM array tasks, Kubernetes indexed jobs) that each run the batches
numbered i mod K of the same command into their own folder, and the checks that let `merge` combine them.

Each shard folder holds the command's resume log and `shard.json`: which shard it is, of how many, how many batches
the whole run has, a fingerprint of what decides the output (the labelling or generation settings, the models, the
input files' contents), and whether it finished. `check_shards` refuses a set with a shard missing, a shard given
twice, a shard of another run (another fingerprint or shard count) or one that did not finish, naming the folders.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bimode.errors import MissingInputError, OutputExistsError, UsageError
from bimode.io import atomic_write_text

MANIFEST = "shard.json"


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index

    @property
    def whole(self) -> bool:
        return self.count == 1


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (name and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(settings: dict, inputs: list) -> str:
    """What makes two runs the same run: their settings (JSON-able) and their input files' contents."""
    body = json.dumps({"settings": settings, "inputs": [file_digest(p) for p in inputs]}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def write_manifest(out: Path, kind: str, shard: Shard, run_fingerprint: str, num_batches: int, finished: bool,
                   **extra) -> None:
    manifest = {"kind": kind, "shard_index": shard.index, "num_shards": shard.count, "fingerprint": run_fingerprint,
                "num_batches": num_batches, "finished": finished, **extra}
    atomic_write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_resumable(out: Path, shard: Shard, run_fingerprint: str | None, log_name: str) -> None:
    """A shard folder that another run's command would resume (another fingerprint or shard, or no shard: a plain
    run, `run_fingerprint` None), or a plain run's folder resumed as a shard, is refused: it would mix two runs."""
    out = Path(out)
    if (out / MANIFEST).exists() and shard.whole:
        old = read_manifest(out)
        raise OutputExistsError(f"{out} holds shard {old.get('shard_index')} of {old.get('num_shards')} of a sharded "
                                "run: merge it with the others, or pass --overwrite to start a plain run there")
    if shard.whole:
        return
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        if (old.get("fingerprint"), old.get("shard_index"), old.get("num_shards")) != (
                run_fingerprint, shard.index, shard.count):
            raise OutputExistsError(f"{out} holds shard {old.get('shard_index')} of {old.get('num_shards')} of another "
                                    f"run (fingerprint {old.get('fingerprint')}, this one {run_fingerprint}); pass "
                                    "--overwrite to start it again")
    elif (out / log_name).exists():
        raise OutputExistsError(f"{out} holds a run that is not this shard's; pass --overwrite to start again")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingInputError(f"{folder}: no {MANIFEST} (not the --out of a `--num_shards` run)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None


def check_shards(folders: list, kind: str) -> list[tuple[Path, dict]]:
    """The shard folders of one finished run, ordered by shard index, or a UsageError naming what is wrong."""
    if not folders:
        raise UsageError("give the shard folders to merge")
    shards = [(Path(f), read_manifest(Path(f))) for f in folders]
    problems = [f"{f}: a `bimode {m.get('kind')}` shard, not a `bimode {kind}` one" for f, m in shards
                if m.get("kind") != kind]
    run_of = lambda m: (m.get("fingerprint"), m.get("num_shards"), m.get("num_batches"))  # noqa: E731
    # the run most folders belong to (on a tie, the first given's): the others are named as foreign
    reference = Counter(run_of(m) for _, m in shards).most_common(1)[0][0]
    first = next(m for _, m in shards if run_of(m) == reference)
    problems += [f"{folder}: a shard of another run (fingerprint {m.get('fingerprint')}, {m.get('num_shards')} "
                 f"shards; most given are {reference[0]}, {reference[1]} shards)" for folder, m in shards
                 if run_of(m) != reference]
    shards_of_run = [(f, m) for f, m in shards if run_of(m) == reference]
    by_index: dict[int, list[Path]] = {}
    for folder, m in shards_of_run:
        by_index.setdefault(m.get("shard_index"), []).append(folder)
    count = first.get("num_shards")
    for index, where in sorted(by_index.items(), key=lambda kv: str(kv[0])):
        if len(where) > 1:
            problems.append(f"shard {index} given twice: {', '.join(map(str, where))}")
    missing = [i for i in range(count or 0) if i not in by_index]
    if missing:
        problems.append(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count} missing")
    problems += [f"{f}: shard {m.get('shard_index')} did not finish (run its command again to resume it)"
                 for f, m in shards if not m.get("finished")]
    if problems:
        raise UsageError("cannot merge: " + "; ".join(problems))
    return sorted(shards, key=lambda fm: fm[1]["shard_index"])
