"""A trained checkpoint loads back: the weights the trainer holds, and a processor that encodes as its own did."""

from pathlib import Path

import torch
from PIL import Image

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}]


def encode_image_prompt(processor) -> dict:
    """A bi-mode image prompt as the engine encodes it (images nested per text: Gemma 3 needs that)."""
    text = processor.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, thinking_mode="think")
    return dict(processor(images=[[Image.new("RGB", (60, 40), "red")]], text=[text], return_tensors="pt"))


def assert_same_inputs(processor, expected) -> None:
    ours, theirs = encode_image_prompt(processor), encode_image_prompt(expected)
    assert ours.keys() == theirs.keys() and "pixel_values" in ours, (sorted(ours), sorted(theirs))
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def assert_reloads(trainer, checkpoint: Path):
    """`load_model(checkpoint)` gives the trainer's weights, every one, and a processor that encodes an image prompt
    as the trainer's does. template="keep": the chat template must come from the saved files (think tokens missing
    from them would be added again, and show as a grown vocabulary). Returns (model, processor)."""
    from bimode.models import load_model

    model, processor = load_model(checkpoint, dtype=torch.float32, template="keep")
    assert processor.chat_template == trainer.processing_class.chat_template
    trained = dict(trainer.model.named_parameters())
    reloaded = dict(model.named_parameters())
    assert reloaded.keys() == trained.keys(), sorted(set(reloaded) ^ set(trained))[:5]
    for name, p in trained.items():
        assert torch.equal(p.detach().float(), reloaded[name]), name
    assert_same_inputs(processor, trainer.processing_class)
    return model, processor
