"""The shared-prefix training forward (train/bpo/shared_forward.py) against TRL's per-row forward.

Batches as TRL builds them: left-padded prompts of different lengths with images, rollouts of two or more
prompts interleaved (TRL shuffles them), right-padded completions of different lengths. Log-probs,
entropies and the gradients of a weighted sum of both w.r.t. every parameter (vision tower, projector,
LLM) must match the per-row computation in fp32. Each test runs on the tiny LLaVA (1-D positions) and on tiny
Qwen2.5-VL and Qwen3-VL (multi-axis positions from get_rope_index, images as flat patches with image_grid_thw,
mm_token_type_ids; Qwen3-VL's deepstack features), whose batch mixes a prompt of two images of different sizes,
a text-only prompt and a one-image prompt.
"""

import logging
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from bimode.compat.trl_api import completion_logps, trl_completion_logps
from bimode.compat.transformers_api import (base_model, disable_activation_checkpointing,
                                            enable_activation_checkpointing)
from bimode.data import synthetic
from bimode.models import load_model
from bimode.train.bpo.shared_forward import (ImageLayout, architecture_unsupported, call_unsupported,
                                                find_prefix_groups, grouped_completion_logps, pass_positions)

from tests.helpers import hf_fixtures
from tests.helpers.bpo_helpers import forward_path

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

ORDER = [0, 1, 2, 0, 2, 1, 1, 0]  # 8 rollouts of 3 prompts, groups not adjacent
K = 7  # completion columns
TOL = 1e-5
FAMILIES = ["llava", "qwen25_vl", "qwen3_vl"]
QWEN_BUILDERS = {"qwen25_vl": hf_fixtures.build_tiny_qwen25_vl, "qwen3_vl": hf_fixtures.build_tiny_qwen3_vl}
BUILDERS = {**QWEN_BUILDERS, "gemma3": hf_fixtures.build_tiny_gemma3_showing_masks}


def records(n: int = 3):
    return [s.to_record() for s in synthetic.generate(n, seed=3, families=["shell", "count"], max_level=3)]


def make_batch(processor, texts: list[str], images: list[list], order=ORDER, k: int = K, seed: int = 0):
    """TRL's layout: prompts (left-padded, with images) repeated per rollout in `order`, then completions of
    2..k tokens right-padded to k. Returns input_ids and attention_mask (B, P + k) and TRL's image kwargs:
    per-image tensors (pixel_values one row per image, or Qwen-VL's image_grid_thw.prod() patch rows per image)
    in the rows' order, num_images per row, mm_token_type_ids or token_type_ids (B, P + k) with zeros for the
    completion."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(images=images if any(images) else None, text=texts, return_tensors="pt", padding=True)
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
    image_index = [i for p in order for i in range(per_image[p], per_image[p + 1])]
    kwargs = {"num_images": [len(images[p]) for p in order]}
    for key in ("image_sizes", "image_grid_thw"):
        if key in enc:
            kwargs[key] = enc[key][image_index]
    if "pixel_values" in enc:
        patches = enc["image_grid_thw"].prod(-1).tolist() if "image_grid_thw" in enc else [1] * per_image[-1]
        starts = [sum(patches[:i]) for i in range(len(patches))]
        kwargs["pixel_values"] = enc["pixel_values"][[starts[i] + j for i in image_index for j in range(patches[i])]]
    for key in ("mm_token_type_ids", "token_type_ids"):  # per token: the completion's are text, 0
        if key in enc:
            kwargs[key] = torch.cat([enc[key][index], torch.zeros_like(completion)], 1)
    return input_ids, mask, kwargs


def prompt_text(processor, record, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": record.question.replace("<image>\n", "")}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False, thinking_mode="auto")


def tiny_batch(processor, recs):
    texts = [processor.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False,
                                           thinking_mode="auto") for r in recs]
    return make_batch(processor, texts, [r.load_images() for r in recs])


def family_batch(family, order=ORDER):
    """The LLaVA's three one-image prompts; for Qwen-VL a mixed batch: two images of different sizes (2 and 4
    image tokens), a text-only prompt, one image (1 token)."""
    recs = records()
    if family.name == "llava":
        return tiny_batch(family.processor, recs)
    image = recs[0].load_images()[0]
    side = 2 * family.processor.image_processor.patch_size  # one merged token
    images = [[image.resize((2 * side, side)), image.resize((2 * side, 2 * side))], [], [image.resize((side, side))]]
    texts = [prompt_text(family.processor, r, len(i)) for r, i in zip(recs, images)]
    return make_batch(family.processor, texts, images, order)


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


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    """checkpoints(name): the family's tiny checkpoint, built on first use."""
    built = {"llava": tiny_dir}

    def get(name: str):
        if name not in built:
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(name) / "model")
        return built[name]
    return get


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    """A family's tiny checkpoint (dir), loaded in fp32 in train mode (model, processor)."""
    model, processor = load_model(checkpoints(request.param), dtype=torch.float32)
    return SimpleNamespace(name=request.param, dir=checkpoints(request.param), model=model.train(),
                           processor=processor)


