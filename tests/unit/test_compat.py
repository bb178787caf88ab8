"""Contract tests of bimode.compat: each library internal bimode relies on still behaves as bimode expects.

`make test` runs this module in both environments: the main one (the newest transformers in range) and vLLM's
(transformers 5.17, vLLM 0.31), the two ends of the supported range (docs/internals.md). The vLLM parts run
where vLLM is installed; their behaviour in a real weight sync is tests/integration/test_bpo_vllm.py's.
"""

import dataclasses
import importlib.util
import inspect

import pytest
import torch
from transformers import DynamicCache

from bimode.compat import transformers_api as tf
from bimode.models import load_model

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)
needs_vllm_here = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                     reason="vLLM is not installed in this environment (it is in .venv-vllm)")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    return model.eval(), processor


def token_ids(processor, n: int = 12) -> torch.Tensor:
    ids = processor.tokenizer("count the red cells, then answer", return_tensors="pt")["input_ids"]
    return ids[:, :n]


# ---- transformers -------------------------------------------------------------------------------------
def test_a_cache_passed_under_the_model_s_own_name_continues_the_sequence(tiny):
    """The model reads the cache it is given: a prefix pass then one token gives the full pass's logits. Under
    a name the model does not declare, transformers' **kwargs would swallow it and recompute from scratch."""
    model, processor = tiny
    ids = token_ids(processor)
    assert tf.cache_argument(model) in ("cache", "past_key_values")
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        cache = DynamicCache()
        out = model(input_ids=ids[:, :-1], **tf.with_cache(model, cache), use_cache=True)
        assert tf.returned_cache(out) is cache and cache.get_seq_length() == ids.size(1) - 1
        step = model(input_ids=ids[:, -1:], **tf.with_cache(model, cache), use_cache=True).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_cache_layers_bimode_builds_on_record_copy_and_continue(tiny):
    """The shared-prefix forward's layers subclass transformers' cache layer, record into a cache that makes them
    per layer, and are put into a cache of their own; the engine copies a prompt's cache per sample by selecting
    rows. A prefix recorded, rebuilt from its keys and values and copied to two rows continues as the full pass."""
    model, processor = tiny
    ids = token_ids(processor)

    class Recorded(tf.dynamic_layer_class()):
        pass

    def layer_of(keys, values):
        layer = Recorded()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        recorded = tf.cache_growing_layers_of(Recorded)
        model(input_ids=ids[:, :-1], **tf.with_cache(model, recorded), use_cache=True)
        assert recorded.layers and all(type(layer) is Recorded for layer in recorded.layers)
        tensors = tf.cache_tensors(recorded)
        assert all(k.shape[0] == v.shape[0] == 1 and k.shape[-2] == ids.size(1) - 1 for k, v in tensors)
        copied = tf.cache_of_layers([layer_of(k, v) for k, v in tensors])
        tf.select_cache_rows(copied, torch.tensor([0, 0]))
        step = model(input_ids=ids[:, -1:].repeat(2, 1), **tf.with_cache(model, copied), use_cache=True).logits
    assert len(copied.layers) == len(tensors)  # no layer made beside the given ones
    assert torch.allclose(step[:, -1], full.expand(2, -1), atol=1e-5)


def test_the_attention_implementation_is_read_and_a_rename_fails_loudly(tiny):
    """Packed training swaps SDPA for its row-by-row variant only where the config says "sdpa": a renamed
    attribute must raise, not read as None (which would leave packed rows attending across each other)."""
    model, _ = tiny
    assert tf.attention_implementation(model.config.get_text_config()) == "sdpa"
    with pytest.raises(AttributeError, match="_attn_implementation"):
        tf.attention_implementation(object())


