"""A screenshot of `bimode serve`'s chat page answering: docs/images/chat_page.png (README, docs/serving_and_eval.md).

Starts `bimode serve MODEL` on a free loopback port, opens its page in headless Chromium from the system's
packages (Debian's `chromium`, driven by Playwright; never `playwright install`, no browser download), uploads a
synthetic-world image, asks its question in auto mode, then again in think mode in the same conversation, and saves
the page.

    apt-get install -y chromium chromium-driver && .venv/bin/pip install playwright    # once
    .venv/bin/python scripts/chat_page_screenshot.py MODEL [--out docs/images/chat_page.png]

MODEL: a checkpoint folder (the docs' picture is of the trained tiny model of the tests, tests/helpers/trained.py).
tests/integration/test_chat_page.py drives the page with this file's `launch` and `ask`, and runs `capture`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_serve import start_serve  # noqa: E402 - beside this script

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# headless, and nothing that reaches the network on its own (updates, sync, QUIC probes)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = "apt-get install -y chromium chromium-driver; pip install playwright (never `playwright install`)"
VIEWPORT = {"width": 1100, "height": 720}


def missing() -> str | None:
    """Why the page cannot be driven here (None: it can)."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"no Chromium at {CHROMIUM}: {INSTALL}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"no Playwright: {INSTALL}"
    return None


def launch(playwright):
    """Debian's Chromium, headless, through Playwright."""
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def ask(page, text: str, mode: str = "auto", image: Path | None = None, budget: str = "", max_tokens: str = "",
        timeout_ms: float = 60_000):
    """Send `text` (with `image`, uploaded through the file field) in `mode`; the new assistant turn (a Locator)
    once it has ended, well or not."""
    from playwright.sync_api import expect

    turns = page.locator(".turn.assistant")
    before = turns.count()
    if image is not None:
        page.set_input_files("#image-input", str(image))
        page.wait_for_selector("#image-preview:not([hidden])")
    page.select_option("#mode", mode)
    page.fill("#budget", budget)
    page.fill("#max-tokens", max_tokens)
    page.fill("#prompt", text)
    page.click("#send")
    turn = turns.nth(before)
    expect(turn).to_have_class(re.compile(r"\b(done|failed)\b"), timeout=timeout_ms)
    return turn


def sample_image(folder: Path) -> tuple[Path, str]:
    """A synthetic-world image (the `count` family, which the tests' trained model knows) and its question."""
    from bimode.data import synthetic

    sample = synthetic.generate(3, seed=4, split="eval", families=("count",), max_level=1)[2]
    path = folder / "grid.png"
    sample.render().save(path)
    return path, sample.question


def capture(base: str, out: Path, image: Path, question: str, api_key: str | None = None, browser=None) -> Path:
    """The page at `base` after an auto-mode answer, then a no_think one to the same question in the same
    conversation, saved to `out` (PNG); in `browser` (a Playwright Browser), else in one started here."""
    if browser is None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            started = launch(playwright)
            try:
                return capture(base, out, image, question, api_key, started)
            finally:
                started.close()
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(base + "/")
        if api_key:
            page.fill("#api-key", api_key)
            page.dispatch_event("#api-key", "change")
        for mode, with_image in (("auto", True), ("no_think", False)):
            turn = ask(page, question, mode, image if with_image else None, max_tokens="64")
            if "failed" in (turn.get_attribute("class") or ""):
                raise SystemExit(f"the page shows an error: {turn.inner_text()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
    finally:
        context.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "chat_page.png")
    parser.add_argument("--think_threshold", default=None,
                        help="bimode serve's --think_threshold (the docs' picture: 0.445, so that the tiny model's "
                             "auto mode thinks on its question)")
    parser.add_argument("--served_model_name", default=None, help="bimode serve's --served_model_name")
    args = parser.parse_args(argv)
    why = missing()
    if why:
        raise SystemExit(why)
    with tempfile.TemporaryDirectory() as scratch:
        image, question = sample_image(Path(scratch))
        flags = [f"--{name}={getattr(args, name)}" for name in ("think_threshold", "served_model_name")
                 if getattr(args, name)]
        process, base = start_serve(args.model, flags, Path(scratch) / "serve.log")
        try:
            print(capture(base, args.out, image, question))
        finally:
            process.terminate()
            process.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
