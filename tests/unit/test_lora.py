"""LoRA (PEFT) in annealing and BPO: TRL's flags, per-component targets, trainable mode-token rows, the base as
KL reference, adapter folders in every inference command, and `bimode export --merge`."""

import json

import httpx
import pytest
import torch
from PIL import Image
from trl import ModelConfig

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from bimode.train.adapters import AdapterFields, build_peft_config, check_quantization, mode_token_ids
from bimode.train.components import component_of
from tests.helpers.bpo_helpers import trained_p_think_drop
from tests.helpers.servers import serve_in_thread
from tests.helpers.hf_fixtures import (
    build_tiny_llava_llama_style,
    build_tiny_qwen3_vl,
    build_tiny_qwen25_vl,
    saved_vision_keys,
)

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

LORA = dict(use_peft=True, lora_r=4, lora_dropout=0.0)
# what LoRA may change: adapters, the projector's trained copy, the mode-token rows
ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".modules_to_save.", ".trainable_tokens_delta.")
USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}]


@pytest.fixture(scope="module")
def train_file(trained_families_file):
    return trained_families_file


def anneal_config(model_dir, train_file, out, **overrides):
    from bimode.train.anneal import AnnealConfig

    args = dict(model_path=str(model_dir), train_files=[str(train_file)], output_dir=str(out), target_modes="both",
                max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], save_strategy="no",
                use_cpu=True, bf16=False, gradient_checkpointing=False, lr_scheduler_type="constant", seed=0)
    return AnnealConfig(**{**args, **overrides})


