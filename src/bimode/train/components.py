"""Which parameters belong to the vision tower, the projector and the language model.

R-4B trains each with its own learning rate (and some stages freeze some of them). Names differ across
families: LLaVA `vision_tower` / `multi_modal_projector`, Qwen-VL `visual` with its `merger` as projector
(Qwen3-VL also its `deepstack_merger_list`, which feeds vision features into early LLM layers),
others `vision_model` / `mm_projector` / `connector`. The projector is matched first because Qwen-VL's
`visual.merger` sits inside the vision module.
"""

from __future__ import annotations

COMPONENTS = ("vision", "projector", "llm")
PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "merger", "deepstack_merger_list", "connector", "projector")
VISION_KEYS = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")


def component_of(name: str) -> str:
    parts = name.split(".")
    if any(k in parts for k in PROJECTOR_KEYS):
        return "projector"
    if any(k in parts for k in VISION_KEYS):
        return "vision"
    return "llm"


def split_parameters(model) -> dict[str, list]:
    """{component: [(name, parameter), ...]}, each parameter once (tied weights are shared objects)."""
    groups: dict[str, list] = {c: [] for c in COMPONENTS}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        groups[component_of(name)].append((name, param))
    return groups


def full_numel(param) -> int:
    """Elements of a parameter as the model defines it: under ZeRO-3 a rank holds an empty placeholder
    (`numel() == 0`) and DeepSpeed keeps the real size in `ds_numel`."""
    return getattr(param, "ds_numel", param.numel())


def full_ndim(param) -> int:
    """Dimensions of a parameter as the model defines it (ZeRO-3 placeholders are 1-D; `ds_shape` is real)."""
    return len(getattr(param, "ds_shape", param.shape))


def decays(name: str, param) -> bool:
    """Weight decay for matrices only: biases and norm weights have none."""
    return full_ndim(param) >= 2 and "norm" not in name.lower()


def freeze(model, frozen: set[str]) -> dict[str, int]:
    """Turn off gradients of the frozen components; returns trainable parameter counts per component."""
    counts = {}
    for component, params in split_parameters(model).items():
        for _, param in params:
            param.requires_grad_(component not in frozen)
        counts[component] = sum(full_numel(p) for _, p in params if p.requires_grad)
    return counts


def optimizer_groups(model, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: per component, with and without weight decay (biases and norms have none)."""
    groups = []
    for component, params in split_parameters(model).items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        decay = [p for n, p in trainable if decays(n, p)]
        no_decay = [p for n, p in trainable if not decays(n, p)]
        for params_, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params_:
                groups.append({"params": params_, "lr": lrs[component], "weight_decay": wd, "component": component})
    return groups
