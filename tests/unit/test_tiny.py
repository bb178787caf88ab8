import json
import subprocess
import sys

import pytest
import torch

from bimode.models.tiny import TinyConfig, build_model, build_processor, build_tokenizer
from bimode.data import synthetic

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

ROUND_TRIP = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
path = sys.argv[1]
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking_mode="short")
inputs = processor(images=[Image.open(sys.argv[2])], text=[text], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"text": text, "logits": logits[0, -1].tolist(), "bimode_imported": "bimode" in sys.modules,
                  "model": type(model).__name__, "ids": inputs["input_ids"][0].tolist()}))
"""


@pytest.mark.slow
def test_saved_tiny_model_loads_in_plain_transformers_in_another_process(tmp_path):
    cfg = TinyConfig()
    tok = build_tokenizer(cfg.vocab_size)
    processor = build_processor(tok, cfg)
    model = build_model(tok, cfg).eval()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.py"))
    image = synthetic.generate(1, families=["shell"], levels=[4])[0].render()
    image.save(tmp_path / "img.png")

    out = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path / "m"), str(tmp_path / "img.png")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == "LlavaForConditionalGeneration" and not result["bimode_imported"]
    assert result["text"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert result["ids"].count(image_id) == (cfg.image_size // cfg.patch_size) ** 2  # 16 image tokens

    inputs = processor(images=[image], text=[result["text"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-4, atol=1e-5)


def test_image_features_start_on_the_scale_of_text_embeddings():
    """Trap 1: unscaled, projected image tokens are ~60x text embeddings and the image gets ignored."""
    cfg = TinyConfig()
    tok = build_tokenizer(cfg.vocab_size)
    processor = build_processor(tok, cfg)
    model = build_model(tok, cfg)
    images = [s.render() for s in synthetic.generate(8, families=["shell"], seed=9)]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features)
    image_norm = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).norm(dim=-1).mean()
    text_norm = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert 0.5 < float(image_norm / text_norm) < 2.0


def test_tiny_model_is_small_and_r4b_shaped(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["text_config"]["model_type"] == "qwen3" and config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["tie_word_embeddings"] is True