@pytest.mark.parametrize("grad", [True, False], ids=["with_grad", "no_grad"])
def test_checkpointed_layers_keep_a_cache_only_when_told(tiny, grad):
    """Training layers under checkpointing drop a cache passed to them (5.17 also without gradients: TRL's old
    and reference log-probs); the switch keeps it, and is put back afterwards."""
    model, processor = tiny
    ids = token_ids(processor)
    tf.enable_activation_checkpointing(model, {"use_reentrant": False})
    model.train()
    try:
        layers = tf.checkpointing_layers(model)
        assert layers and not any(tf.is_reentrant(m) for m in layers)
        with torch.set_grad_enabled(grad):
            kept = DynamicCache()
            with tf.keep_cache_under_checkpointing(layers):
                model(input_ids=ids, **tf.with_cache(model, kept), use_cache=True)
            assert kept.get_seq_length() == ids.size(1)
            if grad:  # without the switch the layers drop it (both ends)
                dropped = DynamicCache()
                model(input_ids=ids, **tf.with_cache(model, dropped), use_cache=True)
                assert dropped.get_seq_length() == 0
        assert not any("_can_checkpoint_with_cache" in vars(m) for m in layers)
    finally:
        tf.disable_activation_checkpointing(model)
        model.eval()
    assert tf.checkpointing_layers(model) == []


def test_reentrant_checkpointing_is_recognised(tiny):
    model, _ = tiny
    tf.enable_activation_checkpointing(model, {"use_reentrant": True})
    model.train()
    try:
        layers = tf.checkpointing_layers(model)
        assert layers and all(tf.is_reentrant(m) for m in layers)
    finally:
        tf.disable_activation_checkpointing(model)
        model.eval()


