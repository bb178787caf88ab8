"""lmms-eval task functions for the synthetic world (bimode_world.yaml).

The prompt is the one `bimode eval` builds from a record (`Record.messages`: the text split at each `<image>`
marker, images in their places), so a served model sees the same tokens from either harness; scoring is
bimode's own answer check, `bimode.scoring.accuracy_reward`, on the answer lmms-eval's OpenAI-compatible
model receives (`message.content`: bimode serve returns the reasoning apart, so that is the text after
`</think>`). bimode.scoring needs only the standard library, so it is imported from this repository's src/
and bimode need not be installed in lmms-eval's environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

_SRC = Path(__file__).resolve().parents[3] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from bimode.scoring import accuracy_reward


def _images(doc) -> list[Image.Image]:
    # paths are relative to the record file (write_records puts them in <stem>_images/); lmms-eval runs from
    # the folder that holds it. RGB as Record.load_images and bimode serve decode them.
    out = []
    for image in doc["images"]:
        with Image.open(image) as opened:
            out.append(opened.convert("RGB"))
    return out


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    images = _images(doc)
    parts = doc["question"].split("<image>")
    content = []
    if len(parts) == 1:  # no marker: images first, as Record.messages does
        content += [{"type": "image", "url": image} for image in images]
        content.append({"type": "text", "text": doc["question"]})
    else:
        if len(parts) - 1 != len(images):
            raise ValueError(f"record {doc['id']}: {len(parts) - 1} <image> markers for {len(images)} images")
        for i, part in enumerate(parts):
            if part:
                content.append({"type": "text", "text": part})
            if i < len(images):
                content.append({"type": "image", "url": images[i]})
    return [{"role": "user", "content": content}]


def doc_to_visual(doc):
    return _images(doc)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"].replace("<image>", "").strip()


def process_results(doc, results):
    return {"bimode_accuracy": accuracy_reward(results[0], doc["answer"], doc.get("answer_type"), doc.get("choices"))}