QWEN = pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"], indirect=True)


# ---- grouping -----------------------------------------------------------------------------------------
def pixel_rows(kwargs) -> list[int]:
    """Rows of pixel_values per image: one (LLaVA) or image_grid_thw.prod() patches (Qwen-VL)."""
    grid = kwargs.get("image_grid_thw")
    return grid.prod(-1).tolist() if grid is not None else [1] * len(kwargs["pixel_values"])


def test_rows_group_by_prompt_and_images_wherever_they_sit(family):
    input_ids, mask, kwargs = family_batch(family)
    groups = find_prefix_groups(input_ids, mask, K, **kwargs)
    assert groups.group_of.tolist() == ORDER and groups.representatives == [0, 1, 2] and groups.shared
    # the same text with another image is another prompt: row 3's (prompt 0's) first image, one pixel row changed
    # (for Qwen-VL one patch of it: pixel_values hold each image's patches)
    per_image = pixel_rows(kwargs)
    other = dict(kwargs, pixel_values=kwargs["pixel_values"].clone())
    other["pixel_values"][sum(per_image[:sum(kwargs["num_images"][:3])])] += 1.0
    assert find_prefix_groups(input_ids, mask, K, **other).group_of.tolist() == [0, 1, 2, 3, 2, 1, 1, 0]
    # completions are not part of the prompt: rows 0 and 7 (prompt 0, other completions) share it ...
    pick, n = [0, 7], kwargs["num_images"][0]
    row_pixels = kwargs["pixel_values"][:sum(per_image[:n])]
    sub = {k: torch.cat([v[:n], v[:n]]) for k, v in kwargs.items() if k in ("image_grid_thw", "image_sizes")}
    sub.update(pixel_values=torch.cat([row_pixels, row_pixels]), num_images=[n, n])
    if "mm_token_type_ids" in kwargs:
        sub["mm_token_type_ids"] = kwargs["mm_token_type_ids"][pick]
    assert find_prefix_groups(input_ids[pick], mask[pick], K, **sub).shared
    # ... and the same prompt with one more column masked is another prompt
    masked = mask[pick].clone()
    masked[1, int(masked[1].nonzero()[0])] = 0
    assert not find_prefix_groups(input_ids[pick], masked, K, **sub).shared


@QWEN
def test_qwen_vl_images_are_told_apart_by_their_grids(family):
    """The same patch rows cut into images of other grids are other images (Qwen-VL's pixel_values are patches)."""
    input_ids, mask, kwargs = family_batch(family, order=[0, 0])  # the two-image prompt twice
    assert find_prefix_groups(input_ids, mask, K, **kwargs).group_of.tolist() == [0, 0]
    grid = kwargs["image_grid_thw"].clone()
    grid[2:] = grid[2:].flip(0)  # row 1: the same 8 + 16 patches, read as a 16-patch then an 8-patch image
    assert find_prefix_groups(input_ids, mask, K, **dict(kwargs, image_grid_thw=grid)).group_of.tolist() == [0, 1]


# ---- equivalence: LLaVA (SigLIP + Qwen3), Qwen2.5-VL, Qwen3-VL ------------------------------------------
def image_parameters(family) -> tuple[str, str]:
    return ("vision_tower", "projector") if family.name == "llava" else ("visual.blocks", "visual.merger")


