"""`bimode eval --endpoint`: the same per-mode evaluation of a served model as of its checkpoint."""

import json

import pytest
import torch

from bimode.cli import main
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.eval.runner import read_samples
from tests.helpers.servers import serve_in_thread
from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("endpoint_bench") / "eval.jsonl"
    samples = synthetic.generate(16, seed=9, split="eval", families=TRAINED_FAMILIES, max_level=TRAINED_MAX_LEVEL)
    write_records([s.to_record() for s in samples], path)
    return path


def test_endpoint_eval_equals_checkpoint_eval(trained_tiny, bench, tmp_path, capsys):
    """bimode serve (greedy, behind an API key) evaluated over HTTP, with a resume in the middle, against
    `bimode eval` on the same checkpoint: the same answers, scores, tokens and per-mode accuracy."""
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model
    from bimode.serve.app import create_app
    from bimode.serve.limits import ServerLimits

    common = ["--bench", str(bench), "--max-new-tokens", "32", "--batch-size", "8"]
    assert main(["eval", str(trained_tiny), "--out", str(tmp_path / "local"), *common]) == 0
    model, processor = load_model(trained_tiny, dtype=torch.float32)
    app = create_app(TransformersEngine(model, processor), "tiny", ServerLimits(max_tokens=256), api_key="k")
    base, stop = serve_in_thread(app)
    served = tmp_path / "served"
    try:
        args = ["eval", "--endpoint", base, "--endpoint_model", "tiny", "--api-key", "k", "--out", str(served), *common]
        assert main(args + ["--limit", "5"]) == 0  # a first, partial run ...
        assert len(read_samples(served / "samples.jsonl")) == 15
        assert main(args) == 0  # ... resumed
        assert main(["eval", "--endpoint", base, "--api-key", "wrong", "--out", str(tmp_path / "x"), *common]) == 2
        assert "HTTP 401" in capsys.readouterr().err
    finally:
        stop()
    local = {(r["id"], r["mode"]): r for r in read_samples(tmp_path / "local" / "samples.jsonl")}
    remote = {(r["id"], r["mode"]): r for r in read_samples(served / "samples.jsonl")}
    assert local.keys() == remote.keys() and len(local) == 48
    for key, r in local.items():
        s = remote[key]
        fields = ("answer", "score", "thought", "tokens", "thinking_tokens", "answer_tokens", "finish_reason")
        assert {f: s[f] for f in fields} == {f: r[f] for f in fields}, key
        assert s["p_think"] == pytest.approx(r["p_think"], abs=1e-4)  # bimode serve sends it
    by_mode = lambda run: {mode: (s["n"], s["accuracy"], s["tokens"], s["thinking_rate"])
                           for mode, s in json.loads((run / "metrics.json").read_text())["overall"]["modes"].items()}
    assert by_mode(served) == by_mode(tmp_path / "local")
    assert set(by_mode(served)) == {"auto", "think", "no_think"}
    assert "bimode eval of tiny at http://127.0.0.1" in (served / "report.md").read_text()


def test_eval_needs_a_model_or_an_endpoint(tmp_path, capsys):
    for argv, message in ((["eval", "--bench", "b.jsonl"], "one of the two"),
                          (["eval", "m", "--endpoint", "http://x", "--bench", "b.jsonl"], "one of the two"),
                          (["eval", "m", "--endpoint_model", "tiny", "--bench", "b.jsonl"],
                           "--endpoint_model names the model at an --endpoint")):
        capsys.readouterr()
        assert main(argv + ["--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("message, usage, thinking", [
    # vLLM since PR #27752: `reasoning`; reasoning tokens reported
    ({"reasoning": "2 and 2 make 4", "content": "4"},
     {"completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 7}}, 7),
    # older vLLM and its clients: `reasoning_content`
    ({"reasoning_content": "2 and 2 make 4", "content": "4"},
     {"completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 7}}, 7),
    # no reasoning parser: the raw text, reasoning tokens estimated from its share of the characters
    ({"content": "<think>\n2 and 2 make 4\n</think>\n\n4"}, {"completion_tokens": 12}, 6),
    # the same from vLLM, which sends the field empty when no parser split the text
    ({"reasoning": None, "reasoning_content": None, "content": "<think>\n2 and 2 make 4\n</think>\n\n4"},
     {"completion_tokens": 12}, 6),
])
def test_endpoint_rows_split_thinking_from_any_server(message, usage, thinking, tmp_path):
    """What the runner writes for a think-mode answer from servers that report reasoning in each way vLLM and
    bimode serve do, with the mode forced through chat_template_kwargs."""
    import httpx

    from bimode.data.records import Record
    from bimode.eval.runner import EvalConfig, run_eval
    from bimode.generation.openai_backend import OpenAIEndpointBackend

    sent = []

    def reply(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", **message}}], "usage": usage})

    backend = OpenAIEndpointBackend("http://server", model="m")
    backend.client = httpx.Client(transport=httpx.MockTransport(reply))
    write_records([Record(id="q", question="2 + 2?", answer="4", answer_type="numeric")], tmp_path / "b.jsonl")
    row = read_samples(run_eval(backend, [tmp_path / "b.jsonl"], tmp_path / "run",
                                EvalConfig(modes=("think",), max_new_tokens=64), progress=False))[0]
    assert sent[0]["chat_template_kwargs"] == {"thinking_mode": "long"} and sent[0]["max_tokens"] == 64
    assert (row["answer"], row["score"], row["thought"], row["parsed_mode"]) == ("4", 1.0, True, "think")
    assert (row["tokens"], row["thinking_tokens"], row["answer_tokens"]) == (12, thinking, 12 - thinking)
    assert row["p_think"] is None  # only bimode serve sends it


def test_endpoint_think_answer_cut_off_without_a_reasoning_parser_scores_0(tmp_path):
    """A raw server's think-mode answer cut at max_tokens before `</think>` is unfinished reasoning, as it is
    locally (malformed, 0), not a direct answer whose last number might happen to be right."""
    import httpx

    from bimode.data.records import Record
    from bimode.eval.runner import EvalConfig, run_eval
    from bimode.generation.openai_backend import OpenAIEndpointBackend

    backend = OpenAIEndpointBackend("http://server", model="m")
    backend.client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "2 and 2 make 4"}}],
        "usage": {"completion_tokens": 8}})))
    write_records([Record(id="q", question="2 + 2?", answer="4", answer_type="numeric")], tmp_path / "b.jsonl")
    row = read_samples(run_eval(backend, [tmp_path / "b.jsonl"], tmp_path / "run",
                                EvalConfig(modes=("think",), max_new_tokens=8), progress=False))[0]
    assert (row["parsed_mode"], row["thought"], row["score"]) == ("malformed", True, 0.0)
    assert (row["tokens"], row["thinking_tokens"]) == (8, 7)  # 14 of its 15 characters are reasoning
