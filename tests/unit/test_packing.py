"""Packed annealing (`pack_rows`): packs planned by length, one padding-free sequence per batch whose loss and
gradients are the padded batch's, with images and both modes' loss masks, for 1-D and multi-axis (Qwen-VL)
positions; Gemma 3 trains padded, what packing it would get wrong measured."""

import logging
import random

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.errors import UsageError
from bimode.train.anneal import build_trainer
from bimode.train.packing import plan_packs
from bimode.train.tokenization import IGNORE_INDEX
from tests.helpers import hf_fixtures
from tests.unit.test_anneal import _cfg, train_file  # noqa: F401  (fixture)

pytestmark = pytest.mark.internals  # transformers' packed-sequence masks: both ends of the range


def test_packs_hold_every_row_once_within_the_length():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(10, 200), rng.randint(10, 200), rng.randint(500, 4000)]) for _ in range(3000)]
    lengths += [9000]  # longer than a pack: alone, whole
    packs = plan_packs(lengths, 4096)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert [len(lengths) - 1] in packs
    assert all(sum(lengths[i] for i in p) <= 4096 for p in packs if p != [len(lengths) - 1])
    # best fit leaves little room: within 1% of the fewest packs the tokens allow
    assert len(packs) <= 1.01 * (sum(lengths) - 9000) / 4096 + 2
    assert plan_packs(lengths, 4096) == packs  # deterministic
    with pytest.raises(ValueError, match="max_length must be positive"):
        plan_packs([3], 0)


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """64 records: some text-only, some with two images, the rest one, of sizes giving Qwen-VL 1 to 4 image
    tokens each (random pixels, so every image's features differ)."""
    from PIL import Image

    records = [s.to_record() for s in synthetic.generate(64, seed=3, families=["count", "shell"], max_level=2)]
    rng = random.Random(0)
    shapes = [[(64, 64)], [], [(64, 32)], [(32, 64), (64, 64)], [(32, 32)], []]
    for i, r in enumerate(records):
        r.question = r.question.replace("<image>", "")  # images without a marker go first
        r.images = [Image.frombytes("RGB", size, rng.randbytes(3 * size[0] * size[1]))
                    for size in shapes[i % len(shapes)]]
    path = tmp_path_factory.mktemp("mixed") / "train.jsonl"
    write_records(records, path)
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tiny_dir):
    """family -> its tiny checkpoint, each built once per module."""
    built = {"tiny": tiny_dir}

    def get(family):
        if family not in built:
            built[family] = getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path_factory.mktemp(family) / "model")
        return built[family]
    return get


def _mixed_pack(collator) -> list[int]:
    """Six rows: of each mode (think, and no_think with its empty think block masked), one with no image, one
    with one and one with two."""
    def kind(i):
        record, mode = collator.pairs[i]
        return mode, len(record.images)
    wanted = [(mode, n) for n in (0, 1, 2) for mode in ("think", "no_think")]
    return [next(i for i in range(len(collator.pairs)) if kind(i) == w) for w in wanted]


@pytest.mark.parametrize("family", ["tiny", "llava_llama_style", "llava_next", "qwen25_vl", "qwen3_vl"])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(tmp_path, mixed_file, family_dir, family):
    from bimode.compat.transformers_api import attention_implementation
    from bimode.models.positions import multi_axis_positions, rope_positions
    from bimode.train.components import COMPONENTS, component_of

    trainer = build_trainer(_cfg(tmp_path, mixed_file, family_dir(family), pack_rows=True, max_length=900,
                                 nonthinking_loss_mask=True))
    assert attention_implementation(trainer.model.config.get_text_config()) == "bimode_varlen_sdpa"  # CPU: row by row
    assert "pack" in trainer.train_dataset.column_names
    collator = trainer.data_collator
    pack = _mixed_pack(collator)
    packed = collator([{"pack": pack}])
    padded = collator([{"row": i} for i in pack])
    real = padded["attention_mask"].bool()
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == real.sum() < padded["input_ids"].numel()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][real])
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    text_positions = packed["position_ids"][0].reshape(-1)
    assert (text_positions == 0).sum() == len(pack)  # positions restart per row
    if multi_axis_positions(trainer.model):
        # (4, 1, T): text positions over the three rotary axes, each row's as the model gives the padded batch
        assert packed["position_ids"].shape == (4, 1, real.sum())
        assert torch.equal(packed["mm_token_type_ids"][0], padded["mm_token_type_ids"][real])
        assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
        own = rope_positions(trainer.model, padded["input_ids"], padded["attention_mask"],
                             padded["mm_token_type_ids"], padded["image_grid_thw"])
        assert torch.equal(packed["position_ids"][1:, 0], own[:, real])
        assert not torch.equal(packed["position_ids"][1], text_positions)  # image tokens off the text positions
    packed_loss, packed_grads = _loss_and_grads(trainer, packed)
    padded_loss, padded_grads = _loss_and_grads(trainer, padded)
    assert packed_loss == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert {component_of(n) for n in packed_grads} == set(COMPONENTS)
    for name, grad in padded_grads.items():  # fp32: the same sums in another order; attention key biases get
        # zero but for rounding (about 1e-9: softmax ignores a shift), hence the floor
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item() + 1e-8,
                                   msg=name)