def bpo_config(model_dir, train_file, out, **overrides):
    from bimode.train.bpo.trainer import BPOConfig

    args = dict(model_path=str(model_dir), train_files=[str(train_file)], output_dir=str(out), num_generations=4,
                per_device_train_batch_size=8, max_completion_length=6, max_steps=1, learning_rate=1e-2,
                report_to=[], save_strategy="no", use_cpu=True, bf16=False, probe_steps=0, seed=0, logging_steps=1,
                gradient_checkpointing=False, rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    return BPOConfig(**{**args, **overrides})


def train_and_diff(trainer) -> list[str]:
    """Train; the names of the parameters whose values changed."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]


def assert_only_adapters_changed(changed: list[str], expect_rows_in: tuple[str, ...] = ("embed_tokens",)):
    assert changed and all(any(part in n for part in ADAPTER_PARTS) for n in changed), changed
    assert any(".lora_B." in n for n in changed)  # B starts at zero, so it moves on the first step
    assert any(".modules_to_save." in n and component_of(n) == "projector" for n in changed)
    for module in expect_rows_in:
        assert any(f"{module}.token_adapter.trainable_tokens_delta" in n for n in changed), (module, changed)


def greedy(model, processor, max_new_tokens=8):
    prompts = [Prompt(USER, images=[Image.new("RGB", (32, 32), c)], modes=["auto", "think", "no_think"])
               for c in ("red", "blue")]
    out = TransformersEngine(model, processor).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return [[c.token_ids for c in group] for group in out]


# ---- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["anneal", "bpo"])
def test_help_lists_trls_peft_flags_and_the_component_settings(command, capsys):
    from bimode.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--use_peft", "--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules",
                 "--lora_modules_to_save", "--lora_task_type", "--load_in_4bit", "--use_bnb_nested_quant",
                 "--lora_components", "--lora_train_projector", "--lora_mode_tokens"):
        assert flag in text, flag


def test_lora_targets_follow_the_components(tiny_dir):
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    tokenizer = processor.tokenizer
    default = build_peft_config(ModelConfig(**LORA), model, tokenizer, AdapterFields())
    assert default.target_modules and {component_of(n) for n in default.target_modules} == {"llm"}
    assert "lm_head" not in default.target_modules
    assert default.modules_to_save == ["model.multi_modal_projector"]
    ids = mode_token_ids(tokenizer)
    assert set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"])) <= set(ids)
    assert default.trainable_token_indices == {"model.language_model.embed_tokens": ids}  # tied head follows
    both = build_peft_config(ModelConfig(**LORA), model, tokenizer, AdapterFields(lora_components=["llm", "vision"]))
    assert {component_of(n) for n in both.target_modules} == {"llm", "vision"}
    # nn.MultiheadAttention reads out_proj.weight itself: an adapter there would never run
    assert not any(n.endswith("head.attention.out_proj") for n in both.target_modules)
    frozen = build_peft_config(ModelConfig(**LORA), model, tokenizer, AdapterFields(), frozen={"projector"})
    assert frozen.modules_to_save is None
    explicit = build_peft_config(ModelConfig(**LORA, lora_target_modules=["q_proj", "v_proj"]), model, tokenizer,
                                 AdapterFields())
    assert set(explicit.target_modules) == {"q_proj", "v_proj"}
    assert build_peft_config(ModelConfig(), model, tokenizer, AdapterFields()) is None
    with pytest.raises(ValueError, match="lora_components"):
        build_peft_config(ModelConfig(**LORA), model, tokenizer, AdapterFields(lora_components=["projector"]))


def test_rows_load_model_added_train_even_without_mode_tokens(tmp_path):
    """Added rows start random: frozen and unsaved, a reload of the base would give other values."""
    model, processor = load_model(build_tiny_llava_llama_style(tmp_path / "model"), dtype=torch.float32)
    added = processor.tokenizer.convert_tokens_to_ids(["<think>", "</think>", "\n\n"])
    config = build_peft_config(ModelConfig(**LORA), model, processor.tokenizer,
                               AdapterFields(lora_mode_tokens=False), frozen={"llm"})
    assert config.trainable_token_indices == {"model.language_model.embed_tokens": sorted(added)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_flags_are_refused_on_cpu_with_the_reason(tiny_dir, train_file, tmp_path):
    from bimode.train.anneal import build_trainer

    with pytest.raises(ValueError, match="load_in_4bit.*needs bitsandbytes on a CUDA GPU"):
        build_trainer(anneal_config(tiny_dir, train_file, tmp_path),
                      model_args=ModelConfig(**LORA, load_in_4bit=True, use_bnb_nested_quant=True))
    with pytest.raises(ValueError, match="add use_peft"):
        check_quantization(ModelConfig(load_in_4bit=True))


@pytest.mark.internals  # transformers' skip-pattern matching changed between 5.17 and 5.25
def test_qlora_leaves_the_projector_and_the_output_layer_unquantized():
    """The projector trains in full (PEFT refuses gradients on 4-bit weights: found running QLoRA with
    bitsandbytes' CPU backend) and the output layer keeps trainable mode-token rows."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from bimode.train.adapters import QUANTIZATION_SKIPS

    kept = ["model.multi_modal_projector.linear_1", "model.visual.merger.linear_fc1",
            "model.visual.deepstack_merger_list.0.linear_fc2", "model.mm_projector.0", "lm_head"]
    quantized = ["model.language_model.layers.0.self_attn.q_proj", "model.vision_tower.encoder.layers.0.mlp.fc1",
                 "model.visual.blocks.0.attn.qkv"]
    assert not any(should_convert_module(name, QUANTIZATION_SKIPS) for name in kept)
    assert all(should_convert_module(name, QUANTIZATION_SKIPS) for name in quantized)


# ---- training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, train_file, tmp_path_factory):
    """A LoRA annealing run on the tiny model: (trainer, changed parameter names, adapter folder)."""
    from bimode.train.anneal import build_trainer
    from bimode.train.run import train_and_save

    trainer = build_trainer(anneal_config(tiny_dir, train_file, tmp_path_factory.mktemp("lora_anneal"), llm_lr=5e-3),
                            model_args=ModelConfig(**LORA))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out = train_and_save(trainer)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    return trainer, changed, out


def test_lora_anneal_trains_only_adapters_projector_and_mode_rows(tiny_adapter, tiny_dir):
    trainer, changed, out = tiny_adapter
    assert_only_adapters_changed(changed)
    # the trained rows are exactly the mode tokens; the rest of the (tied) embedding is the base's
    embed = trainer.model.get_input_embeddings()
    ids = mode_token_ids(trainer.processing_class.tokenizer)
    assert embed.token_adapter.token_indices["default"] == ids
    # the per-component learning rates apply to the adapters: llm_lr to the LLM's, learning_rate to the projector
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {component_of(names[id(p)]): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs == {"llm": 5e-3, "projector": 1e-2}
    saved = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= saved
    assert "model.safetensors" not in saved
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir.resolve())


def test_adapter_folder_loads_and_the_merged_export_generates_the_same(tiny_adapter, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bimode.cli import main

    trainer, _, adapter = tiny_adapter
    model, processor = load_model(adapter, dtype=torch.float32)
    assert isinstance(model, PeftModel)
    expected = greedy(trainer.model, trainer.processing_class)
    assert greedy(model, processor) == expected
    # adapter off (BPO's KL reference): exactly the base, token rows and projector copy included
    base, _ = load_model(tiny_dir, dtype=torch.float32)
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt", text=[
        processor.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, thinking_mode="auto")])
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(adapter), "--out", str(out)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    merged_processor = AutoProcessor.from_pretrained(out)
    assert "thinking_mode" in merged_processor.chat_template
    assert merged_processor.tokenizer.convert_tokens_to_ids("<think>") == processor.tokenizer.convert_tokens_to_ids(
        "<think>")
    assert greedy(merged, merged_processor) == expected
    keys = saved_vision_keys(out)
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys)  # the ecosystem's layout
    assert main(["export", "--merge", str(out), "--out", str(tmp_path / "again")]) == 2  # not an adapter


