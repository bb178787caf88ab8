"""Bi-mode annealing on TRL: loss masks, per-component learning rates and freezing, exact resume."""

from pathlib import Path

import pytest
import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.errors import UsageError
from bimode.modes import format_target
from bimode.train.anneal import AnnealConfig, build_trainer, expand_targets
from bimode.train.components import component_of
from bimode.train.tokenization import IGNORE_INDEX, response_text, tokenize_example
from tests.helpers.hf_fixtures import saved_vision_keys

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)


@pytest.mark.parametrize("mode, mask", [("think", False), ("no_think", False), ("no_think", True), ("think", True)])
def test_loss_mask_positions_are_exact(tiny_processor, mode, mask):
    record = synthetic.generate(1, families=["shell"], levels=[2])[0].to_record()
    ex = tokenize_example(tiny_processor, record, mode, mask_empty_think=mask)
    tok = tiny_processor.tokenizer
    response = tok.encode(response_text(record, mode), add_special_tokens=False)
    # the response is the last tokens before the final newline; nothing before it carries loss
    start = len(ex.input_ids) - len(response) - 1
    assert ex.input_ids[start:start + len(response)] == response
    assert all(label == IGNORE_INDEX for label in ex.labels[:start]) and ex.labels[-1] == IGNORE_INDEX
    expected = list(response)
    if mode == "no_think" and mask:  # <think> \n\n </think> \n\n: in the sequence, out of the loss
        assert tok.decode(response[:4]) == "<think>\n\n</think>\n\n"
        expected[:4] = [IGNORE_INDEX] * 4
    assert ex.labels[start:start + len(response)] == expected
    assert tok.decode(response).startswith(format_target(record.answer, record.reasoning if mode == "think" else None))
    assert tok.decode(response).endswith("<|im_end|>")


def test_component_names_across_families():
    assert component_of("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert component_of("model.multi_modal_projector.linear_1.weight") == "projector"
    assert component_of("model.language_model.layers.0.self_attn.q_proj.weight") == "llm"
    assert component_of("lm_head.weight") == "llm"
    assert component_of("model.visual.merger.mlp.0.weight") == "projector"  # Qwen-VL
    assert component_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert component_of("model.visual.deepstack_merger_list.0.linear_fc1.weight") == "projector"  # Qwen3-VL


def test_expand_targets():
    recs = [r.to_record() for r in synthetic.generate(3, families=["shell"])]
    recs[0].mode, recs[1].mode, recs[2].reasoning = "no_think", "think", None
    assert [m for _, m in expand_targets(recs, "labelled")] == ["no_think", "think", "no_think"]
    assert [m for _, m in expand_targets(recs, "both")] == ["think", "no_think", "think", "no_think", "no_think"]
    with pytest.raises(ValueError, match="target_modes"):
        expand_targets(recs, "sometimes")


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(64, seed=3, families=["count", "shell"], max_level=2)],
                  path)
    return path


def _cfg(tmp_path, train_file, tiny_dir, **kw):
    base = dict(model_path=str(tiny_dir), train_files=[str(train_file)], output_dir=str(tmp_path / "out"),
                max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], logging_steps=1,
                save_strategy="no", seed=0, use_cpu=True, lr_scheduler_type="constant", target_modes="both",
                dataloader_num_workers=0, gradient_checkpointing=False)  # TRL's default only recomputes here
    base.update(kw)
    return AnnealConfig(**base)


def test_component_learning_rates_and_freezing(tmp_path, train_file, tiny_dir):
    cfg = _cfg(tmp_path, train_file, tiny_dir, vision_lr=1e-4, projector_lr=2e-3, llm_lr=5e-4, freeze_vision=True)
    trainer = build_trainer(cfg)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    lrs = {}
    for group in optimizer.param_groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        (component,) = {component_of(n) for n in names}
        lrs.setdefault(component, set()).add(group["lr"])
    assert lrs == {"projector": {2e-3}, "llm": {5e-4}}  # vision frozen: not in the optimizer
    trainer.train()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (component_of(name) != "vision"), name


