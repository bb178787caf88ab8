"""Saved checkpoints use the layout vLLM, SGLang and transformers 4 read: `vision_tower.vision_model.*`."""

import torch

from bimode.models import load_model
from bimode.models.layout import checkpoint_param_name, flat_vision_towers
from tests.hf_fixtures import build_tiny_llava_next, build_tiny_qwen25_vl, saved_vision_keys


def test_param_names_gain_the_vision_model_level_only_under_flat_towers():
    towers = ("model.vision_tower",)
    assert checkpoint_param_name("model.vision_tower.embeddings.patch_embedding.weight", towers) == \
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert checkpoint_param_name("model.vision_tower.vision_model.post_layernorm.bias", towers) == \
        "model.vision_tower.vision_model.post_layernorm.bias"
    assert checkpoint_param_name("model.language_model.layers.0.mlp.up_proj.weight", towers) == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert checkpoint_param_name("model.vision_towerx.a", towers) == "model.vision_towerx.a"


def test_tiny_checkpoint_is_written_in_the_nested_layout_and_reads_back(tiny_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    keys = saved_vision_keys(tiny_dir)
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert flat_vision_towers(model) == ("model.vision_tower",)
    # loaded, saved again (as annealing and BPO do): still nested, same weights
    loaded, processor = load_model(tiny_dir, dtype=torch.float32)
    loaded.save_pretrained(tmp_path / "again")
    assert saved_vision_keys(tmp_path / "again") == keys
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again")
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


def test_a_flat_checkpoint_from_elsewhere_is_rewritten_nested(tmp_path):
    """LLaVA-NeXT (R-4B's layout) saved by plain transformers 5 is flat; through bimode it comes out nested."""
    path = build_tiny_llava_next(tmp_path / "next")
    flat = saved_vision_keys(path)
    assert flat and not any(".vision_model." in k for k in flat)
    model, processor = load_model(path, dtype=torch.float32)
    model.save_pretrained(tmp_path / "out")
    assert saved_vision_keys(tmp_path / "out") == sorted(k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                                                         for k in flat)


def test_towers_without_a_legacy_level_are_left_alone(tmp_path):
    from safetensors import safe_open

    path = build_tiny_qwen25_vl(tmp_path / "qwen")
    model, _ = load_model(path, dtype=torch.float32)
    assert flat_vision_towers(model) == ()
    model.save_pretrained(tmp_path / "out")
    names = []
    for folder in (path, tmp_path / "out"):
        with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
            names.append(set(f.keys()))
    assert names[0] == names[1]
