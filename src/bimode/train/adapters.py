"""LoRA (PEFT) for `bimode anneal` and `bimode bpo`, configured by TRL's `ModelConfig` flags.

`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, `lora_modules_to_save`,
`lora_task_type` (and `load_in_4bit` / `load_in_8bit` / `use_bnb_nested_quant` for QLoRA) are TRL's own
fields, parsed next to bimode's config, and `trl.get_peft_config` builds the LoraConfig. bimode then fills
in what TRL cannot know about a vision-language model:
- which layers get adapters: every linear layer of the components in `lora_components` (default: the
  language model only), the output layer and the projector excluded, unless `lora_target_modules` is given;
- the projector trains in full (PEFT's `modules_to_save`) when `lora_train_projector` is set;
- the mode tokens (`<think>`, `</think>` and the tokens of both mode suffixes, `\\n\\n` included) keep
  trainable rows of the input embedding and output layer (PEFT's `trainable_token_indices`): the decision
  to think is a token. Rows `load_model` added to the checkpoint's vocabulary always do (even with
  `lora_mode_tokens` off or the LLM frozen): they start random, so only the adapter can carry them.
The trainers take the LoraConfig as `peft_config` and wrap the model themselves (TRL's path, so GRPO's KL
reference is the base model with the adapter switched off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.errors import UsageError
from bimode.modes import MODE_SUFFIXES, THINK_CLOSE, THINK_OPEN, ThinkingMode
from bimode.train.components import PROJECTOR_KEYS, component_of

QLORA_FLAGS = ("load_in_4bit", "load_in_8bit", "use_bnb_nested_quant")
# Modules QLoRA leaves unquantized (transformers' skip patterns: a regex from the name's start). The projector
# trains in full (lora_train_projector: PEFT refuses gradients on 4-bit weights) and is small; the output layer
# keeps its trainable mode-token rows. Naming any skip replaces transformers' default (the output layer), so it
# is named again here.
QUANTIZATION_SKIPS = [r"(?:.*\.)?(?:" + "|".join(PROJECTOR_KEYS) + ")", "lm_head"]


@dataclass
class AdapterFields:
    """bimode's per-component LoRA settings; the other PEFT flags are TRL's `ModelConfig` fields."""

    lora_components: list[str] = field(default_factory=lambda: ["llm"], metadata={
        "help": "with use_peft: components whose linear layers get LoRA adapters (llm, vision); ignored when "
                "lora_target_modules is given"})
    lora_train_projector: bool = field(default=True, metadata={
        "help": "with use_peft: train the projector in full (PEFT modules_to_save) instead of freezing it"})
    lora_mode_tokens: bool = field(default=True, metadata={
        "help": "with use_peft: train the embedding and output rows of <think>, </think> and the mode-suffix "
                "tokens (PEFT trainable_token_indices)"})


def mode_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that spell the two modes: `<think>`, `</think>`, `\\n`, `\\n\\n` (whatever they encode to)."""
    texts = (THINK_OPEN, THINK_CLOSE, MODE_SUFFIXES[ThinkingMode.THINK], MODE_SUFFIXES[ThinkingMode.NO_THINK])
    return sorted({i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)})


def _inside_attention_module(name: str, modules: dict) -> bool:
    """nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would never run."""
    import torch

    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(modules.get(parent), torch.nn.MultiheadAttention)


def linear_targets(model, components) -> list[str]:
    """Module names of the linear layers of `components`, without the output layer and the projector."""
    import torch

    output = model.get_output_embeddings()
    modules = dict(model.named_modules())
    return [name for name, module in modules.items()
            if isinstance(module, torch.nn.Linear) and module is not output
            and component_of(name) in components and not _inside_attention_module(name, modules)]


def projector_modules(model) -> list[str]:
    """The outermost projector modules (a ModuleList's members: PEFT's wrapper cannot stand in for a list)."""
    import torch

    names = []
    for name, module in model.named_modules():
        if not name or component_of(name) != "projector" or any(name.startswith(n + ".") for n in names):
            continue
        if not isinstance(module, torch.nn.ModuleList):  # a list's members come next in named_modules
            names.append(name)
    return names