def _one_step_updates(tmp_path, train_file, tiny_dir, optim: str, weight_decay: float):
    """(optimizer, {name: (weight before, gradient the step used, weight after)}) of one training step."""
    cfg = _cfg(tmp_path / optim, train_file, tiny_dir, optim=optim, max_steps=1, weight_decay=weight_decay,
               max_grad_norm=0.0, llm_lr=1e-3, projector_lr=3e-3, vision_lr=2e-3)  # no clipping: g as computed
    trainer = build_trainer(cfg)
    optimizer = trainer.create_optimizer()
    params = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {}
    optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}))
    trainer.train()
    return optimizer, {n: (before[n], g, params[n].detach()) for n, g in grads.items()}


def test_optim_picks_the_optimizer_of_the_component_groups(tmp_path, train_file, tiny_dir):
    """`optim` reaches the per-component groups: SGD moves each weight by -lr * (g + decay * w) at its
    component's rate (biases and norms without decay), AdamW's first step by -lr * g / (|g| + eps)."""
    from bimode.train.components import decays

    lrs = {"llm": 1e-3, "projector": 3e-3, "vision": 2e-3}
    sgd, updates = _one_step_updates(tmp_path, train_file, tiny_dir, "sgd", weight_decay=0.5)
    assert type(sgd) is torch.optim.SGD and len(updates) > 10
    for name, (w, g, after) in updates.items():
        wd = 0.5 if decays(name, w) else 0.0
        torch.testing.assert_close(after, w - lrs[component_of(name)] * (g + wd * w), rtol=0, atol=1e-7, msg=name)
    adamw, updates = _one_step_updates(tmp_path, train_file, tiny_dir, "adamw_torch", weight_decay=0.0)
    assert type(adamw) is torch.optim.AdamW
    moved = 0
    for name, (w, g, after) in updates.items():
        expected = w - lrs[component_of(name)] * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.allclose(after - w, -lrs[component_of(name)] * g, atol=1e-7))
    assert moved  # the two updates differ: each optimizer did its own


@pytest.mark.parametrize("optim", ["lomo", "galore_adamw_layerwise", "apollo_adamw"])
def test_optim_that_picks_its_own_parameters_is_refused(tmp_path, optim):
    with pytest.raises(UsageError, match=f"optim {optim}: this optimizer picks its own parameters"):
        AnnealConfig(output_dir=str(tmp_path), use_cpu=True, optim=optim)


@pytest.mark.parametrize("name, value", [("dataset_num_proc", 4), ("eos_token", "<|im_end|>"), ("pad_to_multiple_of", 8),
                                         ("truncation_mode", "keep_end"), ("completion_only_loss", False),
                                         ("model_init_kwargs", {"dtype": "bfloat16"})])
def test_sft_fields_bimode_does_not_read_are_refused(tmp_path, name, value):
    """TRL's SFT data fields that bimode's own tokenization bypasses fail naming the field, not train without."""
    with pytest.raises(UsageError, match=f"{name} .*bimode anneal does not read it"):
        AnnealConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value})
    assert AnnealConfig(output_dir=str(tmp_path), use_cpu=True, completion_only_loss=True).completion_only_loss


def test_batches_grouped_by_length_get_estimated_lengths(tmp_path, train_file, tiny_dir):
    """train_sampling_strategy group_by_length: the dataset carries each (record, mode)'s estimated length
    (images not opened), within a token or two of the real one, so transformers' sampler groups by it."""
    from bimode.train.tokenization import tokenize_example

    trainer = build_trainer(_cfg(tmp_path, train_file, tiny_dir, train_sampling_strategy="group_by_length"))
    collator = trainer.data_collator
    lengths = trainer.train_dataset["length"]
    real = [len(tokenize_example(collator.processor, *collator.pairs[i]).input_ids) for i in range(len(lengths))]
    assert len(set(real)) > 3 and max(abs(a - b) for a, b in zip(lengths, real)) <= 2
    shuffled = build_trainer(_cfg(tmp_path, train_file, tiny_dir))
    assert "length" not in shuffled.train_dataset.column_names
    # the sampler groups by it: the batches the trainer draws hold sequences of closer lengths than shuffled ones
    assert _length_spread(trainer) < _length_spread(shuffled) / 2


def _length_spread(trainer) -> int:
    """The longest minus the shortest sequence of each batch of the trainer's dataloader, summed over batches."""
    spread = 0
    for batch in trainer.get_train_dataloader():
        lengths = batch["attention_mask"].sum(1)
        spread += int(lengths.max() - lengths.min())
    return spread


@pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"])
def test_anneal_trains_a_qwen_vl_model_with_its_image_grid(tmp_path, train_file, family):
    """Qwen-VL needs image_grid_thw next to pixel_values (the collator passes every image-processor output),
    Qwen3-VL also the per-token mm_token_type_ids; the mergers are the projector, frozen here, while the
    vision tower and the LLM train. The run saves where `bimode anneal` does and loads back as trained (without
    torchvision too: the processor is then built without its video part, and saves all the same)."""
    from bimode.train.run import train_and_save
    from tests.helpers import hf_fixtures
    from tests.helpers.checkpoints import assert_reloads

    model_dir = getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family)
    trainer = build_trainer(_cfg(tmp_path, train_file, model_dir, max_steps=2, freeze_projector=True,
                                 gradient_checkpointing=False))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["image_grid_thw"].shape == (2, 3)
    if family == "qwen3_vl":  # 1 on image tokens, 0 on text and padding
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
        image_token = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_token)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final = train_and_save(trainer)
    changed = {component_of(n) for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {"vision", "llm"}
    assert_reloads(trainer, final)


def test_resume_gives_the_same_weights(tmp_path, train_file, tiny_dir):
    straight = build_trainer(_cfg(tmp_path / "a", train_file, tiny_dir, max_steps=6))
    straight.train()
    first = build_trainer(_cfg(tmp_path / "b", train_file, tiny_dir, max_steps=6, save_strategy="steps",
                               save_steps=3))
    first.train()  # runs all 6; the step-3 checkpoint is what an interrupted run would have left
    resumed = build_trainer(_cfg(tmp_path / "b", train_file, tiny_dir, max_steps=6, save_strategy="steps",
                                 save_steps=3))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_cli_recipe_with_overrides_trains_and_saves(tmp_path, train_file, tiny_dir):
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "bimode.cli", "anneal", "--config", "configs/recipes/tiny_anneal.yaml",
                    "--model_path", str(tiny_dir), "--train_files", str(train_file), "--output_dir", str(out),
                    "--max_steps", "3", "--per_device_train_batch_size", "4", "--report_to", "none",
                    "--save_strategy", "no"], check=True, capture_output=True, text=True,
                   cwd=Path(__file__).resolve().parents[2])
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    assert (out / "final" / "chat_template.jinja").exists()
    keys = saved_vision_keys(out / "final")  # the layout vLLM reads, through TRL's save
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys)


@pytest.mark.slow
def test_anneal_raises_held_out_accuracy(tmp_path, tiny_dir):
    from tests.helpers.reference_generation import generate

    train = tmp_path / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(800, seed=5, families=["count", "shell"], max_level=2)],
                  train)
    held_out = [s.to_record() for s in synthetic.generate(48, seed=5, split="eval", families=["count", "shell"],
                                                          max_level=2)]
    trainer = build_trainer(_cfg(tmp_path, train, tiny_dir, max_steps=120, per_device_train_batch_size=32,
                                 learning_rate=3e-3, adam_beta2=0.98, warmup_steps=0.05, target_modes="think",
                                 lr_scheduler_type="cosine"))
    processor = trainer.processing_class

    def accuracy():
        gens = generate(trainer.model.eval(), processor, held_out, mode="think", max_new_tokens=24)
        return sum(g.parsed.answer == r.answer for g, r in zip(gens, held_out)) / len(held_out)

    before = accuracy()
    trainer.train()
    after = accuracy()
    assert after > before + 0.2, (before, after)


def test_returns_within_reports_a_teardown_that_never_returns():
    import threading

    from bimode.train.processes import returns_within

    assert returns_within(lambda: None, 5.0)
    release = threading.Event()
    assert not returns_within(release.wait, 0.05)  # a hung teardown is abandoned, not waited for
    release.set()

    def fails():
        raise RuntimeError("teardown failed")

    with pytest.raises(RuntimeError, match="teardown failed"):
        returns_within(fails, 5.0)


def test_tensorboard_logging_by_default(tmp_path):
    assert AnnealConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).report_to == ["tensorboard"]


def test_cpu_training_is_fp32_unless_bf16_is_asked_for(tmp_path):
    """TRL turns bf16 on when unset: on a CPU without bf16 instructions that is emulated and many times slower."""
    from bimode.train.bpo.trainer import BPOConfig

    for config in (AnnealConfig, BPOConfig):
        assert config(output_dir=str(tmp_path), use_cpu=True).bf16 is False
        assert config(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True
