"""bimode's layers (docs/architecture.md) are contracts in pyproject.toml that import-linter checks: a module
imports only from layers below its own, no import runs back up, and the modules inside a subpackage import
each other without a circle."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on `project` (a folder with pyproject.toml and src/bimode), as a developer runs it there."""
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(project / "src"), "HOME": str(project)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"], cwd=project,
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_import_running_back_up_breaks_the_contract(tmp_path):
    """The check can fail: the ground floor reaching up to the commands, a module the contract does not place,
    and a circle inside a subpackage are each refused."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "src" / "bimode", tmp_path / "src" / "bimode",
                    ignore=shutil.ignore_patterns("__pycache__"))
    modes = tmp_path / "src" / "bimode" / "modes.py"
    modes.write_text(modes.read_text() + "\nfrom bimode.commands import help_text  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "bimode.modes -> bimode.commands" in result.stdout, result.stdout

    modes.write_text(modes.read_text().replace("from bimode.commands import help_text  # noqa\n", ""))
    (tmp_path / "src" / "bimode" / "stray.py").write_text("")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "bimode.stray" in result.stdout, result.stdout

    (tmp_path / "src" / "bimode" / "stray.py").unlink()
    rows = tmp_path / "src" / "bimode" / "generation" / "rows.py"
    rows.write_text(rows.read_text() + "\nimport bimode.generation.engine  # noqa\n")  # the engine imports rows
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "1 kept, 1 broken" in result.stdout, result.stdout
    assert "acyclic by removing 1 dependency" in result.stdout and ".rows -> .engine" in result.stdout