def test_saving_renamings_rename_once_and_load_back(tmp_path, tiny_dir):
    """What is added is written on save, once however often it is added; the tower layout bimode writes this way
    (`vision_tower.vision_model.*`) loads back in plain transformers with the same weights."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    model, _ = load_model(tiny_dir, dtype=torch.float32)  # load_model adds the tower renaming
    before = len(tf.saving_renamings(model))
    tf.add_saving_renamings(model, {"model.vision_tower.": "model.vision_tower.vision_model."})
    assert len(tf.saving_renamings(model)) == before
    model.save_pretrained(tmp_path / "nested")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "nested", dtype=torch.float32)
    theirs = dict(reloaded.named_parameters())
    assert set(theirs) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(p, theirs[n]) for n, p in model.named_parameters())

    for _ in range(2):
        tf.add_saving_renamings(model, {"model.language_model.norm.": "model.language_model.final_norm."})
    assert len(tf.saving_renamings(model)) == before + 1
    model.save_pretrained(tmp_path / "renamed")
    with safe_open(tmp_path / "renamed" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(".final_norm." in k for k in keys) and not any(k.endswith("language_model.norm.weight") for k in keys)
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))


def test_a_processor_builds_without_its_video_part(tmp_path):
    from transformers.processing_utils import ProcessorMixin

    from bimode.models.loading import load_image_only_processor
    from tests.helpers import hf_fixtures

    original = ProcessorMixin.check_argument_for_proper_class
    processor = load_image_only_processor(hf_fixtures.build_tiny_qwen25_vl(tmp_path / "qwen"))
    assert processor.video_processor is None and processor.image_processor is not None
    # lifted on that instance only, and only while it was built: the class and the instance check again
    assert ProcessorMixin.check_argument_for_proper_class is original
    assert type(processor).check_argument_for_proper_class is original
    assert "check_argument_for_proper_class" not in vars(processor)


VIDEO = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
         "fps": 3, "max_frames": 99}  # as a hub Qwen3-VL repository has it, marked by max_frames


def _image_only_qwen3_vl(tmp_path):
    """(a tiny Qwen3-VL folder with VIDEO, its processor built without the video part)."""
    import json

    from bimode.models.loading import load_image_only_processor
    from tests.helpers import hf_fixtures

    source = hf_fixtures.build_tiny_qwen3_vl(tmp_path / "qwen")
    (source / "video_preprocessor_config.json").write_text(json.dumps(VIDEO))
    return source, load_image_only_processor(source)


def test_a_processor_without_its_video_part_saves_what_a_hub_repository_holds(tmp_path):
    """transformers' save fails on the missing part; the instance saves the hub layout instead, the checkpoint's
    video settings kept, and that loads back image-only (plain AutoProcessor: the next test)."""
    import copy
    import json
    import pickle

    from transformers.processing_utils import ProcessorMixin

    from bimode.models.loading import load_image_only_processor
    from tests.helpers.checkpoints import assert_same_inputs

    source, processor = _image_only_qwen3_vl(tmp_path)
    processor.chat_template = "{{ messages | length }} {{ thinking_mode }}"  # the processor's own, not the tokenizer's
    with pytest.raises(AttributeError, match="_auto_class"):  # what the instance's save replaces: transformers' own
        ProcessorMixin.save_pretrained(processor, tmp_path / "stock")
    assert type(processor).save_pretrained is ProcessorMixin.save_pretrained  # the class keeps it

    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == [
        "chat_template.jinja", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
        "video_preprocessor_config.json"]
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        assert json.loads((saved / name).read_text())["processor_class"] == "Qwen3VLProcessor", name
    assert json.loads((saved / "video_preprocessor_config.json").read_text()) == VIDEO
    assert (saved / "chat_template.jinja").read_text() == processor.chat_template

    reloaded, expected = load_image_only_processor(saved), load_image_only_processor(source)
    assert reloaded.chat_template == processor.chat_template
    reloaded.chat_template = expected.chat_template
    assert_same_inputs(reloaded, expected)  # the tokenizer and the image processor's settings came back
    reloaded.save_pretrained(tmp_path / "again")  # and the video settings, to be saved again
    assert json.loads((tmp_path / "again" / "video_preprocessor_config.json").read_text()) == VIDEO
    for clone in (copy.deepcopy(processor), pickle.loads(pickle.dumps(processor))):  # copies save themselves
        clone.chat_template = "copied"
        clone.save_pretrained(tmp_path / "clone")
        assert (tmp_path / "clone" / "chat_template.jinja").read_text() == "copied"


def test_a_processor_saved_without_its_video_part_loads_with_plain_auto_processor(tmp_path):
    """Where torchvision exists (the vLLM environment), transformers' own processor reads the saved folder, its
    video part from the kept settings, and encodes as the image-only one does; and back: what transformers saves
    (the parts nested in processor_config.json) loads image-only, and saves again with the same video settings."""
    import json

    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    from bimode.models.loading import load_image_only_processor
    from tests.helpers.checkpoints import assert_same_inputs

    _, processor = _image_only_qwen3_vl(tmp_path)
    processor.save_pretrained(tmp_path / "saved")
    plain = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(plain).__name__ == "Qwen3VLProcessor" and plain.video_processor is not None
    assert plain.video_processor.max_frames == 99
    assert_same_inputs(plain, processor)

    plain.save_pretrained(tmp_path / "stock")
    nested = json.loads((tmp_path / "stock" / "processor_config.json").read_text())["video_processor"]
    image_only = load_image_only_processor(tmp_path / "stock")
    assert_same_inputs(image_only, plain)
    image_only.save_pretrained(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "video_preprocessor_config.json").read_text()) == nested


# ---- overridden private methods (TRL, transformers' Trainer) -------------------------------------------
def test_bimode_trainers_override_the_libraries_methods_with_their_signatures():
    from trl import GRPOTrainer

    from bimode.compat.overrides import check_overrides
    from bimode.train.anneal import AnnealTrainer
    from bimode.train.bpo.trainer import BPOTrainer

    check_overrides(BPOTrainer)
    check_overrides(AnnealTrainer)
    for name in ("_generate_and_score_completions", "_get_per_token_logps_and_entropies"):
        assert name in vars(BPOTrainer) and name in vars(GRPOTrainer), name

    class Drifted(BPOTrainer):  # given a bimode module below: its override is checked like bimode's own
        pass

    Drifted.__module__ = "bimode.drifted"

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, chunk_size=None):
        return None

    Drifted._get_per_token_logps_and_entropies = _get_per_token_logps_and_entropies
    with pytest.raises(RuntimeError, match=r"bimode's Drifted\._get_per_token_logps_and_entropies overrides it"):
        check_overrides(Drifted)

    class Library:  # a release that renamed the method bimode replaces
        def _load_checkpoint(self, resume_from_checkpoint, model=None):
            return None

    class Ours(Library):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            return None

        def _helper(self):  # bimode's own private method: nothing to compare it with
            return None

    Ours.__module__ = "bimode.ours"
    with pytest.raises(RuntimeError, match=r"Ours\._load_from_checkpoint replaces a library method that no base"):
        check_overrides(Ours)


# ---- TRL -----------------------------------------------------------------------------------------------
def test_logged_metrics_are_averaged_into_the_next_log(tmp_path, tiny_dir, trained_families_file):
    from bimode.compat.trl_api import log_metric, logged_metric
    from bimode.train.bpo.trainer import BPOConfig, build_trainer

    trainer = build_trainer(BPOConfig(model_path=str(tiny_dir), train_files=[str(trained_families_file)],
                                      output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                      max_steps=1, report_to=[], use_cpu=True, bf16=False, probe_steps=0))
    trainer.model.train()  # TRL logs what was collected for the mode the model is in
    log_metric(trainer, "compat/x", 2.0)
    log_metric(trainer, "compat/x", 4.0)
    assert logged_metric(trainer, "compat/x") == [2.0, 4.0]
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["compat/x"] == 3.0
    assert logged_metric(trainer, "compat/x") == []  # cleared for the next step


def test_trl_merges_the_rollouts_extra_fields_into_the_batch_it_was_given(tmp_path, tiny_dir, trained_families_file):
    from bimode.compat.trl_api import rollout_extra_field
    from bimode.train.bpo.trainer import BPOConfig, build_trainer
    from bimode.train.bpo.rollouts import ROLLOUT_FIELD, RolloutBatch

    with pytest.raises(RuntimeError, match="'bimode_rollouts' into the generation batch"):
        rollout_extra_field([{"prompt": []}], ROLLOUT_FIELD)
    trainer = build_trainer(BPOConfig(model_path=str(tiny_dir), train_files=[str(trained_families_file)],
                                      output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                      max_completion_length=2, max_steps=1, report_to=[], use_cpu=True, bf16=False,
                                      probe_steps=0))
    trainer.model.train()
    _, rollouts = trainer.generate_and_score([0, 0])  # reads the field back through the adapter
    assert isinstance(rollouts, RolloutBatch) and len(rollouts) == 2
    assert list(rollouts.rewards) == ["accuracy"]  # the rewards TRL called saw the same batch


def test_vllm_parameter_names_go_through_trl_s_fix_then_ours():
    from trl.generation.vllm_generation import VLLMGeneration

    from bimode.compat.overrides import check_overrides
    from bimode.compat.trl_api import adopt_vllm_generation, vllm_param_name
    from bimode.train.bpo.vllm_fit import BimodeVLLMGeneration

    assert list(inspect.signature(VLLMGeneration._fix_param_name_to_vllm).parameters) == [
        "self", "name", "extra_prefixes"]
    check_overrides(BimodeVLLMGeneration)
    generation = object.__new__(VLLMGeneration)  # the name fix reads no instance state TRL's constructor sets
    adopt_vllm_generation(generation, BimodeVLLMGeneration)
    assert isinstance(generation, BimodeVLLMGeneration) and VLLMGeneration.sync_weights is not \
        BimodeVLLMGeneration.sync_weights  # TRL's class itself is untouched
    generation.checkpoint_name = lambda name: name.replace("vision_tower.", "vision_tower.vision_model.")
    name = "model.vision_tower._checkpoint_wrapped_module.embeddings.patch.weight"
    assert vllm_param_name(generation, name) == "model.vision_tower.vision_model.embeddings.patch.weight"
    with pytest.raises(RuntimeError, match="expected TRL's VLLMGeneration"):
        adopt_vllm_generation(generation, BimodeVLLMGeneration)  # adopted once, and only TRL's own class


@needs_vllm_here
def test_colocated_engine_arguments_reach_trl_s_llm_and_are_put_back():
    import trl.generation.vllm_generation as trl_vllm

    from bimode.compat.trl_api import colocated_llm_arguments

    original = trl_vllm.LLM
    with colocated_llm_arguments(dtype="float32", enforce_eager=True):
        assert trl_vllm.LLM.func is original and trl_vllm.LLM.keywords == {"dtype": "float32", "enforce_eager": True}
    assert trl_vllm.LLM is original


# ---- vLLM ----------------------------------------------------------------------------------------------
@needs_vllm_here
def test_vllm_s_reload_protocol_and_engine_methods_are_there():
    """The calls `bimode.compat.vllm_api` makes (their effect in a real sync: tests/integration/test_bpo_vllm.py)."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    from vllm.v1.engine.llm_engine import LLMEngine

    from bimode.compat.vllm_api import on_cpu

    assert list(inspect.signature(initialize_layerwise_reload).parameters) == ["model"]
    assert callable(finalize_layerwise_reload)  # (model, model_config), behind a decorator's (*args, **kwargs)
    assert list(inspect.signature(LLMEngine.reset_encoder_cache).parameters) == ["self"]
    assert on_cpu() == (not torch.cuda.is_available())


