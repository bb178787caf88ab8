"""vLLM: what bimode relies on beyond vLLM's public API (vLLM 0.31; docs/internals.md).

Its logits-processor interface (bimode's token controls, generation/vllm_controls.py):
- `vllm.v1.sample.logits_processor` (`LogitsProcessor`, `BatchUpdate`, `MoveDirectionality`): the documented
  extension point, under a versioned (`v1`) path; `vllm.tokenizers.cached_tokenizer_from_config`.

The colocated weight sync:

- The engine's model, through `llm.llm_engine.model_executor.driver_worker.model_runner` (in-process executor).
- `vllm.model_executor.model_loader.reload`'s layer-wise reload (`initialize_layerwise_reload`,
  `finalize_layerwise_reload`), what vLLM's own `reload_weights` uses: on CPU vLLM repacks linear weights into
  oneDNN handles after loading, so in-place `load_weights` must run inside it.
- CPU linear layers keep `cpu_linear` beside their weight and rebuild it with
  `quant_method.process_weights_after_loading(layer)`.
- `llm.llm_engine.reset_encoder_cache()` (public on the engine, not on `LLM`).
"""

from __future__ import annotations

from contextlib import contextmanager


def logits_processor_interface() -> tuple[type, type, type]:
    """(LogitsProcessor, BatchUpdate, MoveDirectionality): the base class of a vLLM logits processor, the batch
    changes it is told of, and the kinds of row move among them."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    return LogitsProcessor, BatchUpdate, MoveDirectionality


def tokenizer_of(model_config):
    """The tokenizer vLLM serves a model with (cached per config, as vLLM's own processors get it)."""
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config=model_config)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _model_runner(llm):
    return llm.llm_engine.model_executor.driver_worker.model_runner


@contextmanager
def layerwise_reload(llm):
    """vLLM's reload protocol around in-place `load_weights` calls: restore the loadable layout first, then
    process (repack) every layer once its weights are in."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = _model_runner(llm)
    initialize_layerwise_reload(runner.model)
    yield
    finalize_layerwise_reload(runner.model, runner.model_config)
    repack_kept_weights(runner.model)


def repack_kept_weights(model) -> None:
    """Rebuild the CPU kernel of every layer that keeps its weight beside a packed copy (embeddings, the LM
    head). A tied LM head shares the embedding's weight, is never loaded itself, and so kept its old packed copy
    through the reload: synced rollouts still scored with the starting head (measured: gaps of 0.6)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and hasattr(module, "quant_method") and weight is not None \
                and weight.numel() > 0:
            module.quant_method.process_weights_after_loading(module)


def reset_encoder_cache(llm) -> None:
    """Forget the image features vLLM keeps per image across requests (they were computed by old weights)."""
    llm.llm_engine.reset_encoder_cache()
