"""The generation-length rule of eval, chat and curation: an explicit limit, else the model's generation config
`max_new_tokens`, else 8,192 (the paper's evaluation limit). Before, eval cut at 256 tokens, chat at 512 and
curation's answers at 256, whatever the model."""

import json
import shutil

import pytest
import torch
from transformers import GenerationConfig

from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS, configured_max_new_tokens, default_max_new_tokens
from bimode.generation.types import Completion


class Model:
    """Stands for a loaded model: only its generation config is read."""

    def __init__(self, generation_config):
        self.generation_config = generation_config


class Engine:
    def __init__(self, model):
        self.model = model


class Endpoint:
    """Like OpenAIEndpointBackend: `model` is the endpoint's model id, no config to read."""

    model = "served-name"


@pytest.mark.parametrize("source, explicit, expected", [
    (GenerationConfig(max_new_tokens=1000), None, 1000),  # the model's config sets one: used
    (GenerationConfig(max_new_tokens=1000), 64, 64),  # an explicit limit wins
    (GenerationConfig(), None, PAPER_MAX_NEW_TOKENS),  # transformers' defaults are no choice of the model
    (GenerationConfig(max_length=20), None, PAPER_MAX_NEW_TOKENS),  # max_length counts the prompt: not read
    (None, None, PAPER_MAX_NEW_TOKENS), (None, 64, 64),
    ({"max_new_tokens": 300}, None, 300), ({"max_length": 32768}, None, PAPER_MAX_NEW_TOKENS),
    ({"max_new_tokens": None}, None, PAPER_MAX_NEW_TOKENS),
    (Model(GenerationConfig(max_new_tokens=500)), None, 500),
    (Engine(Model(GenerationConfig(max_new_tokens=500))), None, 500),
    (Engine(Model(None)), None, PAPER_MAX_NEW_TOKENS), (Endpoint(), None, PAPER_MAX_NEW_TOKENS),
])
def test_rule(source, explicit, expected):
    assert default_max_new_tokens(source, explicit) == expected


def test_an_explicit_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        default_max_new_tokens(None, 0)


@pytest.fixture()
def tiny_with_limit(tiny_dir, tmp_path):
    """The tiny model's checkpoint with `max_new_tokens: 5` in its generation_config.json."""
    path = tmp_path / "limited"
    shutil.copytree(tiny_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 5}))
    return path


def test_checkpoints_files_and_loaded_models(tiny_dir, tiny_with_limit, tmp_path):
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    assert default_max_new_tokens(tiny_dir) == 256  # the embedded tiny model sets its own limit
    unset = tmp_path / "unset"  # a checkpoint whose generation_config.json sets no limit
    shutil.copytree(tiny_dir, unset)
    config = json.loads((unset / "generation_config.json").read_text())
    del config["max_new_tokens"]
    (unset / "generation_config.json").write_text(json.dumps(config))
    tiny_dir = unset
    # a folder (what `bimode chat` reads before loading): only what generation_config.json sets counts
    assert configured_max_new_tokens(tiny_dir) is None and default_max_new_tokens(tiny_dir) == PAPER_MAX_NEW_TOKENS
    assert default_max_new_tokens(tiny_with_limit) == 5
    assert default_max_new_tokens(tiny_with_limit / "generation_config.json", 7) == 7
    assert default_max_new_tokens(tiny_dir.parent / "no-such-model") == PAPER_MAX_NEW_TOKENS
    # loaded models and engines: what transformers filled in by default does not count
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    assert default_max_new_tokens(model) == default_max_new_tokens(TransformersEngine(model, processor)) == 8192
    model, processor = load_model(tiny_with_limit, dtype=torch.float32)
    assert default_max_new_tokens(model) == default_max_new_tokens(TransformersEngine(model, processor)) == 5


def test_eval_generates_up_to_the_models_own_limit(tiny_with_limit, tmp_path):
    from bimode.data import synthetic
    from bimode.data.records import write_records
    from bimode.eval.runner import EvalConfig, read_samples, run_eval
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    bench = write_records([s.to_record() for s in synthetic.generate(4, seed=1, families=["shell"])],
                          tmp_path / "bench.jsonl")
    model, processor = load_model(tiny_with_limit, dtype=torch.float32)
    engine = TransformersEngine(model, processor)
    rows = read_samples(run_eval(engine, [bench], tmp_path / "a", EvalConfig(modes=("think",)), progress=False))
    assert max(r["tokens"] for r in rows) == 5 and "length" in {r["finish_reason"] for r in rows}
    rows = read_samples(run_eval(engine, [bench], tmp_path / "b", EvalConfig(modes=("think",), max_new_tokens=3),
                                 progress=False))
    assert max(r["tokens"] for r in rows) == 3  # the flag wins


class Recorder:
    """A curation backend that answers every prompt with `text` and remembers the sampling params."""

    def __init__(self, text, limit=None):
        self.text, self.params = text, []
        self.model = Model(GenerationConfig(max_new_tokens=limit))

    def generate(self, prompts, params):
        self.params.append(params)
        return [[Completion(m, m.prompt_suffix, [], self.text, "stop", 0, 1) for m in p.modes] for p in prompts]


def test_curation_samples_answers_and_traces_with_each_models_own_limit():
    from bimode.curate import CurateConfig, curate_batch
    from bimode.data.records import Record

    record = Record(id="q", question="How many?", answer="3", answer_type="numeric")
    annotator, reasoner = Recorder("5", limit=300), Recorder("1, 2, 3\n</think>\n\n3", limit=2000)
    kept, rejects = curate_batch(annotator, [record], CurateConfig(n_samples=2), reasoner=reasoner)
    assert [r.mode for r in kept] == ["think"] and not rejects  # all answers wrong: a thinking label, traced
    assert [p.max_new_tokens for p in annotator.params] == [300]
    assert [p.max_new_tokens for p in reasoner.params] == [2000]
    annotator, reasoner = Recorder("5"), Recorder("1, 2, 3\n</think>\n\n3")
    curate_batch(annotator, [record], CurateConfig(n_samples=2), reasoner=reasoner)
    assert annotator.params[0].max_new_tokens == reasoner.params[0].max_new_tokens == PAPER_MAX_NEW_TOKENS
    curate_batch(annotator, [record], CurateConfig(n_samples=2, max_new_tokens=8, trace_max_new_tokens=16),
                 reasoner=reasoner)
    assert (annotator.params[-1].max_new_tokens, reasoner.params[-1].max_new_tokens) == (8, 16)
