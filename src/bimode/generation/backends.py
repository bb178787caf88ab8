"""One interface for every way bimode generates, and one place that builds a backend from a spec.

    DIR            a local checkpoint: bimode's shared-prefix transformers engine (generation/engine.py)
    http(s)://URL  any OpenAI-compatible server: bimode serve, vLLM, a hosted API (generation/openai_backend.py)
    vllm:DIR       vLLM in this process (generation/vllm_backend.py; needs the vLLM environment, docs/vllm.md)

Curation's annotator and reasoner, `bimode eval` and the scripts take such a spec. Streaming (`on_token`) is
the transformers engine's as tokens are generated; the other two hand each completion's tokens over once it
is finished (`replay_tokens`), so a streaming caller works on any backend, only not incrementally.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from bimode.errors import UsageError
from bimode.generation.types import Completion, Prompt, SamplingParams, TokenCallback
from bimode.modes import ThinkingMode


@runtime_checkable
class GenerationBackend(Protocol):
    """Completions for every sample (`Prompt.modes`) of every prompt, in order."""

    tokenizer: Any  # the model's tokenizer; None for an endpoint given none (token counts from `usage`)

    def render(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> str:
        """The prompt's text in a mode, as the model sees it (chat template applied)."""
        ...

    def generate(self, prompts: list[Prompt], params: SamplingParams = ..., on_token: TokenCallback | None = None,
                 progress: bool = False) -> list[list[Completion]]:
        """`on_token(prompt index, sample index, token id, TokenLogprob or None)` for each generated token, in order
        (its log-probs when `params.logprobs` is set and the backend has them)."""
        ...


def local_engine(spec: str, **options):
    """The transformers engine of a local checkpoint, for what streams tokens as they are generated (chat, serve);
    a URL or vLLM spec is refused with where to go instead."""
    if spec.startswith(("http://", "https://", "vllm:")):
        raise UsageError(f"{spec}: chat and serve stream from a local checkpoint directory; to serve with vLLM run "
                         "its own server (docs/vllm.md), to evaluate an endpoint use `bimode eval --endpoint`")
    return build_backend(spec, **options)


def build_backend(spec: str | list[str], *, trust_remote_code: bool = False, model_name: str | None = None,
                  api_key: str | None = None, concurrency: int = 8, timeout_s: float = 120,
                  max_batch_rows: int | None = None, **vllm_kwargs) -> GenerationBackend:
    """The backend a spec names (module docstring); several URLs (a list) are one backend that shares requests
    among them and fails over (generation/endpoint_pool.py). Endpoint options go to the endpoint client,
    `max_batch_rows` to the transformers engine, the rest to vLLM's `LLM`."""
    if not isinstance(spec, str):
        if len(spec) == 1:
            spec = spec[0]
        else:
            return _endpoint_pool(list(spec), model_name=model_name, api_key=api_key, concurrency=concurrency,
                                  timeout_s=timeout_s)
    if spec.startswith(("http://", "https://")):
        from bimode.generation.openai_backend import OpenAIEndpointBackend

        kwargs = {"api_key": api_key} if api_key else {}
        return OpenAIEndpointBackend(spec, model=model_name, concurrency=concurrency, timeout_s=timeout_s, **kwargs)
    if spec.startswith("vllm:"):
        from bimode.generation.vllm_backend import VLLMBackend

        return VLLMBackend(spec.removeprefix("vllm:"), trust_remote_code=trust_remote_code, **vllm_kwargs)
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    model, processor = load_model(spec, trust_remote_code=trust_remote_code)
    return TransformersEngine(model, processor, **({"max_batch_rows": max_batch_rows} if max_batch_rows else {}))


def _endpoint_pool(urls: list[str], model_name: str | None, **options):
    from bimode.generation.endpoint_pool import EndpointPool
    from bimode.generation.openai_backend import EndpointError, OpenAIEndpointBackend

    local = [u for u in urls if not u.startswith(("http://", "https://"))]
    if local:
        raise UsageError(f"several models share requests only as OpenAI-compatible URLs; not URLs: {', '.join(local)}")
    if len(set(urls)) < len(urls):
        raise UsageError(f"a URL is given twice: {' '.join(urls)}")
    options = {k: v for k, v in options.items() if v is not None}
    failures = []
    for url in urls if model_name is None else []:  # the model id from the first endpoint that answers
        try:
            model_name = OpenAIEndpointBackend(url, retries=1, **options).model
            break
        except EndpointError as exc:
            failures.append(str(exc))
    if model_name is None:
        raise EndpointError("no endpoint answered: " + "; ".join(failures))
    # one retry each: the pool's failover is the rest of the retrying, and a dead endpoint costs two timeouts
    return EndpointPool([OpenAIEndpointBackend(url, model=model_name, retries=1, **options) for url in urls])