def test_log_probs_entropies_and_gradients_match_the_per_row_forward(family):
    model, processor = family.model, family.processor
    input_ids, mask, kwargs = family_batch(family)
    assert call_unsupported(model, input_ids, K, **kwargs) is None
    # batch_size 3: prefix passes of 3 distinct prompts, row passes in chunks of 3, 3 and 2 (TRL's chunking)
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=3, temperature=0.7)
    reference = direct(model, input_ids, mask, kwargs, 0.7)
    logp, entropy, rel, used = compare(model, shared, reference)
    print(f"{family.name}: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used} tensors)")
    assert logp < TOL and entropy < TOL and rel < TOL
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(any(part in n for n in names) for part in image_parameters(family))


@QWEN
def test_qwen_vl_prefix_batches_of_one_and_of_all_prompts_match(family):
    """Prefix chunks of one prompt (the text-only one alone: no images in that pass) and of all three."""
    input_ids, mask, kwargs = family_batch(family)
    with torch.no_grad():
        reference = direct(family.model, input_ids, mask, kwargs, 1.0)
        for batch_size in (1, 8):
            shared = grouped_completion_logps(family.model, input_ids, mask, K, kwargs, True, batch_size=batch_size)
            assert (shared[0] - reference[0]).abs().max() < TOL and (shared[1] - reference[1]).abs().max() < TOL


@QWEN
def test_qwen_vl_positions_are_the_models_own_over_prompt_and_completion(family):
    """The two passes' positions are exactly what the model's get_rope_index gives the whole rows (TRL's
    per-row forward): the prompt's on three axes, the completion's continuing as text, right pads at 0."""
    from bimode.models.positions import rope_positions

    input_ids, mask, kwargs = family_batch(family)
    groups = find_prefix_groups(input_ids, mask, K, **kwargs)
    layout = ImageLayout.of(kwargs["num_images"], kwargs["image_grid_thw"])
    prefix, rows = pass_positions(family.model, input_ids, mask, groups, layout, **kwargs)
    whole = rope_positions(family.model, input_ids, mask, kwargs["mm_token_type_ids"], kwargs["image_grid_thw"])
    cut = input_ids.size(1) - K - 1
    assert torch.equal(prefix, whole[:, groups.representatives, :cut]) and torch.equal(rows, whole[:, :, cut:])
    assert bool((whole[0] != whole[1]).any())  # the images' positions differ by axis: a real multi-axis case
    assert bool((rows[:, mask[:, cut:] == 0] == 0).all()) and bool((mask[:, cut:] == 0).any())


@QWEN
def test_qwen_vl_text_only_batch_matches_the_per_row_forward(family):
    """A batch without images (TRL passes no image arguments): the model's column positions on every axis."""
    recs = records()
    texts = [prompt_text(family.processor, r, 0) for r in recs]
    input_ids, mask, kwargs = make_batch(family.processor, texts, [[] for _ in recs])
    kwargs = {}  # TRL gives no image arguments when no prompt has an image (not even mm_token_type_ids)
    assert call_unsupported(family.model, input_ids, K) is None
    shared = grouped_completion_logps(family.model, input_ids, mask, K, kwargs, True, batch_size=3)
    logp, entropy, rel, used = compare(family.model, shared, direct(family.model, input_ids, mask, kwargs, 1.0))
    assert logp < TOL and entropy < TOL and rel < TOL


@pytest.mark.parametrize("family", ["qwen3_vl"], indirect=True)
def test_qwen3_vl_deepstack_features_go_to_the_prefix_pass_only(family):
    """Qwen3-VL adds vision features at the image tokens in early layers (deepstack): the prefix pass, which has
    every image token, gets them; the row pass, text only, gets none."""
    input_ids, mask, kwargs = family_batch(family)
    seen = []

    def record(module, args, kw):
        seen.append((kw["inputs_embeds"].size(1), kw.get("visual_pos_masks"), kw.get("deepstack_visual_embeds")))

    language_model = base_model(family.model).model.language_model
    handle = language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            grouped_completion_logps(family.model, input_ids, mask, K, kwargs, batch_size=8)
    finally:
        handle.remove()
    (prefix_columns, masks, embeds), *rows = seen
    assert prefix_columns == input_ids.size(1) - K - 1 and len(rows) == 1 and rows[0][0] == K + 1
    image_tokens = int((input_ids[[0, 1, 2], :prefix_columns] == family.processor.image_token_id).sum())
    assert int(masks.sum()) == image_tokens == 7 and embeds[0].size(0) == image_tokens
    assert rows[0][1] is None and rows[0][2] is None


