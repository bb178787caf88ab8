"""bimode's layers (docs/architecture.md) are a contract in pyproject.toml that import-linter checks: a module
imports only from layers below its own, and no import runs back up."""

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
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_running_back_up_breaks_the_contract(tmp_path):
    """The check can fail: the ground floor reaching up to the commands, and a module the contract does not
    place, are both refused."""
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
