"""The repository carries everything its code, tests and docs use: no relative path leads outside it, and
no notes file it names is missing.

A user clones the repository alone; a path to a sibling folder works only on the machine that had it.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "runs", "build", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".jinja", ".cfg", ".sh", ""}

UP_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w./-]*)")  # ../x, ../../x
PARENTS = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
# notes files are named in capitals (README.md, RESULTS.md); lower-case names are mostly run outputs
MD_NAME = re.compile(r"(?<![\w.-])([A-Z][A-Z0-9_]*\.md)\b")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive: walk the tree
        paths = [p for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in {"Makefile", "run"})
            and p.stat().st_size < 2_000_000]


def outside_references(path: Path, text: str) -> list[str]:
    """Each place in `text` (the contents of `path`) that names a path outside the repository."""
    found = []
    for match in UP_PATH.finditer(text):
        target = (path.parent / match.group(1)).resolve()
        if ROOT not in target.parents and target != ROOT:
            found.append(match.group(1))
    for match in PARENTS.finditer(text):
        level = int(match.group(1))
        target = path.parents[level] if level < len(path.parents) else Path("/")
        if target != ROOT and ROOT not in target.parents:
            found.append(match.group(0))
    return found


def missing_markdown(text: str, names: set[str]) -> list[str]:
    """Notes files (`NAME.md`) named in `text` that the repository does not have (kept somewhere else)."""
    return [m for m in MD_NAME.findall(text) if m not in names]


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    files = tracked_text_files()
    assert any(p.name == "README.md" for p in files)
    md_names = {p.name for p in files if p.suffix == ".md"}  # tracked: what a clone has
    problems = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        problems += [f"{rel}: {ref}" for ref in outside_references(path, text)]
        problems += [f"{rel}: names {name}, which is not in the repository" for name in missing_markdown(text, md_names)]
    assert not problems, "references outside the repository:\n" + "\n".join(problems)


def test_the_check_catches_what_it_is_for():
    """The detectors above flag the kinds of reference that broke a fresh clone, and pass honest ones."""
    inside = ROOT / "tests" / "x.py"
    bad = 'DATA = Path(__file__).resolve().parents[2] / "data"\nsee ' + "../../" + "notes/a.json"
    assert len(outside_references(inside, bad)) == 2
    good = 'DATA = Path(__file__).resolve().parents[1] / "benchmarks"\nsee ../benchmarks/README.md'
    assert outside_references(inside, good) == []
    assert missing_markdown("as " + "NOTES" + ".md says; see README.md", {"README.md"}) == ["NOTES" + ".md"]
