"""Any OpenAI-compatible endpoint as a generation backend: a vLLM server, `bimode serve`, a hosted API.

Thinking mode travels as vLLM users send it: `chat_template_kwargs: {"thinking_mode": "auto"|"long"|"short"}`.
Requests run concurrently with retries and back-off and a time limit each. Token ids are not available
through the API; p_think is where the server sends it (`bimode serve`: each choice's `bimode.p_think`), else
None. Token counts (generation.types.token_counts, docs/tokens.md): with `tokenizer=` (the
served model's), counted on each choice's text, encoded again; without, the usage block's totals
(`completion_tokens`, `completion_tokens_details.reasoning_tokens`, which `bimode serve` fills with the same
definition) shared over the choices in proportion to their text, exact for one choice per request. A server
that reports no reasoning tokens gets them estimated from the reasoning's share of the text.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

from bimode.generation.types import (Completion, Prompt, SamplingParams, TokenCallback, mode_slots, replay_tokens,
                                    request_seed, token_counts)
from bimode.modes import R4B_NAMES, THINK_CLOSE, THINK_OPEN, ThinkingMode


def image_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def to_openai_messages(messages: list[dict], images: list) -> list[dict]:
    """Our template's messages -> OpenAI content parts, images as data URLs in placeholder order."""
    images = list(images)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                if not images:
                    raise ValueError("more image placeholders than images")
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(images.pop(0))}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


class EndpointError(RuntimeError):
    pass


class EndpointUnavailable(EndpointError):
    """The endpoint did not answer (connection refused or cut, timeouts, 5xx or 429 after every retry): another
    endpoint of the same model may (bimode.generation.endpoint_pool); a 4xx answer is an EndpointError only."""


