"""The engine's shared-prefix decoder on multi-axis rotary models (Qwen2.5-VL, Qwen3-VL): the prompt prefilled once
with the model's own `get_rope_index` positions, every sample continued from its cache as text on all three axes.
Checked against plain transformers `generate`, one prompt at a time: image and text-only prompts, two images in one
prompt, images of different sizes in one batch."""

import pytest
import torch
from PIL import Image

from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from tests.helpers import hf_fixtures
from tests.helpers.reference_generation import assert_engine_equals_plain_generate

pytestmark = pytest.mark.internals  # get_rope_index's signature is read at both ends of the transformers range


def _user(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def mixed_prompts(modes: list[str], seed: int | None = None) -> list[Prompt]:
    """A wide image, text only, two images, a square image: different prompt lengths and grids in one batch (the
    square ones at the fixtures' largest grid, 2x2 merged tokens spanning 2 positions: the next position is smaller
    than the prompt's length)."""
    specs = [([Image.new("RGB", (64, 32), "red")], "Where is the ball?"),
             ([], "The ball is under cup 2. Where is it?"),
             ([Image.new("RGB", (32, 64), "blue"), Image.new("RGB", (64, 64), "green")], "Which is bigger?"),
             ([Image.new("RGB", (64, 64), "yellow")], "What colour?")]
    return [Prompt(_user(len(images), text), images=images, modes=modes,
                   seed=None if seed is None else seed + i) for i, (images, text) in enumerate(specs)]


@pytest.fixture(scope="module", params=["qwen25_vl", "qwen3_vl"])
def qwen(request, tmp_path_factory):
    path = getattr(hf_fixtures, f"build_tiny_{request.param}")(tmp_path_factory.mktemp(request.param) / "model")
    model, processor = load_model(path, dtype=torch.float32)
    return model, processor


def test_greedy_tokens_and_logprobs_equal_plain_generate(qwen):
    model, processor = qwen
    engine = TransformersEngine(model, processor)
    assert engine.shared_prefix
    prompts = mixed_prompts(["think", "no_think"])
    assert len({len(engine.prompt_ids(p)) for p in prompts}) > 2  # left padding differs row to row
    assert_engine_equals_plain_generate(engine, prompts)


def test_positions_continue_past_the_prompt_s_largest_on_every_axis(qwen):
    """An image's grid positions end below its token count, so a Qwen-VL prompt's next position is smaller than its
    length: what the model's own `rope_deltas` say, and what the decoder feeds."""
    from bimode.models.positions import next_positions, rope_positions

    model, processor = qwen
    engine = TransformersEngine(model, processor)
    prompts = mixed_prompts(["think"])
    inputs = engine.encode([engine.render(p) for p in prompts], [p.images for p in prompts])
    positions = rope_positions(model, inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"],
                               inputs.get("image_grid_thw"))
    lengths = inputs["attention_mask"].sum(-1)
    model(**inputs)  # the model's own forward records its rope_deltas (next position - length)
    deltas = model.model.rope_deltas.flatten()
    assert torch.equal(next_positions(positions), lengths + deltas)
    assert deltas.tolist() == [0, 0, -2, -2]  # a 2x2 grid of merged tokens takes 4 tokens, 2 positions


def test_seeded_prompts_sample_the_same_in_any_batch(qwen):
    model, processor = qwen
    engine = TransformersEngine(model, processor)
    prompts = mixed_prompts(["think", "no_think", "auto"], seed=100)
    params = SamplingParams(max_new_tokens=8, temperature=1.5, seed=99)
    ids = lambda out: [[c.token_ids for c in g] for g in out]
    together = ids(engine.generate(prompts, params))
    assert together == [ids(engine.generate([p], params))[0] for p in prompts]
    assert ids(engine.generate(prompts[::-1], SamplingParams(max_new_tokens=8, temperature=1.5, seed=5)))[::-1] \
        == together
    assert len({tuple(map(tuple, g)) for g in together}) == len(prompts)  # it samples: prompts differ
