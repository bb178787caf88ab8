"""The shared-prefix training forward (train/bpo/shared_forward.py) against TRL's per-row forward.

Batches as TRL builds them: left-padded prompts of different lengths with images, rollouts of two or more
prompts interleaved (TRL shuffles them), right-padded completions of different lengths. Log-probs,
entropies and the gradients of a weighted sum of both w.r.t. every parameter (vision tower, projector,
LLM) must match the per-row computation in fp32.
"""

import logging
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from bimode.compat.trl_api import completion_logps, trl_completion_logps
from bimode.compat.transformers_api import disable_activation_checkpointing, enable_activation_checkpointing
from bimode.data import synthetic
from bimode.models import load_model
from bimode.train.bpo.shared_forward import (architecture_unsupported, call_unsupported, find_prefix_groups,
                                                grouped_completion_logps)

from tests.helpers import hf_fixtures
from tests.helpers.bpo_helpers import forward_path

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

ORDER = [0, 1, 2, 0, 2, 1, 1, 0]  # 8 rollouts of 3 prompts, groups not adjacent
K = 7  # completion columns
TOL = 1e-5


def records(n: int = 3):
    return [s.to_record() for s in synthetic.generate(n, seed=3, families=["shell", "count"], max_level=3)]


def make_batch(processor, texts: list[str], images: list[list], order=ORDER, k: int = K, seed: int = 0):
    """TRL's layout: prompts (left-padded, with images) repeated per rollout in `order`, then completions of
    2..k tokens right-padded to k. Returns input_ids and attention_mask (B, P + k) and TRL's image kwargs."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1, lengths  # prompts of different lengths: some rows are left-padded
    gen = torch.Generator().manual_seed(seed)
    image_token = getattr(processor, "image_token_id", None)
    completion = torch.randint(10, len(tok) - 10, (len(order), k), generator=gen)
    if image_token is not None:
        completion[completion == image_token] = 11
    completion_mask = torch.ones_like(completion)
    for row in range(len(order)):
        n = 2 + row % (k - 1)
        completion[row, n:] = tok.pad_token_id
        completion_mask[row, n:] = 0
    index = torch.tensor(order)
    input_ids = torch.cat([enc["input_ids"][index], completion], 1)
    mask = torch.cat([enc["attention_mask"][index], completion_mask], 1)
    per_image = [0]
    for imgs in images:
        per_image.append(per_image[-1] + len(imgs))
    image_index = torch.tensor([i for p in order for i in range(per_image[p], per_image[p + 1])])
    kwargs = {"num_images": [len(images[p]) for p in order]}
    for key in ("pixel_values", "image_sizes"):
        if key in enc:
            kwargs[key] = enc[key][image_index]
    return input_ids, mask, kwargs


def tiny_batch(processor, recs):
    texts = [processor.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False,
                                           thinking_mode="auto") for r in recs]
    return make_batch(processor, texts, [r.load_images() for r in recs])


def direct(model, input_ids, mask, kwargs, temperature: float):
    """The per-row reference: one forward of every row, logits of the completion positions / temperature."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    inputs = {k: v for k, v in kwargs.items() if k != "num_images"}
    logits = model(input_ids=input_ids, attention_mask=mask, **inputs).logits[:, -K - 1:-1].float() / temperature
    valid = mask[:, -K:] == 1
    return (selective_log_softmax(logits, input_ids[:, -K:]).masked_fill(~valid, 0.0),
            entropy_from_logits(logits).masked_fill(~valid, 0.0))


def grads(model, logps, entropies, weights):
    params = [p for p in model.parameters() if p.requires_grad]
    total = (logps * weights).sum() + 0.1 * entropies.sum()
    return torch.autograd.grad(total, params, allow_unused=True)


