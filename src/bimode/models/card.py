"""Model cards: the README.md in the Hugging Face Hub's format that every checkpoint bimode writes carries.

Pure text: facts in, markdown with YAML front matter out (`render_card`); models/card_files.py reads the facts
from disk and writes the file. The front matter holds what the Hub reads (base_model, library_name,
pipeline_tag, tags, license); the body says how the model was made, how to run it in each mode, and, once
`bimode eval --card` has run on it, its per-mode and per-level table. Two parts sit between HTML-comment
markers so a later step finds them: "made" (a next stage copies its start model's stages before its own, so
a BPO model's card lists its annealing too) and "eval" (a re-run of eval replaces it).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field

import yaml

CARD_FILE = "README.md"
PIPELINE_TAG = "image-text-to-text"
TAGS = ("bimode", "r4b", "auto-thinking")
MADE, EVAL = "made", "eval"

# what each stage did, for the reader of the card
STAGES = {
    "anneal": "bi-mode annealing: supervised fine-tuning on thinking and non-thinking responses (`bimode anneal`, "
              "TRL's SFTTrainer)",
    "bpo": "Bi-mode Policy Optimization: reinforcement learning whose groups hold thinking and non-thinking "
           "rollouts of each prompt (`bimode bpo`, TRL's GRPOTrainer)",
    "lora-merged": "a LoRA adapter merged into its base model (`bimode export --merge`)",
    "composed": "a vision encoder and a language model joined by a fresh, untrained projector (`bimode compose`); "
                "train the projector before use",
    "tiny": "the embedded tiny model with random weights (`bimode tiny`), for tests and the demo",
    "sft-warmup": "the demo's annotator warm-up: supervised fine-tuning in both formats (`bimode demo`)",
}

# settings that say where a run wrote or how it logged, not how the model was made
_NOT_RECIPE = ("output_dir", "logging_dir", "run_name", "model_path", "train_files", "probe_files",
               "resume_from_checkpoint", "overwrite_output_dir", "report_to", "disable_tqdm", "debug",
               "accelerator_config", "push_to_hub", "model_name_or_path",
               # plumbing bimode's trainers set themselves, whatever the recipe says
               "remove_unused_columns", "ddp_find_unused_parameters", "dataset_kwargs")
_NOT_RECIPE_PREFIXES = ("logging_", "save_", "hub_", "dataloader_", "eval_")


@dataclass
class CardFacts:
    """What a card says about one checkpoint."""

    stage: str  # a key of STAGES
    start_model: str | None = None  # the folder (or folders) it started from, as given
    base_model: list[str] = field(default_factory=list)  # Hub ids of its nearest Hub ancestors; [] when unknown
    license: str | None = None  # the start model's, where it named one
    adapter: bool = False  # a PEFT adapter folder (library_name peft) rather than a full checkpoint
    settings: dict = field(default_factory=dict)  # the recipe's fields that differ from the defaults
    data: list[tuple[str, int | None]] = field(default_factory=list)  # (file name, rows)
    earlier: str = ""  # the start model's card's "made" part: its stages, oldest first
    eval_table: str = ""  # `bimode eval --card`'s table

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"card stage {self.stage!r} is not one of {', '.join(STAGES)}")


def front_matter(facts: CardFacts) -> dict:
    """The card's YAML metadata, in the Hub's field names; unknown facts are left out, never guessed."""
    meta: dict = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model[0] if len(facts.base_model) == 1 else list(facts.base_model)
    meta["library_name"] = "peft" if facts.adapter else "transformers"
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = [*TAGS, facts.stage] + (["lora"] if facts.adapter else [])
    if facts.license:
        meta["license"] = facts.license
    return meta


def render_card(facts: CardFacts, title: str) -> str:
    """The whole README.md."""
    yaml_text = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    made = "\n\n".join(part for part in (facts.earlier.strip(), stage_block(facts)) if part)
    parts = [f"---\n{yaml_text}---", f"# {title}", _intro(facts), "## How it was made", marked(MADE, made),
             "## How to use it", usage(facts.adapter)]
    if facts.eval_table:
        parts += ["## Evaluation", marked(EVAL, facts.eval_table)]
    return "\n\n".join(parts) + "\n"


def _intro(facts: CardFacts) -> str:
    kind = "A LoRA adapter for an" if facts.adapter else "An"
    text = (f"{kind} auto-thinking vision-language model made with bimode, an implementation of the recipe of "
            "[R-4B](https://arxiv.org/abs/2508.21113): in auto mode it decides per query whether to think step by "
            "step (a `<think>` block with its reasoning) or to answer directly (an empty `<think>` block).")
    if facts.base_model:
        text += " Its nearest model on the Hub: " + ", ".join(f"`{b}`" for b in facts.base_model) + "."
    return text


def stage_block(facts: CardFacts) -> str:
    """This stage's own entry of the "made" part."""
    what = STAGES[facts.stage]
    lines = [f"### Stage: {facts.stage}", "", what[0].upper() + what[1:] + "."]
    if facts.start_model:
        lines += ["", f"Start model: `{facts.start_model}`."]
    if facts.data:
        lines += ["", "Data: " + ", ".join(f"`{name}` ({'?' if rows is None else f'{rows:,}'} rows)"
                                           for name, rows in facts.data) + "."]
    if facts.settings:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | `{_cell(v)}` |" for k, v in facts.settings.items()]
    return "\n".join(lines)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def usage(adapter: bool) -> str:
    """How to run the model in each mode: transformers, vLLM, bimode serve and the OpenAI client."""
    note = ("This folder is a LoRA adapter: transformers loads it with PEFT installed; for vLLM, merge it first "
            "(`bimode export --merge THIS_FOLDER --out MERGED`).\n\n" if adapter else "")
    return note + TRANSFORMERS_USAGE + "\n\n" + SERVING_USAGE


