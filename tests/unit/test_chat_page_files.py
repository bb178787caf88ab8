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


def test_the_server_sends_model_markup_as_it_is(tiny_tokenizer):
    """The page writes model output as text, so the server must neither escape nor strip markup: a streamed
    answer's deltas carry the model's characters exactly (tags that look like `</think>` included)."""
    import json

    from bimode.modes import ThinkingMode
    from bimode.serve import responses
    from bimode.serve.stream_events import sse
    from bimode.streaming import ResponseStream

    reasoning, answer = '<b>x</b> <th <img src=x onerror="alert(1)">', "<script>alert(2)</script> &amp; </em>"
    ids = tiny_tokenizer(reasoning + "\n</think>\n\n" + answer, add_special_tokens=False)["input_ids"]
    text = ResponseStream(tiny_tokenizer, ThinkingMode.THINK.prompt_suffix)
    deltas = [text.add(token) for token in ids] + [text.finish(ThinkingMode.THINK.prompt_suffix,
                                                               tiny_tokenizer.decode(ids))]
    events = [json.loads(sse(responses.delta(d))[len("data: "):]) for d in deltas if d]
    assert "".join(e.get("reasoning_content", "") for e in events).strip() == reasoning
    assert "".join(e.get("content", "") for e in events).strip() == answer
