"""Runs in .venv-vllm (tests/integration/test_bpo_vllm.py starts it): `bimode bpo` with TRL's colocated vLLM on CPU.

    python bpo_colocate.py SPEC.json OUT.json

SPEC: {"args": [`bimode bpo` arguments: the command runs through bimode's CLI entry point], "probe_prompts": int
       (0: no sync check), "step_one_weights": PATH}
OUT: {"logged": TRL's log history, "rollouts": [{"forced", "logprobs", "completion_ids"}] (first step), "saved": DIR,
      "before_sync" / "after_sync": {"vllm_vs_trained", "vllm_vs_start"}: largest per-token log-prob gaps}
The weights after the first optimizer step go to step_one_weights, the starting ones to step_one_weights + ".start"
(torch.save of a name -> tensor dict).

After training (vLLM then holds the weights of the last step's start), the final weights are pushed once more:
vLLM's log-probs of its own samples (no banned tokens, so both sides score the same distribution) are compared
with a forward pass of the trained model and of the starting model: equal to the first, different from the
second, or the sync did nothing.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def image_inputs(processor, images, ids: list[int], image_token_id: int) -> dict:
    """The model's image arguments for a prompt whose ids hold the expanded image tokens: pixel values, and for
    Qwen-VL the image grids and the token types its multi-axis positions are computed from."""
    import torch

    inputs = dict(processor.image_processor(images, return_tensors="pt"))
    if "image_grid_thw" in inputs:
        inputs["mm_token_type_ids"] = (torch.tensor([ids]) == image_token_id).long()
    return inputs


def logprob_gaps(llm, models, processor, prompts, vllm_ids, image_token_id) -> list[float]:
    """Largest |vLLM log-prob - model log-prob| over sampled tokens, for each model."""
    import torch
    from vllm import SamplingParams

    from bimode.train.bpo.vllm_fit import collapse_image_runs

    inputs = [{"prompt_token_ids": collapse_image_runs(ids, image_token_id, len(p.images)),
               "multi_modal_data": {"image": p.images[0]}} for ids, p in zip(vllm_ids, prompts)]
    outputs = llm.generate(inputs, SamplingParams(temperature=1.0, max_tokens=16, logprobs=0, seed=1),
                           use_tqdm=False)
    gaps = [0.0] * len(models)
    for ids, prompt, out in zip(vllm_ids, prompts, outputs):
        sampled = list(out.outputs[0].token_ids)
        theirs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, sampled)]
        images = image_inputs(processor, prompt.images, ids + sampled, image_token_id)
        for k, model in enumerate(models):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + sampled]), **images).logits[0]
            ours = torch.log_softmax(logits[len(ids) - 1:-1].float(), -1)
            gaps[k] = max([gaps[k]] + [abs(a - ours[i, t].item()) for i, (a, t) in enumerate(zip(theirs, sampled))])
    return gaps


def step_one_weights_callback():
    from transformers import TrainerCallback

    class StepOneWeights(TrainerCallback):
        def __init__(self, path: str):
            self.path = path

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.save(model, self.path + ".start")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.save(model, self.path)

        @staticmethod
        def save(model, path):
            import torch

            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, path)

    return StepOneWeights


def main(spec_path: str, out_path: str) -> None:
    sys.path.insert(0, str(ROOT))  # rewards the tests name (tests.helpers.bpo_helpers)
    import torch

    import bimode.train.bpo.trainer
    from bimode import cli
    from bimode.data import synthetic
    from bimode.generation.types import Prompt
    from bimode.models import load_model
    from bimode.modes import ThinkingMode
    from bimode.train.bpo.rollouts import ROLLOUT_FIELD

    StepOneWeights = step_one_weights_callback()
    spec = json.loads(Path(spec_path).read_text())
    built, rollouts = [], []
    build_trainer = bimode.train.bpo.trainer.build_trainer

    def spy_build(cfg, **kwargs):  # what `bimode bpo` builds, with the spies this script reads
        trainer = build_trainer(cfg, **kwargs)
        rollout = trainer.rollout_func  # TRL calls it with each step's prompts

        def spy(prompts, t):
            out = rollout(prompts, t)
            if not rollouts:
                rollouts.extend({"forced": n, "logprobs": lp, "completion_ids": ids} for n, lp, ids in
                                zip(out[ROLLOUT_FIELD].suffix_lengths, out["logprobs"], out["completion_ids"]))
            return out

        trainer.rollout_func = spy
        trainer.add_callback(StepOneWeights(spec["step_one_weights"]))
        built.append((trainer, cfg))
        return trainer

    bimode.train.bpo.trainer.build_trainer = spy_build  # `bimode bpo` looks it up when it runs
    assert cli.main(["bpo", *spec["args"]]) == 0
    (trainer, cfg), = built
    saved = Path(cfg.output_dir) / "final"
    if not spec["probe_prompts"]:
        Path(out_path).write_text(json.dumps({"logged": trainer.state.log_history, "rollouts": rollouts,
                                               "saved": str(saved)}))
        return

    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    start, processor = load_model(cfg.model_path, dtype=torch.float32)
    records = [s.to_record() for s in synthetic.generate(spec["probe_prompts"], seed=9, split="eval",
                                                         families=["count", "shell"], max_level=3)]
    prompts = [Prompt(r.messages(), r.load_images(), [ThinkingMode.THINK], r.id) for r in records]
    with trainer.generation_engine(gather=False) as engine:
        ids = [engine.prompt_ids(p) + list(engine.suffix_rest[ThinkingMode.THINK]) for p in prompts]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    llm, models = trainer.vllm_generation.llm, [trained, start.eval()]
    # vLLM sees these images before the sync too: a stale cache of image features would survive it
    before = logprob_gaps(llm, models, processor, prompts, ids, image_id)
    trainer.vllm_generation.sync_weights()
    after = logprob_gaps(llm, models, processor, prompts, ids, image_id)
    Path(out_path).write_text(json.dumps({
        "logged": trainer.state.log_history, "rollouts": rollouts, "saved": str(saved),
        "before_sync": {"vllm_vs_trained": before[0], "vllm_vs_start": before[1]},
        "after_sync": {"vllm_vs_trained": after[0], "vllm_vs_start": after[1]}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