@needs_vllm_here
def test_vllm_s_logits_processor_interface_is_there():
    """What bimode's controls (generation/vllm_controls.py) build on: the base class and the methods vLLM calls,
    the batch changes' fields and the kinds of move, and the tokenizer vLLM serves with."""
    from vllm.tokenizers import cached_tokenizer_from_config

    from bimode.compat.vllm_api import logits_processor_interface

    base, batch_update, move = logits_processor_interface()
    assert {"apply", "update_state", "is_argmax_invariant", "validate_params"} <= set(vars(base))
    assert list(inspect.signature(base.__init__).parameters) == ["self", "vllm_config", "device", "is_pin_memory"]
    fields = {f.name for f in dataclasses.fields(batch_update)}
    assert {"batch_size", "removed", "added", "moved"} <= fields
    assert {"SWAP", "UNIDIRECTIONAL"} <= set(move.__members__)
    assert "model_config" in inspect.signature(cached_tokenizer_from_config).parameters


# ---- the standard library ------------------------------------------------------------------------------
def test_a_process_pool_s_workers_are_killed():
    """The answer checker kills its worker after a timeout (`ProcessPoolExecutor._processes`): the call stuck in
    it never returns, so the pool breaks instead of waiting."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from bimode.compat.stdlib_api import kill_pool_processes

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    try:
        assert pool.submit(int, "7").result(timeout=60) == 7  # the worker runs
        stuck = pool.submit(time.sleep, 600)
        kill_pool_processes(pool)
        with pytest.raises(BrokenProcessPool):
            stuck.result(timeout=60)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- PEFT ----------------------------------------------------------------------------------------------
def test_a_lora_models_parameters_map_back_to_its_base_checkpoints_names(tiny_dir):
    """What a LoRA weight sync to vLLM sends: after TRL's clean-up of PEFT names (restated here; the sync itself
    runs in tests/integration/test_bpo_vllm.py), every base parameter once under its own name, nothing else."""
    from peft import get_peft_model
    from trl import ModelConfig

    from bimode.compat.peft_api import base_param_name
    from bimode.train.adapters import AdapterFields, build_peft_config

    model, processor = load_model(tiny_dir, dtype=torch.float32)
    base_names = {name for name, _ in model.named_parameters()}
    config = build_peft_config(ModelConfig(use_peft=True, lora_r=4), model, processor.tokenizer, AdapterFields())
    assert config.trainable_token_indices and config.modules_to_save  # token rows and the projector in full
    peft_model = get_peft_model(model, config)
    sent = []
    for name, _ in peft_model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if peft_model.prefix in name or "original_module" in name:
            continue
        base = base_param_name(name.replace("modules_to_save.default.", ""))
        if base is not None:
            sent.append(base)
    assert sorted(sent) == sorted(base_names)


def test_peft_s_token_row_wrapper_exposes_the_output_bias():
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import TrainableTokensWrapper

    from bimode.compat.peft_api import expose_output_bias

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.body = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 16, bias=True)

        def forward(self, ids):
            return self.lm_head(self.body(self.embed(ids)))

    toy = Toy()
    bias = toy.lm_head.bias
    model = get_peft_model(toy, LoraConfig(target_modules=["body"], trainable_token_indices={"lm_head": [1, 2]}))
    wrappers = [m for m in model.modules() if isinstance(m, TrainableTokensWrapper)]
    assert wrappers
    expose_output_bias(model)
    for wrapper in wrappers:
        assert wrapper.bias is bias and wrapper.weight.shape == (16, 8)


def test_the_step_phases_a_bench_times_are_trainer_methods():
    from trl import GRPOTrainer

    from bimode.compat.trl_api import step_phase_methods

    phases = step_phase_methods()
    assert set(phases) == {"rollout", "generate_and_score"}
    assert all(callable(getattr(GRPOTrainer, name)) for name in phases.values())