class OpenAIEndpointBackend:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 3, timeout_s: float = 120.0, backoff_s: float = 1.0,
                 tokenizer=None):
        import httpx

        self.tokenizer = tokenizer  # the served model's, for exact token counts; None: the usage block's

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        response = self._post_or_get("GET", "/models")
        data = response.get("data") or []
        if not data:
            raise EndpointError(f"{self.base_url}/models lists no model; pass model=")
        return data[0]["id"]

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        last = None
        for attempt in range(self.retries + 1):
            try:
                response = self.client.request(method, self.base_url + path, json=body)
                if response.status_code < 500 and response.status_code != 429:
                    if response.status_code >= 400:
                        raise EndpointError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
                    return response.json()
                last = EndpointUnavailable(f"{self.base_url}: {method} {path}: HTTP {response.status_code}: "
                                           f"{response.text[:200]}")
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = EndpointUnavailable(f"{self.base_url}: {method} {path}: {type(exc).__name__}: {exc}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise last  # type: ignore[misc]

    def _request(self, prompt: Prompt, mode: ThinkingMode, n: int, params: SamplingParams) -> list[Completion]:
        body = {
            "model": self.model,
            "messages": to_openai_messages(prompt.messages, prompt.images),
            "n": n,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # enable_thinking too: vLLM's qwen3 reasoning parser reads it to know the think block is closed
            "chat_template_kwargs": {"thinking_mode": R4B_NAMES[mode],
                                     **({"enable_thinking": False} if mode is ThinkingMode.NO_THINK else {})},
        }
        if params.top_k:
            body["top_k"] = params.top_k
        seed = request_seed(prompt, mode, params)
        if seed is not None:
            body["seed"] = seed
        if params.max_thinking_tokens is not None:
            body["max_thinking_tokens"] = params.max_thinking_tokens
        if params.think_threshold is not None:
            body["think_threshold"] = params.think_threshold
        data = self._post_or_get("POST", "/chat/completions", body)
        choices = data.get("choices") or []
        texts, reasonings, finishes, p_thinks = [], [], [], []
        for choice in choices:
            p_thinks.append((choice.get("bimode") or {}).get("p_think"))  # bimode serve's; others send none
            message = choice.get("message") or {}
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            content = message.get("content") or ""
            # vLLM sends `"reasoning": null` with or without a reasoning parser: only a value says it split
            split_by_server = bool(message.get("reasoning_content") or message.get("reasoning"))
            finish = {"length": "length"}.get(choice.get("finish_reason"), "stop")
            unclosed = (choice.get("bimode") or {}).get("mode") == "malformed" or (
                reasoning and not content and finish == "length")
            # a server without a reasoning parser, cut off in forced thinking: its text is all reasoning
            raw_cut = (not split_by_server and mode is ThinkingMode.THINK and finish == "length"
                       and THINK_CLOSE not in content)
            if unclosed or raw_cut:  # cut off while thinking: the block was never closed
                reasoning = reasoning or content.split(THINK_OPEN, 1)[-1]
                text = f"\n{reasoning}"
            elif split_by_server or THINK_CLOSE not in content:
                text = f"\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content}" if reasoning else f"\n\n{THINK_CLOSE}\n\n{content}"
            else:  # a server without a reasoning parser: the raw response
                text = content.split(THINK_OPEN, 1)[-1]
                reasoning = text.split(THINK_CLOSE, 1)[0].strip()  # for the token estimate
            texts.append(text)
            reasonings.append(reasoning)
            finishes.append(finish)
        counts = self._token_counts(data.get("usage") or {}, texts, reasonings)
        return [Completion(mode=mode, prompt_suffix=THINK_OPEN, token_ids=[], text=text, finish_reason=finish,
                           thinking_tokens=thinking, answer_tokens=answer, p_think=p_think)
                for text, finish, (thinking, answer), p_think in zip(texts, finishes, counts, p_thinks)]

    def _token_counts(self, usage: dict, texts: list[str], reasonings: list[str]) -> list[tuple[int, int]]:
        """(thinking, answer) tokens per choice: see the module docstring."""
        if self.tokenizer is not None:
            close_id = self.tokenizer.convert_tokens_to_ids(THINK_CLOSE)
            return [tuple(token_counts(self.tokenizer, THINK_OPEN,
                                       self.tokenizer.encode(t, add_special_tokens=False), close_id))
                    for t in texts]
        total = usage.get("completion_tokens") or 0
        reported = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        if reported is None:  # estimated: the reasoning's share of the text
            reported = round(total * sum(map(len, reasonings)) / max(1, sum(map(len, texts))))
        reported = min(reported, total)
        thinking = _share(reported, [len(r) for r in reasonings])
        answer = _share(total - reported, [len(t) - len(r) for t, r in zip(texts, reasonings)])
        return list(zip(thinking, answer))

    def render(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> str:
        """The prompt text the served model sees, rendered with the tokenizer given (the server renders its own)."""
        if self.tokenizer is None:
            raise ValueError("rendering an endpoint's prompt needs the served model's tokenizer (tokenizer=)")
        return self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False,
                                                  thinking_mode=R4B_NAMES[mode])

    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams(),
                 on_token: TokenCallback | None = None, progress: bool = False) -> list[list[Completion]]:
        """Completions for every sample of every prompt, in order, one request per (prompt, mode); `on_token`
        gets each completion's tokens once it is finished (needs `tokenizer=`)."""
        return generate_by_requests(self._request, self.concurrency, self.tokenizer, prompts, params, on_token, progress)


def generate_by_requests(send, concurrency: int, tokenizer, prompts: list[Prompt], params: SamplingParams,
                         on_token: TokenCallback | None = None, progress: bool = False) -> list[list[Completion]]:
    """Completions for every sample of every prompt, in order, from one request per (prompt, mode) sent by
    `send(prompt, mode, n, params)`, `concurrency` at a time; `on_token` replays each finished completion's tokens
    (needs the served model's `tokenizer`)."""
    if on_token is not None and tokenizer is None:
        raise ValueError("on_token needs the served model's tokenizer (tokenizer=) to turn text into tokens")
    if params.logprobs:
        raise NotImplementedError("log-probs through an endpoint are not requested by this client yet")
    jobs = mode_slots([p.modes for p in prompts])  # one request per (prompt, mode), n = its samples
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(send, prompts[pi], mode, len(slots), params) for pi, mode, slots in jobs]
        iterator = futures
        if progress:
            from tqdm import tqdm

            iterator = tqdm(futures, desc="endpoint", unit="request")
        answers = [f.result() for f in iterator]
    results: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
    for (pi, _, slots), answer in zip(jobs, answers):
        for si, completion in zip(slots, answer, strict=True):
            results[pi][si] = completion
    if on_token is not None:
        replay_tokens(results, on_token, tokenizer)
    return results


def _share(total: int, weights: list[int]) -> list[int]:
    """`total` split over items in proportion to `weights`, in integers that add up to it (largest remainder)."""
    if not weights:
        return []
    if not sum(weights):
        weights = [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: out[i] - exact[i])[: total - sum(out)]:
        out[i] += 1
    return out
