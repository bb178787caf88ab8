"""From a recipe, a model directory and a launch config to the per-GPU plan (`bimode plan`).

A recipe is read as the training command reads it (`recipes.load_recipe` into AnnealConfig / BPOConfig and TRL's
ModelConfig: the same defaults, validation and `env` block); the launch config gives the number of processes and
the sharding. Lengths: annealing's longest padded row is `max_length`, and with `pack_rows` a row is a pack of
`max_length` tokens (per_device_train_batch_size then counts packs): the same arithmetic, with as many images as a
pack has room for (max_length // the image's tokens) where the vision tower trains; a BPO row is the
prompt (`prompt_tokens`: by default the model's image tokens plus 64 text tokens) plus `max_completion_length`, and with the shared-prefix forward (BPO's default where the model allows it) each
prompt runs once per group of `num_generations` rollouts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import yaml

from bimode.errors import UsageError
from bimode.plan.activations import measure_grid_vision, measure_text, measure_vision
from bimode.plan.memory import GIB, Plan, Setup, plan
from bimode.plan.model_shape import ModelShape, lora_trainable, read_shape
from bimode.recipes import launch_config_path, load_recipe, recipe_values
from bimode.train.bpo.shared_forward import architecture_unsupported

BPO_KEYS = {"num_generations", "rewards", "rollout", "mode_token_loss", "beta", "use_vllm"}


@dataclass
class Launch:
    num_gpus: int = 1
    sharding: str = "none"
    mixed_precision: str = "no"

    @classmethod
    def read(cls, path) -> "Launch":
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        kind = str(raw.get("distributed_type", "NO")).upper()
        sharding = "none"
        if kind == "DEEPSPEED":
            stage = int((raw.get("deepspeed_config") or {}).get("zero_stage", 0))
            if stage not in (2, 3):
                raise UsageError(f"{path}: ZeRO stage {stage}: bimode plan knows stages 2 and 3")
            sharding = f"zero{stage}"
        elif kind == "FSDP":
            sharding = "fsdp2"
        gpus = int(raw.get("num_processes", 1)) * (int(raw.get("num_machines", 1)) if kind != "NO" else 1)
        return cls(max(gpus, 1), sharding, str(raw.get("mixed_precision", "no")))


def stage_of(recipe: str, stage: str) -> str:
    """anneal or bpo: as given, else told by the recipe's fields (only BPO has these)."""
    if stage:
        if stage not in ("anneal", "bpo"):
            raise UsageError(f"stage must be anneal or bpo, not {stage!r}")
        return stage
    return "bpo" if BPO_KEYS & set(recipe_values(recipe)) else "anneal"


def read_recipe(recipe: str, stage: str, **overrides):
    """(config, TRL's ModelConfig) of the training command, read as `bimode anneal|bpo --config RECIPE` reads it.

    The plan is for a GPU, maybe planned on a laptop: a recipe that leaves `bf16` unset gets TRL's resolution on
    a GPU (bf16), and where this machine has none, transformers is told `use_cpu` so that it accepts bf16 (the
    flag changes nothing else the plan reads). The output folder is a placeholder: nothing is written."""
    from trl import ModelConfig

    from bimode.train.precision import accelerator_available

    if stage == "bpo":
        from bimode.train.bpo.trainer import BPOConfig as config_class
    else:
        from bimode.train.anneal import AnnealConfig as config_class
    values = recipe_values(recipe)
    if values.get("bf16") is None and not values.get("fp16"):
        overrides.setdefault("bf16", True)
    if not accelerator_available():
        overrides.setdefault("use_cpu", True)
    return load_recipe((config_class, ModelConfig), recipe, output_dir=tempfile.gettempdir(), **overrides)


