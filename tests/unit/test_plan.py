"""`bimode plan`: per-GPU memory of a run from counts (pure), slices (measured) and a recipe (the command)."""

import os

import pytest
import torch

from bimode.plan.memory import GIB, Setup, model_states, plan



def test_zero_model_states_are_deepspeeds_own_estimates():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, largest, n = 4_000_000_000, 150_000_000, 8
    zero2 = sum(r.bytes for r in model_states(Setup(p, p, largest, num_gpus=n, sharding="zero2")))
    assert zero2 == pytest.approx(estimate_zero2_model_states_mem_needs(p, n, 1, cpu_offload=False)[1], rel=1e-6)
    zero3 = sum(r.bytes for r in model_states(Setup(p, p, largest, num_gpus=n, sharding="zero3")))
    assert zero3 == pytest.approx(estimate_zero3_model_states_mem_needs(p, largest, n, 1, cpu_offload=False,
                                                                        cpu_offload_params=False)[1], rel=1e-6)
    # FSDP2 shards fp32 weights, gradients and Adam's moments; one process holds all 16 bytes per parameter
    assert sum(r.bytes for r in model_states(Setup(p, p, largest, num_gpus=n, sharding="fsdp2"))) == 16 * p // n
    assert sum(r.bytes for r in model_states(Setup(p, p, largest))) == 16 * p


def test_a_plan_that_does_not_fit_says_what_to_change():
    big = Setup(4_000_000_000, 4_000_000_000, 150_000_000, activation_bytes=100 * GIB, gpu_bytes=80 * GIB)
    result = plan(big, checkpointing=False)
    assert not result.fits and result.total > 80 * GIB
    assert result.advice[0].startswith("turn on gradient_checkpointing") and any("--use_peft" in a for a in result.advice)
    # the backward frees activations as gradients fill: the peak holds the larger of the two
    gradients = next(r.bytes for r in result.rows if r.what.startswith("gradients"))
    assert result.total == sum(r.bytes for r in result.rows) and any(r.bytes == -gradients for r in result.rows)
    small = Setup(1_000_000, 1_000_000, 100_000, activation_bytes=GIB, gpu_bytes=80 * GIB)
    assert plan(small, checkpointing=True).fits and plan(small, checkpointing=True).advice == []
    # colocated vLLM: its share must hold its weights; a cache smaller than one step's rollouts only queues some
    queued = Setup(1_000_000_000, 1_000_000_000, 1, activation_bytes=GIB, gpu_bytes=80 * GIB, vllm_share=0.1,
                   vllm_weight_bytes=2 * 10 ** 9, kv_bytes_needed=12 * GIB, generation_on_vllm=True)
    result = plan(queued, checkpointing=True)
    assert result.fits and "of them run at once and the rest wait" in result.notes[0]
    starved = Setup(**{**queued.__dict__, "vllm_weight_bytes": 9 * GIB})
    result = plan(starved, checkpointing=True)
    assert not result.fits and "does not hold its copy of the weights" in result.advice[0]


def test_the_model_is_read_on_the_meta_device_with_the_real_counts(tiny_dir):
    from bimode.models import load_model
    from bimode.plan.model_shape import read_shape
    from bimode.train.components import split_parameters

    shape = read_shape(tiny_dir)
    assert all(p.device.type == "meta" for p in shape.model.parameters())
    model, _ = load_model(tiny_dir, dtype=torch.float32)
    assert shape.params == {c: sum(p.numel() for _, p in g) for c, g in split_parameters(model).items()}
    assert 0 < shape.largest_layer_params < shape.total and shape.image_tokens == model.config.image_seq_length
    t = model.config.text_config
    assert shape.kv_bytes_per_token(2) == 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2