def added_rows(model) -> list[int]:
    """Embedding rows beyond the vocabulary of the checkpoint the model was loaded from (what load_model added)."""
    import json
    from pathlib import Path

    path = Path(getattr(model, "name_or_path", "") or "") / "config.json"
    if not path.is_file():
        return []
    config = json.loads(path.read_text())
    saved = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")
    rows = model.get_input_embeddings().num_embeddings
    return list(range(saved, rows)) if saved else []


def token_row_modules(model) -> list[str]:
    """Module names of the input embedding and, when it is not tied to it, the output layer."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    rows = [names[id(inp)]]
    if out is not None and out.weight is not inp.weight:
        rows.append(names[id(out)])
    return rows


def check_quantization(model_args) -> None:
    """QLoRA needs bitsandbytes on a CUDA GPU: refuse early, naming the flag, rather than fail inside loading."""
    import importlib.util

    import torch

    asked = [f for f in QLORA_FLAGS if getattr(model_args, f, False)]
    if not asked:
        return
    if not model_args.use_peft:
        raise UsageError(f"{', '.join(asked)}: a quantized base model trains only through adapters; add use_peft")
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        raise UsageError("use_bnb_nested_quant quantizes the 4-bit quantization constants: add load_in_4bit")
    if not torch.cuda.is_available():
        raise UsageError(f"{', '.join(asked)} (QLoRA) needs bitsandbytes on a CUDA GPU and this machine has none: "
                         "drop the flag (plain LoRA runs anywhere) or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{', '.join(asked)} (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def model_load_kwargs(model_args) -> dict:
    """load_model's dtype / attention / quantization arguments from TRL's ModelConfig."""
    import torch
    from accelerate import PartialState
    from trl import get_quantization_config

    check_quantization(model_args)
    dtype = model_args.dtype or "float32"
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        quantization.llm_int8_skip_modules = QUANTIZATION_SKIPS
        # bitsandbytes quantizes while loading onto the GPU: each process loads onto its own device
        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    return kwargs


def build_peft_config(model_args, model, tokenizer, settings: AdapterFields, frozen: set[str] = frozenset()):
    """TRL's LoraConfig for `model_args`, completed with bimode's component targets and mode-token rows.

    `frozen`: components the config keeps fixed (anneal's freeze_*, bpo's freeze_vision): no adapters there.
    Returns None without use_peft.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return None
    unknown = set(settings.lora_components) - {"llm", "vision"}
    if unknown:
        raise UsageError(f"lora_components: {sorted(unknown)} not llm or vision (the projector trains in full "
                         "or not at all: lora_train_projector)")
    if config.target_modules is None:
        components = [c for c in settings.lora_components if c not in frozen]
        config.target_modules = linear_targets(model, components) or None
    elif frozen & {"llm", "vision"}:  # PEFT would wrap whatever the names match, frozen or not
        raise UsageError(f"lora_target_modules names modules itself, so freeze_{'/freeze_'.join(sorted(frozen))} "
                         "cannot take a component out of it: use lora_components instead, or leave the frozen "
                         "component's modules out of lora_target_modules")
    to_save = list(config.modules_to_save or [])
    if settings.lora_train_projector and "projector" not in frozen:
        to_save += [m for m in projector_modules(model) if m not in to_save]
    config.modules_to_save = to_save or None
    ids = set(added_rows(model))  # always: new rows are random, so a base reload could not reproduce them
    if settings.lora_mode_tokens and "llm" not in frozen:
        ids |= set(mode_token_ids(tokenizer))
    if ids:
        config.trainable_token_indices = {name: sorted(ids) for name in token_row_modules(model)}
    if not (config.target_modules or config.modules_to_save or config.trainable_token_indices):
        raise UsageError("use_peft: nothing to train (every component in lora_components is frozen, the projector "
                         "is frozen or lora_train_projector is off)")
    return config