def build_plans(cfg, model_args, stage: str, shape: ModelShape, launch: Launch, gpu_gib: float,
                prompt_tokens: int = 0, tokenizer=None) -> tuple[Plan, dict[bool, int]]:
    """The plan for the recipe's own checkpointing setting, and the activations with it on and off.
    cfg, model_args: the training command's AnnealConfig / BPOConfig and TRL's ModelConfig (`read_recipe`)."""
    half = bool(cfg.bf16 or cfg.fp16) or launch.mixed_precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if half else torch.float32
    dtype_bytes = 2 if half else 4
    frozen = cfg.frozen()
    lora = bool(model_args.use_peft)
    if lora:
        trainable = lora_trainable(shape, model_args, cfg, tokenizer, frozen)
    else:
        trainable = sum(n for c, n in shape.params.items() if c not in frozen)
    rows = int(cfg.per_device_train_batch_size)
    if stage == "bpo":
        prompt = prompt_tokens or shape.image_tokens + 64
        # TRL scores completions with its fused LM head (chunks of log-probs, no full logits kept): no vocab term
        tokens, scored = prompt + int(cfg.max_completion_length), 0
    else:
        tokens = scored = int(cfg.max_length or 1024)
    adapters = None
    if lora and "llm" in cfg.lora_components:
        adapters = {"r": model_args.lora_r, "lora_alpha": model_args.lora_alpha, "lora_dropout": model_args.lora_dropout}
    text = measure_text(shape.text_config, dtype, adapters)
    vision_trains = "vision" not in frozen and not (lora and "vision" not in cfg.lora_components)
    vision = None
    if vision_trains and shape.image_grid:
        vision = measure_grid_vision(shape.vision_config, shape.vision_class, dtype, shape.image_grid)
    elif vision_trains and shape.vision_config:
        vision = measure_vision(shape.vision_config, dtype)
    # a pack holds several rows, each with its image: at most as many images as its tokens have room for
    images = max(1, tokens // shape.image_tokens) if stage == "anneal" and cfg.pack_rows and shape.image_tokens else 1
    per_image = {ck: images * vision.per_image(ck) if vision else 0 for ck in (False, True)}
    if stage == "bpo" and cfg.shared_prefix_forward and architecture_unsupported(shape.model) is None:
        # each prompt (and its images) runs once per group; its rollouts add their completions on its cache
        groups = -(-rows // int(cfg.num_generations))
        activations = {ck: groups * (text.per_sequence(prompt, 0, ck) + per_image[ck])
                       + rows * (text.per_sequence(tokens, scored, ck) - text.per_sequence(prompt, 0, ck))
                       for ck in (False, True)}
        one_layer = groups * text.layer(prompt) + rows * (text.layer(tokens) - text.layer(prompt))
    else:
        activations = {ck: rows * (text.per_sequence(tokens, scored, ck) + per_image[ck]) for ck in (False, True)}
        one_layer = rows * text.layer(tokens)
    checkpointing = bool(cfg.gradient_checkpointing)
    use_vllm = stage == "bpo" and bool(cfg.use_vllm)
    kv_needed = 0
    if stage == "bpo":
        per_step = rows * int(cfg.steps_per_generation or cfg.gradient_accumulation_steps or 1)
        if not use_vllm:
            per_step = min(per_step, int(cfg.rollout_batch_rows))
        kv_needed = per_step * tokens * shape.kv_bytes_per_token(dtype_bytes)
    weight_bytes = 2 if str(model_args.dtype or "").replace("torch.", "") in ("bfloat16", "float16") else 4
    setup = Setup(total_params=shape.total, weight_bytes=weight_bytes, trainable_params=trainable,
                  largest_layer_params=shape.largest_layer_params, num_gpus=launch.num_gpus,
                  sharding=launch.sharding, compute_bytes=dtype_bytes, lora=lora,
                  reference_model=stage == "bpo" and float(cfg.beta or 0) > 0 and not lora,
                  activation_bytes=activations[checkpointing], backward_bytes=int(one_layer),
                  gpu_bytes=int(gpu_gib * GIB),
                  vllm_share=float(cfg.vllm_gpu_memory_utilization) if use_vllm else 0.0,
                  vllm_weight_bytes=shape.total * dtype_bytes if use_vllm else 0,
                  kv_bytes_needed=kv_needed, generation_on_vllm=use_vllm)
    result = plan(setup, checkpointing)
    if shape.image_grid:
        (h, w), patch = shape.image_grid, shape.vision_config.patch_size
        merge = shape.vision_config.spatial_merge_size
        result.notes.append(f"images counted at {h * patch} x {w * patch} pixels, {shape.image_tokens} image tokens "
                            f"each (the image processor's max_pixels; "
                            f"image_grid_thw {h} x {w} patches, merged {merge} x {merge}): lower max_pixels in the "
                            "checkpoint's preprocessor_config.json to what the data uses")
    return result, activations


def load_plan_inputs(recipe: str, model_dir: str, launch_name: str, stage: str = "", **overrides):
    """(stage, config, model_args, model shape, launch, model dir) for `bimode plan`."""
    stage = stage_of(recipe, stage)
    cfg, model_args = read_recipe(recipe, stage, **overrides)
    model = model_dir or cfg.model_path
    if not model:
        raise UsageError("no model: give --model DIR (the recipe names no model_path)")
    launch = Launch.read(launch_config_path(launch_name)) if launch_name else Launch()
    return stage, cfg, model_args, read_shape(model), launch, model