@pytest.mark.parametrize("family", ["tiny", "qwen3_vl"])
def test_packed_annealing_trains(tmp_path, mixed_file, family_dir, family):
    trainer = build_trainer(_cfg(tmp_path, mixed_file, family_dir(family), pack_rows=True, max_length=1200,
                                 per_device_train_batch_size=2, max_steps=2))
    assert "pack" in trainer.train_dataset.column_names
    first = next(iter(trainer.get_train_dataloader()))  # the sampler is seeded: the batch step 1 trains on
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p.detach())]
    # LLaVA reads the tower's last hidden state: its post-layernorm and pooling head get no gradient, padded or not
    assert all(n.startswith(("model.vision_tower.post_layernorm", "model.vision_tower.head")) for n in unchanged)
    logged = trainer.state.log_history[0]
    # every packed token counted (TRL alone counts Qwen-VL's (4, 1, T) positions as 1 token)
    assert logged["num_tokens"] == first["input_ids"].numel() and 0 < logged["loss"] < 20


def test_gemma3_trains_padded_because_packing_it_measures_wrong(tmp_path, mixed_file, caplog):
    """Packing Gemma 3 as LLaVA packs (positions restarting per row, no mask) loses what its attention adds to
    causal within a row: its image tokens attend to each other both ways (token_type_ids) and its sliding layers
    see a window. bimode's row-by-row attention drops both; transformers' own mask for a pack keeps them in 5.17
    but in 5.25 looks each row's image tokens up at the first row's places in the sliding layers. So it trains
    padded, saying so."""
    import transformers
    from packaging.version import Version

    from bimode.compat.varlen_attention import register
    from bimode.train.packing import MEASURED_REFUSALS, collate_packed
    from bimode.train.tokenization import tokenize_example

    gemma3 = hf_fixtures.build_tiny_gemma3_showing_masks(tmp_path / "gemma3")
    with caplog.at_level(logging.WARNING, logger="bimode.train.anneal"):
        trainer = build_trainer(_cfg(tmp_path, mixed_file, gemma3, pack_rows=True, max_length=900,
                                     nonthinking_loss_mask=True))
    assert "row" in trainer.train_dataset.column_names
    assert f"trains padded: {MEASURED_REFUSALS['gemma3']}" in caplog.text
    collator = trainer.data_collator
    pack = _mixed_pack(collator)
    examples = [tokenize_example(collator.processor, *collator.pairs[i], collator.mask) for i in pack]
    packed = collate_packed(examples, collator.processor)  # as LLaVA's rows are packed
    padded_loss, padded_grads = _loss_and_grads(trainer, collator([{"row": i} for i in pack]))

    def off(attention):
        trainer.model.set_attn_implementation({"text_config": attention})
        loss, grads = _loss_and_grads(trainer, packed)
        wrong = [n for n, g in padded_grads.items()
                 if not torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-8)]
        return abs(loss.item() / padded_loss.item() - 1), len(wrong) / len(padded_grads)

    loss_off, grads_off = off(register())  # measured: 8.5e-4 and 50 of 51 tensors off (5.17 and 5.25)
    assert loss_off > 2e-4 and grads_off > 0.9
    loss_off, grads_off = off("sdpa")  # measured: 2.2e-4 and 50 of 51 on 5.25; 0 and none on 5.17
    if Version(transformers.__version__) >= Version("5.25"):
        assert loss_off > 1e-5 and grads_off > 0.9
    else:
        assert loss_off < 1e-6 and grads_off == 0


def test_packing_settings_are_checked(tmp_path, train_file, tiny_dir):  # noqa: F811
    with pytest.raises(UsageError, match="set pack_rows: true"):
        _cfg(tmp_path, train_file, tiny_dir, packing=True)
    with pytest.raises(UsageError, match="set max_length"):
        _cfg(tmp_path, train_file, tiny_dir, pack_rows=True, max_length=None)
    with pytest.raises(UsageError, match="use one or the other"):
        _cfg(tmp_path, train_file, tiny_dir, pack_rows=True, train_sampling_strategy="group_by_length")


@pytest.mark.parametrize("family", ["tiny", "llava_next", "qwen25_vl"])
def test_estimated_lengths_count_each_images_tokens(tmp_path, train_file, family_dir, family):  # noqa: F811
    """Packs are planned on estimated lengths (no image decoded): within two tokens of the real ones, also where
    the image tokens depend on the image's size (LLaVA-NeXT's tiles, Qwen-VL's grid)."""
    from PIL import Image

    from bimode.data.records import read_records
    from bimode.models import load_model
    from bimode.train.anneal import expand_targets
    from bimode.train.tokenization import ImageTokens, estimated_lengths, tokenize_example

    _, processor = load_model(family_dir(family), dtype=torch.float32)  # with the think tags, as annealing has it
    records = read_records(str(train_file))[:12]
    for r, size in zip(records, [(32, 32), (64, 32), (32, 64), (48, 96)] * 3):
        path = tmp_path / f"{r.id}.png"
        Image.new("RGB", size, (r.level or 0) * 40).save(path)
        r.images = [str(path)]
    pairs = expand_targets(records, "both")
    real = [len(tokenize_example(processor, r, mode).input_ids) for r, mode in pairs]
    assert max(abs(a - b) for a, b in zip(estimated_lengths(processor, pairs), real)) <= 2
    assert (ImageTokens(processor).fixed is None) == (family != "tiny")  # fixed count: no image opened

