"""`bimode serve`'s chat page in a real browser: headless Debian Chromium driven by Playwright (no browser download;
skipped, naming the install command, where either is missing) against the server on the trained tiny model.

What the page shows is checked against what the server answers the same request plainly: the answer, the reasoning,
auto mode's decision and p_think, the token counts, the server's own words for a refusal. One server and one
browser for the module; each test opens its own page."""

import base64
import importlib.util
import io
import json
import random
import re
from pathlib import Path

import httpx
import pytest
import torch

from bimode.generation.engine import TransformersEngine
from bimode.models import load_model
from bimode.serve.app import create_app
from bimode.serve.limits import ServerLimits
from tests.helpers.servers import serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
KEY = "page-key"
MAX_REQUEST_BYTES = 200_000


def _load_script():
    spec = importlib.util.spec_from_file_location("chat_page_screenshot", ROOT / "scripts" / "chat_page_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()  # the page-driving helpers (launch, ask) and the screenshot, shared with the docs' picture


@pytest.fixture(scope="module")
def server(trained_tiny):
    model, processor = load_model(trained_tiny, dtype=torch.float32)
    engine = TransformersEngine(model, processor, max_batch_rows=8)
    limits = ServerLimits(max_model_len=512, max_tokens=256, request_timeout=120, max_request_bytes=MAX_REQUEST_BYTES)
    base, stop = serve_in_thread(create_app(engine, "tiny", limits, api_key=KEY))
    yield {"base": base, "engine": engine, "limits": limits}
    stop()


@pytest.fixture(scope="module")
def browser():
    why = script.missing()
    if why:
        pytest.skip(f"the chat page's browser test needs Debian's Chromium and Playwright: {why}")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = script.launch(playwright)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture
def page(browser, server):
    """The page, its API key typed in."""
    context = browser.new_context(viewport=script.VIEWPORT)
    page = context.new_page()
    page.goto(server["base"] + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    yield page
    context.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(path, data URL, question) of a synthetic-world image the model knows."""
    path, question = script.sample_image(tmp_path_factory.mktemp("page_image"))
    return path, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), question


def _plain(server, body: dict) -> httpx.Response:
    return httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def _user(text: str, data_url: str | None = None):
    if data_url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                        {"type": "text", "text": text}]}


def _put_file(page, how: str, path: Path) -> None:
    """Drop `path` on the drop zone, or paste it, as a browser does (a DataTransfer holding a File)."""
    page.evaluate("""([how, b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: "image/png"}));
        const event = how === "drop"
            ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
            : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
        (how === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
    }""", [how, base64.b64encode(path.read_bytes()).decode(), path.name])
    page.wait_for_selector("#image-preview:not([hidden])")


def _sent(page, action) -> dict:
    """The body of the chat request `action` makes the page send."""
    with page.expect_request("**/v1/chat/completions") as request:
        action()
    return json.loads(request.value.post_data)


def _number(text: str | None) -> float | None:
    return None if text is None else float(text)  # a JavaScript number's text reads back to the same float


def _shown(turn) -> dict:
    """What an assistant turn shows."""
    details = turn.locator("details.reasoning")
    return {"answer": turn.locator(".answer").text_content(),
            "reasoning": details.locator(".reasoning-text").text_content() if details.is_visible() else None,
            "mode": turn.locator(".decision").get_attribute("data-mode"),
            "decision": turn.locator(".decision").text_content(),
            "p_think": _number(turn.locator(".p-think").get_attribute("data-value")),
            "thinking_tokens": turn.locator(".tokens").get_attribute("data-thinking"),
            "answer_tokens": turn.locator(".tokens").get_attribute("data-answer")}


def _expected(reply: dict) -> dict:
    """What the page should show for a plain response of the same request."""
    choice, usage = reply["choices"][0], reply["usage"]
    thinking = usage["completion_tokens_details"]["reasoning_tokens"]
    return {"answer": choice["message"]["content"], "reasoning": choice["message"]["reasoning_content"],
            "mode": choice["bimode"]["mode"],
            "p_think": choice["bimode"]["p_think"],
            "thinking_tokens": str(thinking), "answer_tokens": str(usage["completion_tokens"] - thinking)}


def test_the_page_is_served_from_the_package_and_no_ui_leaves_it_out(server):
    page = httpx.get(server["base"] + "/")  # the page itself needs no key: it asks for one
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js"' in page.text
    script_file = httpx.get(server["base"] + "/ui/app.js")
    assert script_file.status_code == 200 and script_file.headers["content-type"].startswith("text/javascript")
    assert httpx.get(server["base"] + "/ui/secrets.txt").status_code == 404
    from starlette.testclient import TestClient

    bare = TestClient(create_app(server["engine"], "tiny", server["limits"], ui=False))
    assert bare.get("/").status_code == 404 and bare.get("/ui/app.js").status_code == 404
    assert bare.get("/v1/models").status_code == 200


def test_the_key_is_kept_for_the_tab_and_sent_as_a_bearer_token(page, server):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text("tiny")  # /v1/models answered with the key
    assert page.evaluate("sessionStorage.getItem('bimode.apiKey')") == KEY
    page.reload()
    assert page.input_value("#api-key") == KEY
    with page.expect_request("**/v1/chat/completions") as request:
        script.ask(page, "hi", "no_think", max_tokens="4")
    assert request.value.headers["authorization"] == f"Bearer {KEY}"


def test_auto_mode_shows_its_decision_and_the_conversation_continues(page, server, image):
    path, data_url, question = image
    _put_file(page, "drop", path)
    body = _sent(page, lambda: script.ask(page, question, "auto", max_tokens="64"))
    assert body["messages"] == [_user(question, data_url)]  # the dropped file, as a data URL
    assert body["chat_template_kwargs"] == {"thinking_mode": "auto"} and body["stream"] is True
    first = page.locator(".turn.assistant").nth(0)
    plain = _plain(server, {**body, "stream": False}).json()
    assert _shown(first) == {**_expected(plain), "decision": _shown(first)["decision"]}
    assert _shown(first)["decision"].startswith({"think": "decided to think", "no_think": "decided not to think"}[
        plain["choices"][0]["bimode"]["mode"]])
    assert 0 < _shown(first)["p_think"] < 1

    body = _sent(page, lambda: script.ask(page, question, "no_think", max_tokens="64"))
    answer = plain["choices"][0]["message"]
    assert body["messages"] == [_user(question, data_url), {"role": "assistant", "content": answer["content"],
                                "reasoning_content": answer["reasoning_content"]}, _user(question)]
    second = _shown(page.locator(".turn.assistant").nth(1))
    assert second == {**_expected(_plain(server, {**body, "stream": False}).json()), "decision": "answered directly"}
    assert second["reasoning"] is None and second["thinking_tokens"] == "0"


def test_think_mode_streams_its_reasoning_into_a_collapsible_block(page, server, image):
    path, data_url, question = image
    _put_file(page, "paste", path)
    chunks = []
    page.on("response", lambda r: chunks.append(r) if r.url.endswith("/v1/chat/completions") else None)
    body = _sent(page, lambda: script.ask(page, question, "think", max_tokens="64"))
    assert body["messages"] == [_user(question, data_url)]
    turn = page.locator(".turn.assistant").nth(0)
    shown = _shown(turn)
    assert shown == {**_expected(_plain(server, {**body, "stream": False}).json()), "decision": "thought"}
    assert shown["reasoning"] and int(shown["thinking_tokens"]) > 0
    assert chunks[0].headers["content-type"].startswith("text/event-stream")
    details = turn.locator("details.reasoning")
    assert details.locator("summary").text_content() == f"Reasoning ({shown['thinking_tokens']} tokens)"
    details.locator("summary").click()  # collapses, as <details> does
    assert not details.locator(".reasoning-text").is_visible()

    page.click("#clear")
    assert page.locator(".turn").count() == 0
    body = _sent(page, lambda: script.ask(page, question, "think", image=path, budget="1", max_tokens="64"))
    assert body["max_thinking_tokens"] == 1 and len(body["messages"]) == 1  # a new conversation
    assert "(thinking budget reached)" in page.locator(".turn.assistant .decision").text_content()


def test_errors_are_shown_as_the_server_words_them(page, server, image, tmp_path):
    from playwright.sync_api import expect

    path, _, question = image
    noise = tmp_path / "noise.png"  # incompressible: its data URL is past the request limit
    pixels = random.Random(0).randbytes(300 * 300 * 3)
    from PIL import Image

    Image.frombytes("RGB", (300, 300), pixels).save(noise)
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    cases = [  # (how to send, the server's status, its message from a plain request of the same body)
        (lambda: script.ask(page, question, "auto", image=path), 401, None),
        (lambda: script.ask(page, question, "auto", image=noise), 413, None),
        (lambda: script.ask(page, question, "auto", budget="-1"), 400, "max_thinking_tokens"),
    ]
    for n, (send, status, param) in enumerate(cases):
        if n == 1:
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
        if page.is_visible("#image-remove"):  # a failed send gives its image back
            page.click("#image-remove")
        body = _sent(page, send)
        key = "wrong" if status == 401 else KEY
        reply = httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == status
        expected = f"HTTP {status}: {reply.json()['error']['message']}" + (f" (field: {param})" if param else "")
        assert page.locator("#error").text_content() == expected
        turn = page.locator(".turn.assistant").nth(n)
        assert "failed" in turn.get_attribute("class") and turn.locator(".turn-error").text_content() == expected
        assert page.input_value("#prompt") == question  # given back to send again
    assert "(--max_request_bytes)" in page.locator(".turn.assistant").nth(1).text_content()

    # a full queue (503, with Retry-After): the server's shape, replayed, since 64 waiting requests are slow to make
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, headers={"Retry-After": "1", "Content-Type": "application/json"},
        body=json.dumps({"error": {"message": "the server is busy: 64 requests are waiting; retry later",
                                   "type": "server_error", "param": None, "code": 503}})))
    script.ask(page, question, "auto")
    assert page.locator("#error").text_content() == ("HTTP 503: the server is busy: 64 requests are waiting; retry "
                                                     "later (Retry-After: 1 s)")
    page.unroute("**/v1/chat/completions")

    # a stream that the server ends with an error event (a deadline passed), replayed in the server's shape
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=_event({"role": "assistant", "content": ""}) + _event({"content": "half"})
        + 'data: {"error": {"message": "request timed out", "code": 504}}\n\ndata: [DONE]\n\n'))
    turn = script.ask(page, question, "auto")
    assert page.locator("#error").text_content() == "HTTP 504: request timed out"
    assert turn.locator(".answer").text_content() == "half" and "failed" in turn.get_attribute("class")
    page.unroute("**/v1/chat/completions")

    # Stop: a request the server has not answered yet is given up on
    waiting = []
    page.route("**/v1/chat/completions", lambda route: waiting.append(route))  # never answered
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_selector("#stop:not([disabled])")
    page.click("#stop")
    expect(page.locator("#error")).to_have_text("stopped")
    assert waiting and page.is_enabled("#send") and page.input_value("#prompt") == question
    page.unroute("**/v1/chat/completions")

    body = _sent(page, lambda: script.ask(page, question, "no_think", max_tokens="8"))
    assert body["messages"] == [_user(question)]  # failed turns are not part of the conversation
    assert "done" in page.locator(".turn.assistant").last.get_attribute("class")
    assert page.locator("#error").is_hidden()


MARKUP = '<b>bold</b><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


def _event(delta: dict, finish: str | None = None, **extra) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"


def test_markup_is_shown_as_text(page, server):
    """The user's markup goes through the real server; model output with markup comes from a replayed stream in the
    server's shape (the tiny model writes none): both show as the characters they are, nothing runs."""
    script.ask(page, MARKUP, "no_think", max_tokens="8")
    user = page.locator(".turn.user .text").first
    assert user.text_content() == MARKUP and user.locator("*").count() == 0

    stream = (_event({"role": "assistant", "content": ""}) + _event({"reasoning_content": MARKUP[:20]})
              + _event({"reasoning_content": MARKUP[20:]}) + _event({"content": MARKUP})
              + _event({}, "stop", bimode={"mode": "think", "p_think": 0.75, "budget_hit": False})
              + "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9,
                                       "completion_tokens_details": {"reasoning_tokens": 5}}}) + "\n\n"
              + "data: [DONE]\n\n")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
    turn = script.ask(page, "again", "auto")
    shown = _shown(turn)
    assert (shown["answer"], shown["reasoning"]) == (MARKUP, MARKUP)
    assert turn.locator(".answer *, .reasoning-text *").count() == 0
    assert (shown["decision"], shown["p_think"], shown["thinking_tokens"], shown["answer_tokens"]) == (
        "decided to think", 0.75, "5", "4")
    assert turn.locator(".p-think").text_content() == "p_think 0.750"
    assert page.evaluate("window.pwned") is None


def test_the_screenshot_script_captures_the_page_answering(browser, server, image, tmp_path):
    from PIL import Image

    path, _, question = image
    out = script.capture(server["base"], tmp_path / "page.png", path, question, api_key=KEY, browser=browser)
    with Image.open(out) as shot:
        assert shot.size == (script.VIEWPORT["width"], script.VIEWPORT["height"])
        assert len(shot.getcolors(1 << 16) or range(1 << 16)) > 50  # a page with content, not a blank one