def test_fused_head_and_lora_match_trls_own_method(family):
    """The trainer's path: TRL's fused LM head (temperature inside it) on a LoRA-wrapped model, against
    TRL 1.16's `_get_per_token_logps_and_entropies` itself, including its batch_size chunking."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    model, _ = load_model(family.dir, dtype=torch.float32)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "up_proj"])).train()
    input_ids, mask, kwargs = family_batch(family)
    assert call_unsupported(model, input_ids, K, **kwargs) is None
    stub = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext))
    logps, entropies, _ = trl_completion_logps(stub, model, input_ids, mask, K, batch_size=3, compute_entropy=True,
                                               **kwargs)
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=3, fused_lm_head=True)
    logp, entropy, rel, used = compare(model, shared, (logps, entropies))
    print(f"{family.name} fused head + LoRA: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e}"
          f" ({used})")
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


def test_gemma3_with_its_sliding_window_and_two_way_image_attention_matches_the_per_row_forward(tmp_path):
    """Gemma 3: a window of 8 tokens in its sliding layer (prompts of about 47), image tokens attending to each other
    both ways by token_type_ids, which the prefix pass gets with the prompt; the per-row pass is text, causal within
    the window, read by the model's own masks over the prompt's cache."""
    model, processor = load_model(hf_fixtures.build_tiny_gemma3_showing_masks(tmp_path / "gemma3", sliding_window=8),
                                  dtype=torch.float32)
    model.train()
    input_ids, mask, kwargs = tiny_batch(processor, records())
    assert kwargs["token_type_ids"][:, :-K].any() and call_unsupported(model, input_ids, K, **kwargs) is None
    reference = direct(model, input_ids, mask, kwargs, 0.7)
    shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=3, temperature=0.7)
    logp, entropy, rel, used = compare(model, shared, reference)
    print(f"gemma3: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e} ({used} tensors)")
    assert logp < TOL and entropy < TOL and rel < TOL
    # the test can tell: both masks change these numbers (measured 7.3e-3 without the two-way image attention,
    # 0.2 with a window of 16 instead of 8)
    with torch.no_grad():
        causal_images = direct(model, input_ids, mask, {k: v for k, v in kwargs.items() if k != "token_type_ids"}, 0.7)
        model.config.text_config.sliding_window = 16
        wider = direct(model, input_ids, mask, kwargs, 0.7)
    assert (causal_images[0] - reference[0]).abs().max() > 1e-3 and (wider[0] - reference[0]).abs().max() > 1e-2


# ---- what falls back --------------------------------------------------------------------------------
def test_unsupported_models_and_calls_say_why(tmp_path, tiny):
    from transformers import MistralConfig, MistralForCausalLM

    model, processor = tiny
    input_ids, _, kwargs = tiny_batch(processor, records())
    mistral = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    assert "allow-list" in architecture_unsupported(mistral)
    gemma, _ = load_model(hf_fixtures.build_tiny_gemma3(tmp_path / "gemma3"), dtype=torch.float32)
    assert architecture_unsupported(gemma) is None
    gemma.config.text_config.final_logit_softcapping = 30.0
    assert "softcapping" in architecture_unsupported(gemma)
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


@QWEN
def test_qwen_vl_calls_the_model_would_not_position_by_get_rope_index_fall_back(family):
    model = family.model
    input_ids, _, kwargs = family_batch(family)
    assert architecture_unsupported(model) is None
    no_types = {k: v for k, v in kwargs.items() if k != "mm_token_type_ids"}
    assert "without mm_token_type_ids" in call_unsupported(model, input_ids, K, **no_types)
    vision_in_completion = dict(kwargs, mm_token_type_ids=kwargs["mm_token_type_ids"].clone())
    vision_in_completion["mm_token_type_ids"][0, -2] = 1
    assert "per-row part" in call_unsupported(model, input_ids, K, **vision_in_completion)
    short_grid = dict(kwargs, image_grid_thw=kwargs["image_grid_thw"][1:])
    assert "per image" in call_unsupported(model, input_ids, K, **short_grid)


def test_non_reentrant_gradient_checkpointing_keeps_the_prompt_cache_and_its_gradients(family):
    """TRL's default checkpointing: transformers would drop the cache in checkpointed layers; the shared
    path's caches survive the backward replay, so log-probs and gradients still match."""
    model = family.model
    input_ids, mask, kwargs = family_batch(family)
    enable_activation_checkpointing(model)  # {"use_reentrant": False}
    try:
        assert call_unsupported(model, input_ids, K, **kwargs) is None
        shared = grouped_completion_logps(model, input_ids, mask, K, kwargs, True, batch_size=4, temperature=0.7)
        logp, entropy, rel, used = compare(model, shared, direct(model, input_ids, mask, kwargs, 0.7))
    finally:
        disable_activation_checkpointing(model)
    assert not any(hasattr(m, "_can_checkpoint_with_cache") and "_can_checkpoint_with_cache" in vars(m)
                   for m in model.modules())  # the switch is put back
    print(f"{family.name} checkpointed: max |dlogp| {logp:.2e}, max |dH| {entropy:.2e}, max rel grad {rel:.2e}"
          f" ({used})")
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


