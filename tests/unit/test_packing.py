"""Packed annealing (`pack_rows`): packs planned by length, one padding-free sequence per batch whose loss and
gradients are the padded batch's, with images and both modes' loss masks; models with other positions fall back."""

import logging
import random

import pytest
import torch

from bimode.errors import UsageError
from bimode.train.anneal import build_trainer
from bimode.train.packing import plan_packs
from bimode.train.tokenization import IGNORE_INDEX
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


@pytest.mark.parametrize("family", ["tiny", "llava_llama_style", "llava_next"])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(tmp_path, train_file, tiny_dir, family):  # noqa: F811
    from tests.helpers import hf_fixtures

    model_dir = tiny_dir if family == "tiny" else getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family)
    trainer = build_trainer(_cfg(tmp_path, train_file, model_dir, pack_rows=True, max_length=900,
                                 nonthinking_loss_mask=True))
    collator = trainer.data_collator
    both = [p for p in trainer.train_dataset["pack"] if len(p) >= 3 and
            {collator.pairs[i][1] for i in p} == {"think", "no_think"}]
    pack = min(both, key=len)  # rows of both modes, with and without the masked empty think block
    packed = collator([{"pack": pack}])
    padded = collator([{"row": i} for i in pack])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == padded["attention_mask"].sum() < padded["input_ids"].numel()
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert (packed["position_ids"][0] == 0).sum() == len(pack)  # positions restart per row
    packed_loss, packed_grads = _loss_and_grads(trainer, packed)
    padded_loss, padded_grads = _loss_and_grads(trainer, padded)
    assert packed_loss == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert any("vision" in n for n in packed_grads) and any("projector" in n for n in packed_grads)
    for name, grad in padded_grads.items():  # fp32: the same sums in another order
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item() + 1e-9,
                                   msg=name)


def test_packed_annealing_trains_and_multi_axis_positions_fall_back(tmp_path, train_file, tiny_dir, caplog):  # noqa: F811
    from tests.helpers import hf_fixtures

    trainer = build_trainer(_cfg(tmp_path, train_file, tiny_dir, pack_rows=True, max_length=1200,
                                 per_device_train_batch_size=2, max_steps=2))
    assert "pack" in trainer.train_dataset.column_names
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p.detach())]
    # LLaVA reads the tower's last hidden state: its post-layernorm and pooling head get no gradient, padded or not
    assert all(n.startswith(("model.vision_tower.post_layernorm", "model.vision_tower.head")) for n in unchanged)
    logged = trainer.state.log_history[0]
    assert logged["num_tokens"] > 0 and 0 < logged["loss"] < 20
    qwen = hf_fixtures.build_tiny_qwen25_vl(tmp_path / "qwen25_vl")
    with caplog.at_level(logging.WARNING, logger="bimode.train.anneal"):
        fallback = build_trainer(_cfg(tmp_path, train_file, qwen, pack_rows=True, max_length=1200))
    assert "row" in fallback.train_dataset.column_names
    assert "trains padded: model type 'qwen2_5_vl' is not on the packed annealing allow-list" in caplog.text


def test_packing_settings_are_checked(tmp_path, train_file, tiny_dir):  # noqa: F811
    with pytest.raises(UsageError, match="set pack_rows: true"):
        _cfg(tmp_path, train_file, tiny_dir, packing=True)
    with pytest.raises(UsageError, match="set max_length"):
        _cfg(tmp_path, train_file, tiny_dir, pack_rows=True, max_length=None)
    with pytest.raises(UsageError, match="use one or the other"):
        _cfg(tmp_path, train_file, tiny_dir, pack_rows=True, train_sampling_strategy="group_by_length")


@pytest.mark.parametrize("family", ["tiny", "llava_next", "qwen25_vl"])
def test_estimated_lengths_count_each_images_tokens(tmp_path, train_file, tiny_dir, family):  # noqa: F811
    """Packs are planned on estimated lengths (no image decoded): within two tokens of the real ones, also where
    the image tokens depend on the image's size (LLaVA-NeXT's tiles, Qwen-VL's grid)."""
    from PIL import Image

    from bimode.data.records import read_records
    from bimode.models import load_model
    from bimode.train.anneal import expand_targets
    from bimode.train.tokenization import ImageTokens, estimated_lengths, tokenize_example
    from tests.helpers import hf_fixtures

    model_dir = tiny_dir if family == "tiny" else getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family)
    _, processor = load_model(model_dir, dtype=torch.float32)  # with the think tags, as annealing has it
    records = read_records(str(train_file))[:12]
    for r, size in zip(records, [(32, 32), (64, 32), (32, 64), (48, 96)] * 3):
        path = tmp_path / f"{r.id}.png"
        Image.new("RGB", size, (r.level or 0) * 40).save(path)
        r.images = [str(path)]
    pairs = expand_targets(records, "both")
    real = [len(tokenize_example(processor, r, mode).input_ids) for r, mode in pairs]
    assert max(abs(a - b) for a, b in zip(estimated_lengths(processor, pairs), real)) <= 2
    assert (ImageTokens(processor).fixed is None) == (family != "tiny")  # fixed count: no image opened