def compare(model, shared, reference):
    """Max abs log-prob and entropy differences and max relative gradient difference, per parameter tensor.
    A tensor whose true gradient is 0 (an attention key bias: softmax ignores a shift) holds rounding noise
    on both sides (about 1e-8); those are held to an absolute 1e-6 instead of a ratio of noise to noise."""
    logp_diff = (shared[0] - reference[0]).abs().max().item()
    entropy_diff = (shared[1] - reference[1]).abs().max().item()
    weights = torch.randn(shared[0].shape, generator=torch.Generator().manual_seed(1))
    rel, used = 0.0, 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads(model, *shared, weights), grads(model, *reference, weights)):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        used += 1
        if b.norm() > 1e-5:
            rel = max(rel, ((a - b).norm() / b.norm()).item())
        else:
            assert (a - b).norm() < 1e-6, (name, a.norm(), b.norm())
    return logp_diff, entropy_diff, rel, used


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    return model.train(), processor


# ---- grouping -----------------------------------------------------------------------------------------
def test_rows_group_by_prompt_and_images_wherever_they_sit(tiny):
    _, processor = tiny
    input_ids, mask, kwargs = tiny_batch(processor, records())
    groups = find_prefix_groups(input_ids, mask, K, **kwargs)
    assert groups.group_of.tolist() == ORDER and groups.representatives == [0, 1, 2] and groups.shared
    # the same text with another image is another prompt
    other = dict(kwargs, pixel_values=kwargs["pixel_values"].clone())
    other["pixel_values"][3] += 1.0
    assert find_prefix_groups(input_ids, mask, K, **other).group_of.tolist() == [0, 1, 2, 3, 2, 1, 1, 0]
    # completions are not part of the prompt: rows 0 and 7 (prompt 0, other completions) share it ...
    pick = [0, 7]
    sub = {"pixel_values": kwargs["pixel_values"][pick], "num_images": [1, 1]}
    assert find_prefix_groups(input_ids[pick], mask[pick], K, **sub).shared
    # ... and the same prompt with one more column masked is another prompt
    masked = mask[pick].clone()
    masked[1, int(masked[1].nonzero()[0])] = 0
    assert not find_prefix_groups(input_ids[pick], masked, K, **sub).shared


# ---- equivalence: the tiny LLaVA (SigLIP + Qwen3) -------------------------------------------------------
def test_tiny_llava_log_probs_entropies_and_gradients_match_the_per_row_forward(tiny):
    model, processor = tiny
    input_ids, mask, kwargs = tiny_batch(processor, records())
    assert call_unsupported(model, input_ids, K, **kwargs) is None
    # batch_size 3: prefix passes of 3 distinct prompts, row passes in chunks of 3, 3 and 2 (TRL's chunking)
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=3, temperature=0.7)
    reference = direct(model, input_ids, mask, kwargs, 0.7)
    logp, entropy, rel, used = compare(model, shared, reference)
    print(f"tiny llava: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used} tensors)")
    assert logp < TOL and entropy < TOL and rel < TOL
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n for n in names) and any("projector" in n for n in names)


