"""Runs in .venv-vllm (tests/helpers/vllm_helpers.py starts it): tiny checkpoints of other families, saved the way
bimode saves a model it trained (think tags in the vocabulary, bimode's chat template), which vLLM loads as it is.

    python prepare_family.py SPEC.json OUT.json

SPEC: {"families": {NAME: DIR}, "sharpen": float}   (NAME: a tests/helpers/hf_fixtures.py builder, build_tiny_NAME)
OUT: {NAME: DIR}

Here and not in the main environment: saving a Qwen-VL processor needs its video part, so torchvision. The models
are untrained, and two changes make their greedy text what a trained model's is like:
- `sharpen` scales the language model's final norm, so its logits spread as a trained model's do (std about 3
  instead of 0.16): greedy decoding then never rests on a near tie that two correct implementations may break
  differently (measured on the untrained tiny Qwen-VL models: top-2 gaps down to 7e-4);
- the LM head's rows of tokens that are not printable text (byte tokens of unfinished UTF-8 characters, control
  characters, special tokens other than the end of turn and the think tags) are zeroed: their logit is 0 where the
  best of the others is far above, so greedy text is printable and survives a server's detokenizer (which holds an
  unfinished character back: the untrained models' answers lost their last byte through `vllm serve`). The media
  placeholders are among them: vLLM bans them and TRL scores them, so their mass is a floor under the two
  log-probs' gap in BPO (measured on Qwen3-VL: 9e-3 at 8x, 2e-3 at 16x, 1.5e-4 at 24x).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def printable(text: str) -> bool:
    return all(32 <= ord(c) < 127 or c == "\n" for c in text) and not (text.startswith("<|") and text.endswith("|>"))


def main(spec_path: str, out_path: str) -> None:
    sys.path.insert(0, str(ROOT))  # tests.helpers
    import torch

    from bimode.models import load_model
    from tests.helpers import hf_fixtures

    spec = json.loads(Path(spec_path).read_text())
    out = {}
    for name, target in spec["families"].items():
        target = Path(target)
        raw = getattr(hf_fixtures, f"build_tiny_{name}")(target.with_name(target.name + "-raw"))
        model, processor = load_model(raw, dtype=torch.float32)  # adds the think tags and the chat template
        tokenizer = processor.tokenizer
        kept = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<think>", "</think>"])}
        unprintable = [i for i in range(len(tokenizer)) if i not in kept and not printable(tokenizer.decode([i]))]
        with torch.no_grad():
            model.get_decoder().norm.weight.mul_(spec["sharpen"])
            model.get_output_embeddings().weight[unprintable] = 0.0
        model.save_pretrained(target)
        processor.save_pretrained(target)
        out[name] = str(target)
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