# Qwen3-VL and Gemma 3 under LoRA: their tiny checkpoints lack the think tags that loading adds, so full
# fine-tuning's reference model (TRL loads it from the checkpoint) could not score the rollouts; LoRA's is the model
# without its adapter
@pytest.mark.parametrize("name,lora,checkpointing", [("llava", False, False), ("llava", True, False),
                                                     ("llava", False, True), ("qwen3_vl", True, False),
                                                     ("gemma3", True, False)],
                         ids=["full", "lora", "checkpointing", "qwen3_vl-lora", "gemma3-lora"])
def test_a_bpo_step_is_the_same_with_the_shared_forward_on_and_off(tmp_path, checkpoints, trained_families_file, name,
                                                                    lora, checkpointing, caplog):
    """One step (beta > 0: reference log-probs, from the adapter-less model under LoRA; num_iterations 2: old
    log-probs; TRL shuffles the rollouts; TRL's default gradient checkpointing or none) with the shared forward
    and without: same loss, same weights."""
    from trl import ModelConfig

    model_args = ModelConfig(use_peft=True, lora_r=4, lora_dropout=0.0) if lora else None
    runs = {}
    caplog.set_level(logging.INFO, logger="bimode.train.bpo.trainer")
    for shared in (True, False):
        caplog.clear()
        torch.manual_seed(0)  # the think tags' rows loading adds to a checkpoint without them: the same in both runs
        trainer = make_trainer(checkpoints(name), trained_families_file, tmp_path / str(shared), model_args,
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


@QWEN
def test_a_qwen_vl_trainer_batch_takes_the_shared_path_with_trls_numbers(tmp_path, family, trained_families_file,
                                                                         caplog):
    """TRL's own batch for a Qwen-VL model (its processor's pixel_values, image_grid_thw, mm_token_type_ids, rows
    as TRL's sampler lays them out): the trainer's forward shares the prompts and gives TRL's log-probs,
    entropies and gradients."""
    caplog.set_level(logging.INFO, logger="bimode.train.bpo.trainer")
    trainer = make_trainer(family.dir, trained_families_file, tmp_path / "run", max_completion_length=4)
    trainer.model.train()
    inputs, _ = trainer.generate_and_score(ROWS)
    args = (trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))
    kwargs = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
    assert all(v is not None for v in kwargs.values())
    caplog.clear()
    ours = completion_logps(trainer, *args, compute_entropy=True, **kwargs)
    assert forward_paths(caplog) == {"shared-prefix forward"}
    theirs = trl_completion_logps(trainer, *args, compute_entropy=True, **kwargs)
    logp, entropy, rel, used = compare(trainer.model, ours[:2], theirs[:2])
    assert logp < TOL and entropy < TOL and rel < TOL and used > 0