def test_fused_head_and_lora_match_trls_own_method(tiny_dir, tiny):
    """The trainer's path: TRL's fused LM head (temperature inside it) on a LoRA-wrapped model, against
    TRL 1.16's `_get_per_token_logps_and_entropies` itself, including its batch_size chunking."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    _, processor = tiny
    model, _ = load_model(tiny_dir, dtype=torch.float32)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "up_proj"])).train()
    input_ids, mask, kwargs = tiny_batch(processor, records())
    assert call_unsupported(model, input_ids, K, **kwargs) is None
    stub = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext))
    logps, entropies, _ = trl_completion_logps(stub, model, input_ids, mask, K, batch_size=3, compute_entropy=True,
                                               **kwargs)
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=3, fused_lm_head=True)
    logp, entropy, rel, used = compare(model, shared, (logps, entropies))
    print(f"fused head + LoRA: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used})")
    assert logp < TOL and entropy < TOL and rel < TOL and used > 0


# ---- equivalence: LLaVA-NeXT (R-4B's layout, images of different shapes) -----------------------------------
def test_llava_next_with_image_sizes_matches_the_per_row_forward(tmp_path):
    from PIL import Image

    model_dir = hf_fixtures.build_tiny_llava_next(tmp_path / "llava_next")
    model, processor = load_model(model_dir, dtype=torch.float32)
    model.train()
    recs = records()
    shapes = [(32, 32), (64, 32), (32, 64)]  # AnyRes: each shape its own number of image tokens
    images = [[r.load_images()[0].resize(s, Image.BILINEAR)] for r, s in zip(recs, shapes)]
    texts = [processor.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False,
                                           thinking_mode="auto") for r in recs]
    input_ids, mask, kwargs = make_batch(processor, texts, images)
    assert "image_sizes" in kwargs and call_unsupported(model, input_ids, K, **kwargs) is None
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=5, temperature=1.0)
    logp, entropy, rel, used = compare(model, shared, direct(model, input_ids, mask, kwargs, 1.0))
    print(f"llava-next: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used})")
    assert logp < TOL and entropy < TOL and rel < TOL


# ---- what falls back --------------------------------------------------------------------------------
def test_unsupported_models_and_calls_say_why(tmp_path, tiny):
    model, processor = tiny
    input_ids, _, kwargs = tiny_batch(processor, records())
    qwen_dir = hf_fixtures.build_tiny_qwen25_vl(tmp_path / "qwen25_vl")
    qwen, _ = load_model(qwen_dir, dtype=torch.float32)
    assert "allow-list" in architecture_unsupported(qwen)
    assert "MoE" in call_unsupported(model, input_ids, K, compute_aux_loss=True, **kwargs)
    assert "image_grid_thw" in call_unsupported(model, input_ids, K, image_grid_thw=torch.ones(8, 3), **kwargs)
    image_in_completion = input_ids.clone()
    image_in_completion[0, -1] = processor.image_token_id
    assert "image token" in call_unsupported(model, image_in_completion, K, **kwargs)
    # transformers 5's name for gradient checkpointing; reentrant runs the layer without autograd
    enable_activation_checkpointing(model, {"use_reentrant": True})
    try:
        assert "reentrant" in call_unsupported(model, input_ids, K, **kwargs)
        with torch.no_grad():  # TRL's old and reference log-probs: no backward replay, the cache is kept
            assert call_unsupported(model, input_ids, K, **kwargs) is None
    finally:
        disable_activation_checkpointing(model)


def test_non_reentrant_gradient_checkpointing_keeps_the_prompt_cache_and_its_gradients(tiny):
    """TRL's default checkpointing: transformers would drop the cache in checkpointed layers; the shared
    path's caches survive the backward replay, so log-probs and gradients still match."""
    model, processor = tiny
    input_ids, mask, kwargs = tiny_batch(processor, records())
    enable_activation_checkpointing(model)  # {"use_reentrant": False}
    try:
        assert call_unsupported(model, input_ids, K, **kwargs) is None
        shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=4, temperature=0.7)
        logp, entropy, rel, used = compare(model, shared, direct(model, input_ids, mask, kwargs, 0.7))
    finally:
        disable_activation_checkpointing(model)
    assert not any(hasattr(m, "_can_checkpoint_with_cache") and "_can_checkpoint_with_cache" in vars(m)
                   for m in model.modules())  # the switch is put back
    print(f"checkpointed: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used})")
    assert logp < TOL and entropy < TOL and rel < TOL


