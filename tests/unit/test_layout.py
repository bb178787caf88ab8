"""Saved checkpoints use the layout vLLM, SGLang and transformers 4 read: `vision_tower.vision_model.*`."""

import pytest
import torch

from bimode.models import load_model
from bimode.models.layout import checkpoint_param_name, flat_vision_towers
from tests.helpers.hf_fixtures import build_tiny_llava_next, build_tiny_qwen25_vl, saved_vision_keys
from tests.helpers.vllm_helpers import VLLM_PYTHON, needs_vllm, vllm_env

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)


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
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").state_dict()
    original = model.state_dict()
    assert set(again) == set(original)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name


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


@pytest.mark.slow
@needs_vllm
def test_the_previous_transformers_minor_reads_the_checkpoint(tmp_path, tiny_dir):
    """.venv-vllm holds transformers 5.17 (vLLM's pin): it loads bimode's checkpoint with the Auto classes and
    computes the same logits as this environment's transformers."""
    import json
    import subprocess

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bimode.data import synthetic
    from tests.unit.test_tiny import ROUND_TRIP

    image = synthetic.generate(1, families=["shell"], levels=[4])[0].render()
    image.save(tmp_path / "img.png")
    out = subprocess.run([str(VLLM_PYTHON), "-c", ROUND_TRIP + "import transformers; print(transformers.__version__)",
                          str(tiny_dir), str(tmp_path / "img.png")], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=vllm_env())
    lines = out.stdout.strip().splitlines()
    result, version = json.loads(lines[-2]), lines[-1]
    assert version.startswith("5.") and int(version.split(".")[1]) < 24, version
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    inputs = processor(images=[image], text=[result["text"]], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == result["ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-4, atol=1e-5)
