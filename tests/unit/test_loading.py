import json

import pytest
import torch
from PIL import Image

from bimode.models import load_model
from bimode.modes import MODE_SUFFIXES, ThinkingMode, mode_decision
from tests.helpers.hf_fixtures import build_tiny_llava_llama_style, build_tiny_qwen25_vl
from tests.helpers.reference_generation import generate

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}]


def _check_bimode_ready(model, processor, image_size, image_markup):
    tok = processor.tokenizer
    for tag in ("<think>", "</think>", "\n\n"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    decision = mode_decision(tok)  # raises if the two mode suffixes are not told apart by one token
    assert decision.think_ids and decision.no_think_ids
    for mode in ThinkingMode:
        text = processor.apply_chat_template(USER, add_generation_prompt=True, tokenize=False,
                                             thinking_mode=mode.value)
        assert text.endswith("<|im_start|>assistant\n" + MODE_SUFFIXES[mode]) and image_markup in text
    text = processor.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, thinking_mode="long")
    inputs = processor(images=[Image.new("RGB", (image_size, image_size), "red")], text=[text],
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]  # it generates from the bi-mode prompt


def test_qwen25_vl_gets_think_tokens_and_template(tmp_path):
    path = build_tiny_qwen25_vl(tmp_path / "qwen")
    before = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    model, processor = load_model(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.get_input_embeddings().weight.shape[0] == before + 2  # <think> and </think> added
    _check_bimode_ready(model, processor, 56, "<|vision_start|><|image_pad|><|vision_end|>")


def test_llava_with_llama_style_tokenizer_gets_double_newline_token(tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_llava_llama_style(tmp_path / "llava")
    raw = AutoTokenizer.from_pretrained(path)
    assert len(raw.encode("\n\n", add_special_tokens=False)) == 2 and "<think>" not in raw.get_vocab()
    model, processor = load_model(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    _check_bimode_ready(model, processor, 32, "<image>")


def test_template_keep_leaves_the_model_s_own(tmp_path):
    path = build_tiny_qwen25_vl(tmp_path / "qwen")
    _, processor = load_model(path, template="keep")
    assert "thinking_mode" not in processor.chat_template


@pytest.mark.parametrize("family", ["qwen25_vl", "qwen3_vl"])
def test_a_qwen_vl_model_saves_and_loads_back_with_the_same_inputs(tmp_path, family):
    """Without torchvision the processor has no video part, and transformers' own save fails on it (a trained run
    was lost so); its save writes what a hub repository holds instead (test_compat), which loads back in either
    environment and encodes as before."""
    from tests.helpers import hf_fixtures
    from tests.helpers.checkpoints import assert_same_inputs

    model, processor = load_model(getattr(hf_fixtures, f"build_tiny_{family}")(tmp_path / family))
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded, again = load_model(tmp_path / "saved", template="keep")
    assert again.chat_template == processor.chat_template and len(again.tokenizer) == len(processor.tokenizer)
    assert_same_inputs(again, processor)
    theirs = reloaded.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(p, theirs[n]) for n, p in model.state_dict().items())


def test_tiny_model_loads_without_changes(tiny_dir):
    model, processor = load_model(tiny_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    assert processor.chat_template == processor.tokenizer.chat_template


def test_remote_code_needs_explicit_opt_in(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "r_vl", "auto_map": {"AutoModel": "modeling_r.RModel"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local model directory"):
        load_model(tmp_path / "nope")


def test_engine_runs_qwen_vl_in_every_mode(tmp_path):
    """Qwen-VL (multi-axis rotary positions) shares the prompt's prefill like LLaVA: the three modes' suffixes,
    auto's decision first, and the think sample equal to plain transformers (more: test_multi_axis_engine.py)."""
    from bimode.generation.engine import TransformersEngine
    from bimode.generation.types import Prompt, SamplingParams

    model, processor = load_model(build_tiny_qwen25_vl(tmp_path / "qwen"))
    engine = TransformersEngine(model, processor)
    assert engine.shared_prefix
    image = Image.new("RGB", (56, 56), "red")
    [group] = engine.generate([Prompt(USER, images=[image], modes=["think", "no_think", "auto"])],
                              SamplingParams(max_new_tokens=4))
    assert [c.prompt_suffix for c in group] == ["<think>\n", "<think>\n\n</think>\n\n", "<think>"]
    assert all(0 <= c.p_think <= 1 and c.num_tokens <= 4 for c in group)
    assert group[2].token_ids[0] in set(engine.think_ids) | set(engine.no_think_ids)  # auto decides first
    # the think sample is what plain transformers generates from the think-mode prompt
    [reference] = generate(model, processor, [Prompt(USER, images=[image])], "think", 4, batch_size=1,
                           suppress_tokens=engine.banned_ids)
    assert group[0].token_ids == reference.token_ids
