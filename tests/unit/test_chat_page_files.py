"""The chat page's files (bimode/serve/ui) ship in the wheel, and its script never writes HTML.
The page in a browser: tests/integration/test_chat_page.py."""

import fnmatch
import re
from pathlib import Path

import pytest

from bimode.serve.page import ASSETS, read_assets

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "src" / "bimode" / "serve" / "ui"


def test_every_file_of_the_page_is_package_data_and_served():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bimode"]
    files = sorted(p.name for p in UI.iterdir() if p.is_file())
    assert files == sorted(ASSETS)  # a new file is served (page.ASSETS) or not there
    for name in files:
        assert any(fnmatch.fnmatch(f"serve/ui/{name}", pattern) for pattern in patterns), name
    assert read_assets() == {name: (UI / name).read_bytes() for name in files}


def test_the_page_writes_text_only_and_loads_nothing_from_elsewhere():
    script = (UI / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    html = (UI / "index.html").read_text() + (UI / "style.css").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//|url\(", html)  # no CDN, no remote font or image


def test_no_ui_is_a_flag_of_bimode_serve():
    from bimode.commands import serve

    assert serve.make_parser().parse_args_and_config(["m"])[0].no_ui is False  # the page is on by default
    assert serve.make_parser().parse_args_and_config(["m", "--no_ui"])[0].no_ui is True
