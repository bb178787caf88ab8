"""What every bench prints with its numbers: a header saying how they were made (command, date, commit, library
versions, machine) and the markdown table bench/RESULTS.md shows, so a rerun replaces a table there verbatim.

    parser = argparse.ArgumentParser(); report.add_markdown_flag(parser); args = parser.parse_args()
    report.emit(report.table(["side", "s"], [["shared", "0.22"]]), args.markdown, libraries=("torch",))
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "trl")


def add_markdown_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", metavar="PATH", default=None,
                        help="also write the header and table to this file (markdown), besides printing them")


def table(columns: list[str], rows: list[list[object]]) -> str:
    """A markdown table; every row has one cell per column (a mismatch is a bug in the bench, said with the row)."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table row {row!r} has {len(row)} cells for {len(columns)} columns {columns!r}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def command() -> str:
    """The command line that ran this bench, as one would type it from the repository root."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(ROOT)  # .venv/bin/python, .venv-vllm/bin/python
    except ValueError:
        pass
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    head = [str(python), "-m", module] if module else [str(python), sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def commit() -> str:
    """`git rev-parse --short HEAD`, with "+dirty" when the tree has changes (the numbers are then of more than it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions(libraries: tuple[str, ...] = LIBRARIES) -> str:
    """Installed versions of the libraries that do the measured work; those not installed are left out."""
    found = []
    for name in libraries:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def machine(threads: int | None = None) -> str:
    """The CPU's model, cores, the torch threads the work ran on, and the GPU when there is one."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = f"{names[0]}, " if names else ""
    out = f"{cpu}{os.cpu_count()} cores"
    if "torch" in sys.modules:  # the benches that measure torch work have it imported; the others have no threads
        import torch

        out += f", {threads or torch.get_num_threads()} torch threads"
        if torch.cuda.is_available():
            out += f", GPU {torch.cuda.get_device_name()}"
    elif threads:
        out += f", {threads} threads"
    return out


def header(libraries: tuple[str, ...] = LIBRARIES, threads: int | None = None) -> str:
    date = datetime.date.today().isoformat()
    return (f"Command: `{command()}`\n\n{date}, commit {commit()}; {versions(libraries)}; "
            f"machine: {machine(threads)}.\n")


def emit(body: str, markdown: str | None, libraries: tuple[str, ...] = LIBRARIES, threads: int | None = None) -> str:
    """Print the header and `body` (tables and notes); write both to `markdown` when given. Returns the text."""
    text = header(libraries, threads) + "\n" + body
    print(text, end="", flush=True)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(text)
    return text
