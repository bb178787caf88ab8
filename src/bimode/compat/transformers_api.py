"""transformers: what bimode relies on beyond the public API, and what changed inside the supported range.

Checked on transformers 5.17 (vLLM 0.31's environment) and 5.25 (the newest); docs/internals.md.
- The cache argument: models take `past_key_values=` up to some 5.2x release and `cache=` after it (the old name
  still works there, with a FutureWarning on every call, until 5.40). A name a model does not declare is
  swallowed by its `**kwargs` without error: generation then recomputes every step from scratch.
- Gradient checkpointing is switched on by `activation_checkpointing_enable` in 5.25, by
  `gradient_checkpointing_enable` in 5.17 (kept in 5.25 as a deprecated alias).
- Gradient checkpointing layers (`GradientCheckpointingLayer`) drop a cache passed to them unless
  `_can_checkpoint_with_cache` is set, and wrap the layer in `_gradient_checkpointing_func` (a partial of
  torch's checkpoint). 5.17 checkpoints whenever the layer trains, 5.25 only while gradients are on.
- Weight renamings applied when loading and reversed when saving (`model._weight_conversions`,
  `conversion_mapping.get_model_conversion_mapping`, `core_model_loading.WeightRenaming`).
- `ProcessorMixin.check_argument_for_proper_class`, which refuses a processor built without its video part, and
  `ProcessorMixin.save_pretrained`, which fails on that missing part (so such a processor saves its own way).
- The key/value cache's inside (`transformers.cache_utils`): `DynamicLayer` as a base class (`lazy_initialization`,
  `is_initialized`, `keys` / `values`), `DynamicCache.layers`, `layer_class_to_replicate` and
  `batch_select_indices`.
- A config's `_attn_implementation` (the attention its layers run).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from contextlib import contextmanager

import torch

# the name every release in the supported range accepts (5.2x+ as a deprecated alias, until 5.40)
LEGACY_CACHE_ARGUMENT = "past_key_values"


def base_model(model):
    """The transformers model under DDP / DeepSpeed / PEFT wrappers (for its config, flags and signature)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


@functools.cache
def _declared_cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    for name in ("cache", LEGACY_CACHE_ARGUMENT):
        if name in parameters:
            return name
    return LEGACY_CACHE_ARGUMENT  # a forward of **kwargs only (remote code): the name every release accepts


def cache_argument(model) -> str:
    """The keyword this model's forward takes its key/value cache under: "cache" or "past_key_values"."""
    return _declared_cache_argument(type(base_model(model)))


def with_cache(model, cache) -> dict:
    """Forward keyword arguments that hand `cache` to `model` under the name it reads."""
    return {cache_argument(model): cache}


def returned_cache(output):
    """The cache a forward returned (`output.cache` from the rename on, `output.past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, LEGACY_CACHE_ARGUMENT, None)


def checkpointing_layers(model) -> list:
    """The layers gradient checkpointing wraps while `model` trains ([] in eval mode or with it off).

    5.17 checkpoints a training layer even without gradients (TRL's old and reference log-probs are computed
    that way), 5.25 only with them; both drop the cache then unless told to keep it, so callers that pass a cache
    through these layers must use `keep_cache_under_checkpointing` in either case."""
    inner = base_model(model)
    if not inner.training:
        return []
    return [m for m in inner.modules() if getattr(m, "gradient_checkpointing", False) is True]


def enable_activation_checkpointing(model, checkpointing_kwargs: dict | None = None) -> None:
    """Gradient (activation) checkpointing on: `activation_checkpointing_enable` from its introduction on,
    `gradient_checkpointing_enable` (5.17, a deprecated alias later) before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)


def checkpointing_kwargs(training_args) -> dict | None:
    """The checkpointing keyword arguments of a TrainingArguments: `activation_checkpointing_kwargs` in 5.25
    (`gradient_checkpointing_kwargs` its deprecated alias there, what TRL 1.16 sets), the latter in 5.17."""
    return (getattr(training_args, "activation_checkpointing_kwargs", None)
            or getattr(training_args, "gradient_checkpointing_kwargs", None) or None)


def disable_activation_checkpointing(model) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def is_reentrant(layer) -> bool:
    """Whether the layer checkpoints with torch's reentrant variant (its replay runs without autograd)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return not (isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False)


@contextmanager
def keep_cache_under_checkpointing(layers: list):
    """Let checkpointed layers keep the cache passed to them (`_can_checkpoint_with_cache`, transformers' switch
    for layers whose replay leaves the cache as it was)."""
    for m in layers:
        m._can_checkpoint_with_cache = True  # an instance attribute over the class default
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def add_saving_renamings(model, renamings: dict[str, str]) -> None:
    """Make every later `save_pretrained` of `model` write the parameter names `renamings` maps to.

    renamings: in-memory prefix -> prefix as written (e.g. "model.vision_tower." -> "model.vision_tower.vision_model.").
    transformers applies a model's weight conversions when loading and reverses them when saving; these are
    added as loading renamings from the written name to the in-memory one, after the model's own (so reversed
    first when saving). Adding the same renaming twice adds it once."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config, not loaded: what from_pretrained would have attached
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if type(c) is WeightRenaming]
    added = [WeightRenaming(source_patterns="^" + re.escape(written), target_patterns=in_memory)
             for in_memory, written in renamings.items()]
    already = {repr(c) for c in added}
    model._weight_conversions = [c for c in conversions if repr(c) not in already] + added


