"""`bimode compose`: a LLaVA checkpoint from an encoder and a language model saved apart, with their weights
unchanged, that transformers' Auto classes and bimode load; bad pairs refused naming the part."""

import json
import shutil

import pytest
import torch

from bimode.errors import MissingInputError, UsageError
from bimode.models.compose import compose
from tests.helpers.hf_fixtures import build_tiny_encoder, build_tiny_llm, saved_vision_keys


def _source_weights(encoder_dir, llm_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    encoder = AutoModel.from_pretrained(encoder_dir)
    tower = getattr(encoder, "vision_model", encoder)
    return tower.state_dict(), AutoModelForCausalLM.from_pretrained(llm_dir)


@pytest.mark.parametrize("encoder, llm", [("siglip", "qwen3"), ("siglip_two_tower", "qwen2"), ("clip", "llama")])
def test_a_composed_model_keeps_its_parts_and_loads_everywhere(tmp_path, encoder, llm):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bimode.cli import main
    from bimode.models import load_model

    encoder_dir, llm_dir = build_tiny_encoder(tmp_path / encoder, encoder), build_tiny_llm(tmp_path / llm, llm)
    out = tmp_path / "composed"
    assert main(["compose", "--vision", str(encoder_dir), "--llm", str(llm_dir), "--out", str(out)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert saved_vision_keys(out)[0].startswith("vision_tower.vision_model.")  # the layout vLLM reads
    vision, source_llm = _source_weights(encoder_dir, llm_dir)
    for name, tensor in vision.items():  # the encoder unchanged
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    composed_llm = model.model.language_model.state_dict()
    for name, tensor in source_llm.model.state_dict().items():  # the LLM unchanged; new token rows appended
        got = composed_llm[name]
        assert torch.equal(got[: tensor.shape[0]] if name == "embed_tokens.weight" else got, tensor), name
    rows = source_llm.config.vocab_size
    assert torch.equal(model.lm_head.weight[:rows], source_llm.lm_head.weight)
    tokenizer = processor.tokenizer
    for token in ("<image>", "<think>", "</think>"):  # single tokens, inside the embedding table
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        assert token_id < model.get_input_embeddings().weight.shape[0], token
    # an image becomes image_seq_length placeholders, whose features fill them (CLIP's CLS dropped)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.new("RGB", (40, 30), (200, 30, 30))], text=[text], return_tensors="pt")
    image_id = model.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) == model.config.image_seq_length == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
        # the fresh projector starts at the text embeddings' scale, not ~60x above it (trap 1)
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        image = getattr(image, "pooler_output", image)
        image = torch.cat([f.reshape(-1, f.shape[-1]) for f in image])
    ratio = float(image.norm(dim=-1).mean() / model.get_input_embeddings().weight[:rows].detach().norm(dim=-1).mean())
    assert 0.5 < ratio < 2.0
    # bimode loads it as it is: nothing left to add
    loaded, loaded_processor = load_model(out, dtype=torch.float32)
    assert len(loaded_processor.tokenizer) == len(tokenizer)
    assert "thinking_mode" in loaded_processor.chat_template


def test_bad_parts_are_refused_naming_the_part(tmp_path):
    from bimode.cli import main

    siglip, qwen = build_tiny_encoder(tmp_path / "siglip", "siglip"), build_tiny_llm(tmp_path / "qwen3", "qwen3")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"vision encoder .*qwen3: model_type 'qwen3' is not a vision encoder"):
        compose(qwen, qwen, out)
    with pytest.raises(UsageError, match=r"language model .*siglip: model_type 'siglip_vision_model' is not a "
                                         r"language model"):
        compose(siglip, siglip, out)
    naflex = build_tiny_encoder(tmp_path / "naflex", "siglip2_naflex")
    with pytest.raises(UsageError, match="NaFlex.*fixed-resolution SigLIP2"):
        compose(naflex, qwen, out)
    odd = tmp_path / "odd"
    shutil.copytree(siglip, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "image_size": 30}))
    with pytest.raises(UsageError, match="image_size 30 is not a whole number of 8-pixel patches"):
        compose(odd, qwen, out)
    (odd / "config.json").write_text(json.dumps({**config, "hidden_size": 0}))
    with pytest.raises(UsageError, match="hidden_size 0: the projector has no input width"):
        compose(odd, qwen, out)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in qwen.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    with pytest.raises(MissingInputError, match=r"language model .*bare: no tokenizer"):
        compose(siglip, bare, out)
    with pytest.raises(MissingInputError, match="no config.json"):
        compose(tmp_path / "nowhere", qwen, out)
    assert not out.exists()  # nothing written by a refused pair
    assert main(["compose", "--vision", str(siglip)]) == 2  # the CLI's usage error
