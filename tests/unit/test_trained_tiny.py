"""Behaviour of the tiny model after a short bi-mode SFT: it answers from the image, in each forced mode."""

import copy
import random

import pytest
import torch

from bimode.data import synthetic
from tests.helpers.reference_generation import generate
from bimode.models import load_model
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL


@pytest.fixture(scope="module")
def model_and_processor(trained_tiny):
    return load_model(trained_tiny, dtype=torch.float32)


@pytest.fixture(scope="module")
def eval_records():
    return [s.to_record() for s in synthetic.generate(96, seed=5, split="eval", families=TRAINED_FAMILIES,
                                                      max_level=TRAINED_MAX_LEVEL)]


def _accuracy(gens, records):
    return sum(g.parsed.answer == r.answer for g, r in zip(gens, records)) / len(records)


def test_each_forced_mode_generates_its_format(model_and_processor, eval_records):
    model, processor = model_and_processor
    think = generate(model, processor, eval_records, mode="think", max_new_tokens=32)
    no_think = generate(model, processor, eval_records, mode="no_think", max_new_tokens=32)
    for g in think:  # the prompt ends with "<think>\n": the model writes a trace, closes, answers
        assert g.response.startswith("<think>\n") and g.parsed.mode == "think" and g.parsed.answer, g.response
    for g in no_think:  # the prompt ends with the closed empty block: the model answers at once
        assert "</think>" not in g.text and g.parsed.mode == "no_think" and g.parsed.answer, g.response
    assert _accuracy(think, eval_records) > 0.6  # chance is about 0.3


def test_answers_depend_on_the_image(model_and_processor, eval_records):
    """With each image swapped for another sample's, accuracy falls to about chance."""
    model, processor = model_and_processor
    shell = [r for r in eval_records if r.family == "shell"]
    images = [r.images for r in shell]
    random.Random(0).shuffle(images)
    swapped = [copy.copy(r) for r in shell]
    for r, imgs in zip(swapped, images):
        r.images = imgs
    right = _accuracy(generate(model, processor, shell, mode="think", max_new_tokens=32), shell)
    wrong = _accuracy(generate(model, processor, swapped, mode="think", max_new_tokens=32), swapped)
    assert right > 0.6 and wrong < 0.5 and right - wrong > 0.25, (right, wrong)