TRANSFORMERS_USAGE = '''The mode is the chat template's `thinking_mode`: `auto` (the model decides), `think` (or `long`) or
`no_think` (or `short`); Qwen3's `enable_thinking` is accepted too. The answer follows the `</think>` tag.

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "path/to/this/model"  # this folder, or the Hub id it is uploaded to
processor = AutoProcessor.from_pretrained(model_id)
model = AutoModelForImageTextToText.from_pretrained(model_id)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking_mode="auto")
inputs = processor(images=[Image.open("picture.png").convert("RGB")], text=[text], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=1024)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False))
```'''

SERVING_USAGE = '''Served with an OpenAI-compatible API, by vLLM or by bimode's own server, the mode goes in
`chat_template_kwargs`; the reasoning comes back apart from the answer:

```bash
vllm serve path/to/this/model --reasoning-parser qwen3
# where bimode is installed, add its thinking budget and controls to vLLM:
#   --logits-processors bimode.generation.vllm_controls:BimodeControls
bimode serve path/to/this/model --port 8000   # bimode's own server; `bimode chat MODEL` chats in a terminal
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
response = client.chat.completions.create(
    model=client.models.list().data[0].id,
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}],
    max_tokens=1024,
    # auto | long | short; vLLM's qwen3 parser also wants "enable_thinking": False for short
    extra_body={"chat_template_kwargs": {"thinking_mode": "auto"}},
)
message = response.choices[0].message
print(getattr(message, "reasoning_content", None), message.content)
```'''


def marked(name: str, body: str) -> str:
    return f"<!-- bimode-{name}:start -->\n{body.strip()}\n<!-- bimode-{name}:end -->"


def _span(text: str, name: str) -> tuple[int, int] | None:
    """Where the marked part `name` is: from its start marker to past its end marker (the outermost pair)."""
    start, end = text.find(f"<!-- bimode-{name}:start -->"), text.rfind(f"<!-- bimode-{name}:end -->")
    return None if start < 0 or end < start else (start, end + len(f"<!-- bimode-{name}:end -->"))


def marked_part(text: str, name: str) -> str | None:
    """The body of a marked part of a card; None where it has none."""
    span = _span(text, name)
    if span is None:
        return None
    inner = text[span[0]:span[1]].split("\n", 1)[1]
    return inner.rsplit("\n", 1)[0].strip()


def with_eval_table(text: str, table: str) -> str:
    """The card with its eval table replaced, or appended as an "Evaluation" section where it had none."""
    span = _span(text, EVAL)
    if span is not None:
        return text[:span[0]] + marked(EVAL, table) + text[span[1]:]
    return text.rstrip("\n") + "\n\n## Evaluation\n\n" + marked(EVAL, table) + "\n"


def config_settings(*configs, skip: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass configs (a recipe after its flags) whose values differ from their defaults,
    leaving out paths, logging and saving (`skip`: more names to leave out)."""
    out = {}
    for cfg in configs:
        if cfg is None:
            continue
        for f in dataclasses.fields(cfg):
            name, value = f.name, getattr(cfg, f.name, None)
            if (not f.init or value is None or name in _NOT_RECIPE or name in skip
                    or name.startswith(_NOT_RECIPE_PREFIXES) or value == _default(f)):
                continue
            out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def looks_like_hub_id(name: str | None) -> bool:
    """`org/name` with the Hub's characters, and not a path form ("./x", "/x", "~/x", "x/../y")."""
    return bool(name) and bool(HUB_ID.match(name)) and ".." not in name and not name.startswith(("~", "."))
