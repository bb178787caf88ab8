"""Every stage on other model families: R-4B's own layout (LLaVA-NeXT: AnyRes tiles, image_sizes, SigLIP + Qwen3),
LLaVA with a Llama-style tokenizer (no think tags, `\n\n` as two tokens), Gemma 3, Qwen2.5-VL and Qwen3-VL (more of
them in test_anneal, test_bpo). Annealing and a BPO step save as `bimode anneal` / `bpo` do and load back."""

import pytest
import torch
from PIL import Image

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from bimode.train.components import component_of
from bimode.train.run import train_and_save
from tests.helpers.checkpoints import assert_reloads
from tests.helpers.hf_fixtures import (
    build_tiny_gemma3,
    build_tiny_llava_llama_style,
    build_tiny_llava_next,
    build_tiny_qwen3_vl,
    build_tiny_qwen25_vl,
)
from tests.helpers.reference_generation import assert_engine_equals_plain_generate, generate

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}]



@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "model")


@pytest.fixture(scope="module", params=["llava_next", "llava_llama_style", "gemma3", "qwen25_vl", "qwen3_vl"])
def family_dir(request, tmp_path_factory, next_dir):
    if request.param == "llava_next":
        return next_dir
    builder = {"llava_llama_style": build_tiny_llava_llama_style, "gemma3": build_tiny_gemma3,
               "qwen25_vl": build_tiny_qwen25_vl, "qwen3_vl": build_tiny_qwen3_vl}[request.param]
    return builder(tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    records = [s.to_record() for s in synthetic.generate(32, seed=5, families=["shell"], max_level=3)]
    return write_records(records, tmp_path_factory.mktemp("llava_next_data") / "train.jsonl")


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """Image and text-only records: batches that mix them."""
    records = [s.to_record() for s in synthetic.generate(32, seed=5, families=["shell", "shell_text"], max_level=3)]
    return write_records(records, tmp_path_factory.mktemp("mixed_data") / "train.jsonl")


def test_shared_prefix_engine_equals_plain_generate_across_tile_counts(next_dir):
    model, processor = load_model(next_dir, dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    assert engine.shared_prefix
    # a wide, a tall and a square image: different tile grids, so different prompt lengths in one batch
    images = [Image.new("RGB", size, colour) for size, colour in (((64, 32), "red"), ((32, 64), "blue"),
                                                                   ((32, 32), "green"))]
    prompts = [Prompt(USER, images=[image], modes=["think", "no_think"]) for image in images]
    assert len({len(engine.prompt_ids(p)) for p in prompts}) > 1
    shared = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, group in zip(prompts, shared):
        for mode, completion in zip(("think", "no_think"), group):
            [reference] = generate(model, processor, [p], mode, 6, batch_size=1, suppress_tokens=engine.banned_ids)
            assert completion.token_ids == reference.token_ids


def test_anneal_trains_every_component(tmp_path, family_dir, train_file):
    """Its checkpoints (the Trainer's at a step, the final one where `bimode anneal` puts it) load back as trained."""
    from bimode.train.anneal import AnnealConfig, build_trainer

    trainer = build_trainer(AnnealConfig(
        model_path=str(family_dir), train_files=[str(train_file)], output_dir=str(tmp_path), target_modes="both",
        max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], save_strategy="steps",
        save_steps=2, save_only_model=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
        lr_scheduler_type="constant"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final = train_and_save(trainer)
    changed = {component_of(n) for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {"vision", "projector", "llm"}
    assert_reloads(trainer, final)
    assert_reloads(trainer, tmp_path / "checkpoint-2")  # the Trainer's own save, also through the processor's


def test_bpo_step_trains_every_component(tmp_path, family_dir, train_file):
    from bimode.train.bpo.trainer import BPOConfig, build_trainer

    trainer = build_trainer(BPOConfig(
        model_path=str(family_dir), train_files=[str(train_file)], output_dir=str(tmp_path), num_generations=4,
        # two steps: Gemma 3 initialises its projection to zeros, so the vision tower's first gradient is zero
        per_device_train_batch_size=8, max_completion_length=6, max_steps=2, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, probe_steps=0, seed=0, gradient_checkpointing=False,
        rewards=["tests.helpers.bpo_helpers:no_think_wins"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final = train_and_save(trainer)  # what `bimode bpo` runs
    assert trainer.state.log_history[0]["bpo/no_think/advantage"] > 0
    changed = {component_of(n) for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {"vision", "projector", "llm"}
    assert_reloads(trainer, final)


def test_gemma3_shared_prefix_engine_equals_plain_generate_past_its_window(tmp_path):
    """Gemma 3's rollouts share the prompt's cache like LLaVA's: its two-way image attention in the prefill (the
    processor's token_type_ids), its sliding window (8 tokens, shorter than every prompt) in every decode step.
    Greedy tokens and log-probs equal plain `generate` one prompt at a time, in a batch of an image and a
    text-only prompt of different lengths."""
    from tests.helpers.hf_fixtures import build_tiny_gemma3_showing_masks

    model, processor = load_model(build_tiny_gemma3_showing_masks(tmp_path / "gemma3", sliding_window=8),
                                  dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    text_only = [{"role": "user", "content": [{"type": "text", "text": "The ball is under cup 2. Where is it?"}]}]
    prompts = [Prompt(USER, images=[Image.new("RGB", (64, 32), "red")], modes=["think", "no_think"]),
               Prompt(text_only, images=[], modes=["think", "no_think"])]
    assert engine.shared_prefix and min(len(engine.prompt_ids(p)) for p in prompts) > 8
    assert_engine_equals_plain_generate(engine, prompts)


@pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"])
def test_plain_path_batches_prompts_and_equals_one_at_a_time_generate(tmp_path, family):
    """The plain decoder (multi-axis models bimode has not tested; Qwen-VL put on it by hand) takes one batched
    `generate` per mode: left-padded prompts of different lengths (image sizes, a text-only prompt) give what each
    prompt gives alone. Qwen-VL's own shared-prefix decoding: test_multi_axis_engine.py."""
    from tests.helpers import hf_fixtures

    model, processor = load_model(getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family),
                                  dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    engine.shared_prefix = False
    text_only = [{"role": "user", "content": [{"type": "text", "text": "The ball is under cup 2. Where is it?"}]}]
    prompts = [Prompt(USER, images=[Image.new("RGB", (64, 32), "red")], modes=["think", "no_think"]),
               Prompt(text_only, images=[], modes=["think", "no_think"]),
               Prompt(USER, images=[Image.new("RGB", (32, 32), "blue")], modes=["think", "no_think"])]
    batched = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, group in zip(prompts, batched):
        for mode, completion in zip(("think", "no_think"), group):
            [reference] = generate(model, processor, [p], mode, 6, batch_size=1, suppress_tokens=engine.banned_ids)
            assert completion.token_ids == reference.token_ids, (mode, p.messages)


@pytest.mark.parametrize("family", ["gemma3", "llava_next", "qwen3_vl"])
def test_engine_never_samples_media_tokens_and_mixes_image_and_text_prompts(tmp_path, family, mixed_file):
    """Every image/video placeholder and marker is banned, even when the model prefers it (here: +100 on its
    logits); a batch of image and text-only prompts encodes (Gemma 3 needs the images nested per prompt)."""
    from bimode.data.records import read_records
    from tests.helpers import hf_fixtures

    model, processor = load_model(getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family),
                                  dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    tok = processor.tokenizer
    names = {"gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"], "llava_next": ["<image>"],
             "qwen3_vl": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]}[family]
    media = tok.convert_tokens_to_ids(names)
    assert set(media) <= set(engine.banned_ids)
    boost = torch.zeros(model.config.get_text_config().vocab_size)
    boost[media] = 100.0
    handle = model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out.logits + boost))
    try:
        records = read_records(mixed_file)[:6]
        assert {bool(r.images) for r in records} == {True, False}
        groups = engine.generate([Prompt.bimode_group(r, 1) for r in records],
                                 SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    finally:
        handle.remove()
    generated = [t for group in groups for c in group for t in c.token_ids]
    assert generated and not set(generated) & set(media)
