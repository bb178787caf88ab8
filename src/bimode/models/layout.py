"""Checkpoints in the layout the ecosystem reads: SigLIP / CLIP towers keep their `vision_model.` level.

transformers 5 dropped the `vision_model` level from `SiglipVisionModel` and `CLIPVisionModel`: in memory a
LLaVA tower's weights are `model.vision_tower.embeddings...`, and `save_pretrained` writes
`vision_tower.embeddings...`. vLLM, SGLang, transformers 4 and the Hub's LLaVA checkpoints expect
`vision_tower.vision_model.embeddings...`; vLLM refuses the flat names. transformers 5 reads both layouts,
so writing the old one costs nothing. `save_pretrained` reverses the renamings in a model's
weight conversions when it writes; `use_ecosystem_layout` adds one more (bimode.compat.transformers_api), so
every later save (ours, TRL's trainers, Trainer checkpoints) writes the old layout. The same mapping names parameters for TRL's
weight sync to vLLM (`checkpoint_param_name`).
"""

from __future__ import annotations

from bimode.compat.transformers_api import add_saving_renamings

# towers whose pre-5 layout nests everything under `vision_model.`
NESTED_TOWER_CLASSES = ("SiglipVisionModel", "Siglip2VisionModel", "CLIPVisionModel")


def flat_vision_towers(model) -> tuple[str, ...]:
    """In-memory module paths of vision towers that lost their `vision_model.` level (e.g. "model.vision_tower")."""
    return tuple(name for name, module in model.named_modules()
                 if name and type(module).__name__ in NESTED_TOWER_CLASSES and not hasattr(module, "vision_model"))


def checkpoint_param_name(name: str, towers: tuple[str, ...]) -> str:
    """`model.vision_tower.embeddings.x` -> `model.vision_tower.vision_model.embeddings.x` for a flat tower."""
    for tower in towers:
        if name.startswith(tower + ".") and not name.startswith(tower + ".vision_model."):
            return f"{tower}.vision_model.{name[len(tower) + 1:]}"
    return name


def use_ecosystem_layout(model):
    """Make every later `save_pretrained` of `model` write its SigLIP / CLIP tower as `vision_model.*`."""
    towers = flat_vision_towers(model)
    if towers:
        add_saving_renamings(model, {f"{t}.": f"{t}.vision_model." for t in towers})
    return model