def test_lora_resume_continues_exactly(tiny_dir, train_file, tmp_path):
    """A LoRA checkpoint holds the adapter only: resume loads it through Trainer's PEFT path."""
    from bimode.train.anneal import build_trainer

    def run(**kwargs):
        trainer = build_trainer(anneal_config(tiny_dir, train_file, tmp_path, save_strategy="steps", save_steps=1),
                                model_args=ModelConfig(**LORA))
        trainer.train(**kwargs)
        return dict(trainer.model.named_parameters())

    whole = run()
    resumed = run(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_an_adapter_start_trains_merged_and_lora_on_it_asks_for_a_merge_first(tiny_adapter, tiny_dir, train_file,
                                                                             tmp_path):
    from bimode.train.bpo.trainer import build_trainer

    from peft import PeftModel

    _, _, adapter = tiny_adapter
    with pytest.raises(ValueError, match="bimode export --merge"):
        build_trainer(bpo_config(adapter, train_file, tmp_path), model_args=ModelConfig(**LORA))
    # full training starts from the adapter merged into its base
    assert not isinstance(build_trainer(bpo_config(adapter, train_file, tmp_path)).model, PeftModel)


def test_vllm_rollouts_need_a_checkpoint_that_has_the_rows_loading_added(tmp_path, train_file):
    """vLLM builds its engine from the checkpoint on disk: rows load_model added (think tags a tokenizer lacked)
    would not be there to sync into, so BPO with vLLM (LoRA or not) refuses such a start, saying what to do."""
    from bimode.train.bpo.trainer import build_trainer

    model_dir = build_tiny_llava_llama_style(tmp_path / "model")  # its tokenizer has no think tags
    for model_args in (ModelConfig(**LORA), None):
        with pytest.raises(ValueError, match=r"gained \d+ token rows when loaded.*what `bimode anneal` saves"):
            build_trainer(bpo_config(model_dir, train_file, tmp_path / "bpo", use_vllm=True), model_args=model_args)


def test_a_kl_reference_needs_a_checkpoint_that_has_the_rows_loading_added(tmp_path, train_file):
    """TRL loads full training's reference model (beta > 0) from the checkpoint on disk, without the rows load_model
    added: refused, saying what to do (it crashed in the embedding at the first step); LoRA's reference is the
    policy's own base, grown rows included, so it builds."""
    from bimode.train.bpo.trainer import build_trainer

    model_dir = build_tiny_llava_llama_style(tmp_path / "model")  # its tokenizer has no think tags
    with pytest.raises(ValueError, match=r"beta 0.04: .*gained \d+ token rows when loaded.*or set beta 0"):
        build_trainer(bpo_config(model_dir, train_file, tmp_path / "bpo", beta=0.04))
    assert build_trainer(bpo_config(model_dir, train_file, tmp_path / "lora", beta=0.04),
                         model_args=ModelConfig(**LORA)).ref_model is None


@pytest.mark.parametrize("family", ["llava_llama_style", "qwen25_vl", "qwen3_vl"])
def test_lora_anneal_and_bpo_on_other_families(family, train_file, tmp_path):
    """Llama-style: the think tags and `\\n\\n` are added tokens, so their rows must train. Qwen-VL: the
    projector sits inside the vision tower (Qwen3-VL adds a list of deepstack mergers) and the output layer is
    not tied, so its rows train too."""
    from bimode.train.anneal import build_trainer as build_anneal
    from bimode.train.bpo.trainer import build_trainer as build_bpo

    build = {"llava_llama_style": build_tiny_llava_llama_style, "qwen25_vl": build_tiny_qwen25_vl,
             "qwen3_vl": build_tiny_qwen3_vl}[family]
    model_dir = build(tmp_path / "model")
    rows = ("embed_tokens",) if family == "llava_llama_style" else ("embed_tokens", "lm_head")
    changed = train_and_diff(build_anneal(anneal_config(model_dir, train_file, tmp_path / "anneal", max_steps=1),
                                          model_args=ModelConfig(**LORA)))
    assert_only_adapters_changed(changed, rows)
    trainer = build_bpo(bpo_config(model_dir, train_file, tmp_path / "bpo"), model_args=ModelConfig(**LORA))
    assert_only_adapters_changed(train_and_diff(trainer), rows)
    assert trainer.state.log_history[0]["bpo/no_think/advantage"] > 0


def test_bpo_with_lora_moves_p_think_against_the_base_as_kl_reference(tmp_path, trained_tiny, train_file):
    """As the full-weight test_mode_token_loss_on_moves_the_decision_toward_the_rewarded_mode, with LoRA; the
    KL reference is the model with its adapter off: no second model, KL 0 at the first step, then not."""
    from bimode.train.bpo.trainer import build_trainer

    trainer = build_trainer(bpo_config(trained_tiny, train_file, tmp_path, max_completion_length=24, max_steps=6,
                                       learning_rate=1e-2, beta=0.04, probe_size=48),
                            model_args=ModelConfig(**LORA))
    assert trainer.ref_model is None
    drop, before, after = trained_p_think_drop(trainer)
    assert drop > 0.15, (before, after)
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0


# ---- inference from an adapter folder -------------------------------------------------------------------
def test_serve_chat_and_eval_run_an_adapter_folder(tiny_adapter, tmp_path, capsys, monkeypatch):
    import bimode.serve.app

    from bimode.cli import main

    _, _, adapter = tiny_adapter
    apps = []
    monkeypatch.setattr(bimode.serve.app, "run_app", lambda app, *args: apps.append(app))  # keep what `serve` would run
    assert main(["serve", str(adapter), "--max-tokens", "64"]) == 0 and len(apps) == 1
    base, stop = serve_in_thread(apps[0])
    try:
        body = {"model": adapter.name, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "How many shells?"}],
                "chat_template_kwargs": {"thinking_mode": "short"}}
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    finally:
        stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] is not None
    assert main(["chat", str(adapter), "-p", "How many shells?", "--mode", "no_think", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    bench = write_records([s.to_record() for s in synthetic.generate(2, seed=3, split="eval", families=["count"],
                                                                     max_level=1)], tmp_path / "bench.jsonl")
    assert main(["eval", str(adapter), "--bench", str(bench), "--modes", "no_think", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_explicit_target_modules_with_a_frozen_component_are_refused(tiny_dir):
    """freeze_* filters bimode's own targets; names the user gave would be wrapped frozen or not."""
    from trl import ModelConfig

    from bimode.models import load_model
    from bimode.train.adapters import AdapterFields, build_peft_config

    model, processor = load_model(tiny_dir)
    args = ModelConfig(use_peft=True, lora_target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="lora_components"):
        build_peft_config(args, model, processor.tokenizer, AdapterFields(), frozen={"vision"})
    assert build_peft_config(args, model, processor.tokenizer, AdapterFields()) is not None