def saving_renamings(model) -> list:
    """The weight renamings `model` applies when loading and reverses when saving (what add_saving_renamings adds
    to)."""
    return list(getattr(model, "_weight_conversions", None) or [])


def build_processor_without_video(processor_class, **parts):
    """A `processor_class` built with video_processor=None (transformers checks every part's class). The check
    is lifted on this one instance while it is built, never on the class: nothing else in the process sees it."""
    processor = processor_class.__new__(processor_class)
    check = processor.check_argument_for_proper_class  # the class's, bound to this instance

    def allow_no_video(name, argument):
        return None if name == "video_processor" and argument is None else check(name, argument)

    processor.check_argument_for_proper_class = allow_no_video  # an instance attribute shadows the method
    try:
        processor.__init__(video_processor=None, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def save_without_video(processor, video_config: dict | None = None):
    """Make `processor` (from `build_processor_without_video`) save as a hub Qwen-VL repository holds one.

    transformers' `save_pretrained` serialises every part and fails on the missing video part
    (`'NoneType' object has no attribute '_auto_class'`), so the Trainer's checkpoint save would lose the run.
    This instance's `save_pretrained` (what the Trainer and bimode call) writes `save_processor_without_video`'s
    files instead; the class and every other processor keep transformers' own. video_config: the video
    processor's settings as the checkpoint held them, written back so nothing is lost for a machine with
    torchvision. Returns the processor."""
    processor.save_pretrained = functools.partial(save_processor_without_video, processor, video_config=video_config)
    return processor


def save_processor_without_video(processor, save_directory, push_to_hub: bool = False, video_config=None,
                                 **hub_kwargs) -> list[str]:
    """The files of a hub Qwen-VL repository, which plain `AutoProcessor` loads wherever torchvision exists:
    the tokenizer's, `preprocessor_config.json` (the image processor, naming the processor class),
    `video_preprocessor_config.json` when video_config is given (else transformers derives the video processor
    from the image processor's file, as for a hub Qwen2.5-VL repository) and `chat_template.jinja`.
    hub_kwargs: what transformers' signature takes for pushing, which this does not do."""
    if push_to_hub:
        raise NotImplementedError("a processor built without its video part saves locally only; push the folder")
    os.makedirs(save_directory, exist_ok=True)
    name = type(processor).__name__
    files = [str(f) for f in processor.tokenizer.save_pretrained(save_directory)]
    _with_processor_class([f for f in files if os.path.basename(f) == "tokenizer_config.json"], name)
    files += _with_processor_class(processor.image_processor.save_pretrained(save_directory), name)
    if video_config is not None:
        path = os.path.join(save_directory, "video_preprocessor_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(video_config, f, indent=2, sort_keys=True)
        files.append(path)
    templates = processor.chat_template
    if isinstance(templates, str):
        templates = {"default": templates}
    for template_name, text in (templates or {}).items():  # transformers' layout: extra ones in chat_templates/
        path = os.path.join(save_directory, "chat_template.jinja" if template_name == "default"
                            else os.path.join("chat_templates", f"{os.path.basename(template_name)}.jinja"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        files.append(path)
    return list(dict.fromkeys(files))


def _with_processor_class(paths, name: str) -> list[str]:
    """Name the processor class in the JSON files a part wrote, as a hub repository's files do."""
    paths = [str(p) for p in paths if str(p).endswith(".json")]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**config, "processor_class": name}, f, indent=2, sort_keys=True)
    return paths


def attention_implementation(config) -> str | dict | None:
    """The attention a config's layers run ("sdpa", "eager", "flash_attention_2", ...; `_attn_implementation`,
    set by `from_pretrained` and `set_attn_implementation`). Raises if transformers renamed it: a silent None
    would drop packed training to the slow path."""
    if not hasattr(config, "_attn_implementation"):
        raise AttributeError(f"{type(config).__name__} has no _attn_implementation: transformers renamed the "
                             "attribute naming the attention implementation (bimode.compat.transformers_api)")
    return config._attn_implementation


def dynamic_layer_class() -> type:
    """transformers' growing cache layer, the base of bimode's own layers (train/bpo/shared_forward.py), which
    rely on `lazy_initialization(keys, values)`, `is_initialized`, `keys` / `values` and `update(keys, values)`."""
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def empty_cache():
    """A key/value cache that grows with every forward (`DynamicCache`)."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_growing_layers_of(layer_class: type):
    """An empty cache that makes each layer it meets a `layer_class` (a `dynamic_layer_class` subclass; through
    the cache's `layer_class_to_replicate`)."""
    cache = empty_cache()
    cache.layer_class_to_replicate = layer_class
    return cache


def cache_of_layers(layers: list):
    """A cache of the given layers, one per model layer, that makes no other."""
    cache = empty_cache()
    cache.layers = list(layers)
    cache.layer_class_to_replicate = None
    return cache


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of a cache, its (keys, values)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep the cache's batch rows `index` in that order, in place (a row may repeat: copies per sample)."""
    cache.batch_select_indices(index)