def test_slices_predict_what_the_whole_language_model_keeps_for_backward(tiny_dir):
    """Fitted on 1- and 2-layer slices at 64-256 tokens, checked on the whole model at other lengths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bimode.plan.activations import measure_text, saved_bytes

    text_config = AutoConfig.from_pretrained(tiny_dir).text_config
    fitted = measure_text(text_config, torch.float32)
    whole = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32).train()
    for s in (300, 700):
        ids = torch.randint(0, text_config.vocab_size, (1, s))
        kept = saved_bytes(whole, lambda: whole(input_ids=ids, labels=ids).loss)
        logits = s * text_config.vocab_size * 4  # alive beside what autograd saves (the plan counts both)
        assert fitted.per_sequence(s, s, checkpointing=False) == pytest.approx(kept + logits, rel=0.05), s
    # checkpointing keeps each layer's input and one layer's activations
    assert fitted.per_sequence(700, 700, True) < fitted.per_sequence(700, 700, False) / 2


def test_the_command_prints_the_table_and_exits_1_when_it_does_not_fit(tiny_dir, capsys):
    from bimode import cli

    assert cli.main(["plan", "--recipe", "tiny_bpo", "--model", str(tiny_dir), "--gpu_gib", "8"]) == 0
    out = capsys.readouterr().out
    assert "bimode bpo" in out and "activations (checkpointing off)" in out and "verdict: fits" in out
    assert cli.main(["plan", "--recipe", "tiny_anneal", "--model", str(tiny_dir), "--launch", "zero2",
                     "--gpu_gib", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "bimode anneal" in out and "8 GPU(s), sharding zero2" in out and "does not fit" in out
    assert "turn on gradient_checkpointing" in out
    assert cli.main(["plan", "--model", str(tiny_dir)]) == 2
    assert "--recipe is required" in capsys.readouterr().err


def test_the_plan_reads_a_recipe_as_the_training_command_does(tmp_path, monkeypatch):
    """One recipe reader (recipes.load_recipe): its validation, defaults and `env` block; an unset bf16 plans
    as TRL resolves it on a GPU."""
    from bimode.errors import UsageError
    from bimode.plan.build import read_recipe, stage_of

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("env: {BIMODE_PLAN_TEST: 'yes'}\nnum_generations: 4\nmax_completion_length: 96\n"
                      "use_peft: true\nlora_r: 4\n")
    monkeypatch.setenv("BIMODE_PLAN_TEST", "no")  # restored after the test
    assert stage_of(str(recipe), "") == "bpo"
    cfg, model_args = read_recipe(str(recipe), "bpo", per_device_train_batch_size=8)
    assert (cfg.num_generations, cfg.max_completion_length, cfg.per_device_train_batch_size) == (4, 96, 8)
    assert cfg.bf16 is True and model_args.use_peft and model_args.lora_r == 4
    assert cfg.frozen() == set() and cfg.rollout == "bimode"  # BPOConfig's own default
    assert os.environ["BIMODE_PLAN_TEST"] == "yes"  # the recipe's env block, as training applies it
    recipe.write_text("max_length: 512\nnum_generation: 4\n")
    with pytest.raises(UsageError, match="has no field num_generation"):
        read_recipe(str(recipe), "anneal")
    recipe.write_text("rollout: bimode\nnum_generations: 3\n")  # BPOConfig's own check
    with pytest.raises(UsageError, match="even num_generations"):
        read_recipe(str(recipe), stage_of(str(recipe), ""))


@pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"])
def test_qwen_vl_images_are_planned_from_their_grid_and_the_tower_slices_predict_it(tmp_path, family):
    """Qwen-VL: image tokens from image_grid_thw at the processor's max_pixels, the tower measured per patch on
    slices (Qwen3-VL's deepstack mergers among them) equal to what the whole tower keeps, and the text part
    (no causal-LM class of its own) measured as its text model with an output layer."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from bimode.plan.activations import _tower_output_sum, measure_grid_vision, saved_bytes
    from bimode.plan.build import Launch, build_plans, read_recipe
    from bimode.plan.model_shape import max_pixels, read_shape
    from tests.helpers import hf_fixtures

    path = getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family)
    shape = read_shape(path)
    side = int(max_pixels(path) ** 0.5)
    grid_thw = AutoImageProcessor.from_pretrained(path)(Image.new("RGB", (side, side)),
                                                        return_tensors="pt")["image_grid_thw"]
    vision = shape.vision_config
    assert shape.image_grid == tuple(grid_thw[0, 1:].tolist())
    assert shape.image_tokens == int(grid_thw.prod()) // vision.spatial_merge_size ** 2 > 0
    planned = measure_grid_vision(vision, shape.vision_class, torch.float32, shape.image_grid)
    tower = shape.vision_class(vision).train()
    patches = torch.randn(int(grid_thw.prod()), 3 * vision.temporal_patch_size * vision.patch_size ** 2)
    kept = saved_bytes(tower, lambda: _tower_output_sum(tower(patches, grid_thw=grid_thw)))
    assert planned.per_image(checkpointing=False) == pytest.approx(kept, rel=0.02)
    # planned as `bimode plan` does; a pack of max_length tokens holds as many rows, each with its image, as it has
    # room for
    cfg, model_args = read_recipe("tiny_anneal", "anneal", max_length=10 * shape.image_tokens, bf16=False,
                                  per_device_train_batch_size=1)
    result, padded = build_plans(cfg, model_args, "anneal", shape, Launch(), 80)
    assert result.fits and f"{shape.image_tokens} image tokens each" in result.notes[-1]
    cfg.pack_rows = True
    _, packed = build_plans(cfg, model_args, "anneal", shape, Launch(), 80)
    assert packed[False] - padded[False] == pytest.approx(9 * planned.per_image(False), rel=1e-3)