# ---- in the trainer -------------------------------------------------------------------------------------
ROWS = [i // 4 for i in range(8)]  # a generation batch as TRL samples it: 2 prompts x 4 rollouts


def make_trainer(model_dir, train_file, out, model_args=None, **overrides):
    from bimode.train.bpo.trainer import BPOConfig, build_trainer

    args = dict(model_path=str(model_dir), train_files=[str(train_file)], output_dir=str(out), num_generations=4,
                per_device_train_batch_size=8, max_completion_length=8, max_steps=1, learning_rate=0.5, optim="sgd",
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, probe_steps=0, seed=0,
                gradient_checkpointing=False, rewards=["tests.helpers.bpo_helpers:no_think_wins"], temperature=1.0)
    args.update(overrides)
    return build_trainer(BPOConfig(**args), model_args=model_args)


def test_trainer_signature_is_trls():
    """TRL passes the forward's arguments by keyword: a parameter renamed in a release would fail silently, so
    the trainer's overrides are checked against TRL's methods (compat/overrides.py)."""
    from bimode.compat.overrides import check_overrides
    from bimode.train.bpo.trainer import BPOTrainer

    check_overrides(BPOTrainer)  # raises naming the method whose parameters differ


def forward_paths(caplog) -> set[str]:
    """The forward paths BPO said it scores rollouts with (its log), since caplog was last cleared."""
    return {path for r in caplog.records if (path := forward_path(r.getMessage())) is not None}


@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, False), (False, True)],
                         ids=["full", "lora", "checkpointing"])
def test_a_bpo_step_is_the_same_with_the_shared_forward_on_and_off(tmp_path, tiny_dir, trained_families_file, lora,
                                                                    checkpointing, caplog):
    """One step (beta > 0: reference log-probs, from the adapter-less model under LoRA; num_iterations 2: old
    log-probs; TRL shuffles the rollouts; TRL's default gradient checkpointing or none) with the shared forward
    and without: same loss, same weights."""
    from trl import ModelConfig

    model_args = ModelConfig(use_peft=True, lora_r=4, lora_dropout=0.0) if lora else None
    runs = {}
    caplog.set_level(logging.INFO, logger="bimode.train.bpo.trainer")
    for shared in (True, False):
        caplog.clear()
        trainer = make_trainer(tiny_dir, trained_families_file, tmp_path / str(shared), model_args,
                               shared_prefix_forward=shared, beta=0.05, num_iterations=2,
                               gradient_checkpointing=checkpointing)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        # the Trainer turns checkpointing on inside train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == checkpointing
        after = dict(trainer.model.named_parameters())
        runs[shared] = (trainer.state.log_history[0], before, after, forward_paths(caplog))
    (log_on, before_on, after_on, paths_on), (log_off, before_off, _, paths_off) = runs[True], runs[False]
    assert paths_on == {"shared-prefix forward"}, paths_on
    assert paths_off == {"TRL's per-row forward (shared_prefix_forward is off)"}, paths_off
    # 8 rollouts of 2 prompts: 4 rows per prompt pass with the shared forward, 1 without
    assert log_on["shared_prefix/rows_per_prompt_pass"] == 4.0 and log_off["shared_prefix/rows_per_prompt_pass"] == 1.0
    for key in ("loss", "kl", "entropy"):
        assert log_on[key] == pytest.approx(log_off[key], rel=1e-5, abs=1e-7), key
    moved = 0.0
    for name, p in runs[False][2].items():
        assert torch.equal(before_on[name], before_off[name])
        assert torch.allclose(after_on[name], p, rtol=1e-5, atol=1e-6), name
        moved = max(moved, (p - before_off[name]).abs().max().item())
    assert moved > 1e-3  # the step did something


def test_a_qwen_vl_model_takes_trls_path_with_trls_numbers(tmp_path, trained_families_file, caplog):
    caplog.set_level(logging.INFO, logger="bimode.train.bpo.trainer")
    model_dir = hf_fixtures.build_tiny_qwen25_vl(tmp_path / "qwen25_vl")
    trainer = make_trainer(model_dir, trained_families_file, tmp_path / "run", max_completion_length=4)
    trainer.model.train()
    inputs, _ = trainer.generate_and_score(ROWS)
    args = (trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))
    kwargs = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images")}
    with torch.no_grad():
        ours = completion_logps(trainer, *args, compute_entropy=True, **kwargs)
        theirs = trl_completion_logps(trainer, *args, compute_entropy=True, **kwargs)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    (path,) = forward_paths(caplog)
    assert path.startswith("TRL's per-row forward (model type 'qwen2_5_vl' is not on the shared-prefix allow-list")
