"""`bimode anneal`: bi-mode annealing (SFT on mixed thinking / non-thinking targets) on TRL's SFTTrainer.

Runs as it is and under `accelerate launch`. Records are tokenized on the fly with the loss on the
assistant response only (its whole think block included; optionally the empty block of non-thinking
targets masked, the paper's non-thinking loss masking). The vision tower, projector and language model each
get their own learning rate or are frozen (docs/r4b.md, section 5), in whichever optimizer `optim` names
(GaLore, APOLLO and LOMO pick their own parameters: refused). With TRL's `use_peft` (and `lora_*`)
flags they train LoRA adapters instead (train/adapters.py); the per-component learning rates apply to them.
With `train_sampling_strategy: group_by_length` (transformers') batches hold rows of about the same length,
from lengths estimated without decoding images; with `pack_rows` rows are packed into padding-free sequences of
up to `max_length` tokens (train/packing.py; TRL does not pack vision datasets). Every row is checked before
step 1 (train/row_checks.py: images by their headers, text within `max_length`) and rows whose pixels fail in the
collator are skipped and counted (train/bad_rows.py).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from trl import SFTConfig, SFTTrainer

from bimode.compat.overrides import check_overrides
from bimode.compat.peft_api import expose_output_bias
from bimode.compat.trl_api import count_packed_tokens
from bimode.data.records import TARGET_MODES, Record
from bimode.errors import UsageError
from bimode.modes import ThinkingMode
from bimode.train.adapters import AdapterFields, build_peft_config
from bimode.train.bad_rows import BAD_ROWS_KEY, BadRowsMixin, RowImages
from bimode.train.checkpoint import StrictResumeMixin
from bimode.train.run import train_and_save
from bimode.train.start import StartFields, load_start
from bimode.train.components import COMPONENTS, freeze, optimizer_groups
from bimode.train.packing import collate_packed, packing_unsupported, plan_packs, use_varlen_attention
from bimode.train.precision import fp32_unless_asked_on_cpu
from bimode.train.row_checks import RowCheckFields, TextLimit, checked_rows, token_counter
from bimode.train.tokenization import collate, estimated_lengths, own_text, tokenize_example

logger = logging.getLogger(__name__)
_PREPARED = "rows are tokenized in bimode's collator as batches need them (no dataset is prepared up front)"
# TRL's SFT fields that bimode's own data path never reads: {field: (values that hold anyway, why no other
# can apply)}. Refused when set otherwise, rather than trained without.
BYPASSED_SFT_FIELDS = {
    "dataset_text_field": (("text",), "bimode reads record files (train_files), not a text column"),
    "dataset_kwargs": ((None,), _PREPARED),
    "dataset_num_proc": ((None,), _PREPARED),
    "model_init_kwargs": ((None,), "bimode loads the model itself: dtype, attn_implementation and quantization are "
                                "TRL's ModelConfig flags (--dtype, --attn_implementation, --load_in_4bit)"),
    "chat_template_path": ((None,), "targets are rendered with the model's own chat template (bimode's think "
                                 "template): change the template saved with the model instead"),
    "eos_token": ((None,), "each target ends with the chat template's end-of-turn token"),
    "pad_token": ((None,), "bimode's collator pads with the tokenizer's pad token (its eos token when it has none)"),
    "pad_to_multiple_of": (("auto",), "bimode's collator pads each batch to its longest row"),
    "truncation_mode": (("keep_start",), "rows are never truncated (a row over max_length is a bad row)"),
    "completion_only_loss": ((None, True), "the loss is always on the assistant response only"),
}
# transformers' optimizers that take the model or choose their parameter groups themselves (optim names contain these)
OWN_PARAMETER_OPTIMIZERS = ("galore", "apollo", "lomo")


@dataclass
class AnnealConfig(StartFields, RowCheckFields, AdapterFields, SFTConfig):
    target_modes: str = field(default="labelled", metadata={
        "help": "labelled: each record in its `mode` (else think if it has a trace); both: every record in "
                "both modes (records without a trace only non-thinking); think / no_think: one mode for all"})
    vision_lr: float | None = field(default=None, metadata={"help": "vision tower LR (default: learning_rate)"})
    projector_lr: float | None = field(default=None, metadata={"help": "projector LR (default: learning_rate)"})
    llm_lr: float | None = field(default=None, metadata={"help": "language model LR (default: learning_rate)"})
    freeze_vision: bool = field(default=False, metadata={"help": "keep the vision tower fixed"})
    freeze_projector: bool = field(default=False, metadata={"help": "keep the projector fixed"})
    freeze_llm: bool = field(default=False, metadata={"help": "keep the language model fixed"})
    nonthinking_loss_mask: bool = field(default=False, metadata={
        "help": "no loss on the empty think block of non-thinking targets (the paper's pre-training trick)"})
    pack_rows: bool = field(default=False, metadata={
        "help": "packed annealing: rows concatenated into sequences of up to max_length tokens, no padding, "
                "attention kept within each row (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL; others "
                "train padded, the reason logged). per_device_train_batch_size then counts packs"})
    max_length: int | None = field(default=1024, metadata={
        "help": "the most tokens of a row and, with pack_rows, of a pack. Rows are never truncated: a row whose "
                "text alone (question, system prompt and target, without template or image tokens) is longer "
                "is a bad row, found before step 1 (skip_bad_rows); null: no limit (pack_rows needs one)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "where to log (tensorboard by default; 'none' to turn off, 'wandb', ...)"})

    def __post_init__(self):
        fp32_unless_asked_on_cpu(self)
        for name, (holding, why) in BYPASSED_SFT_FIELDS.items():
            if getattr(self, name) not in holding:
                raise UsageError(f"{name} {getattr(self, name)!r}: bimode anneal does not read it ({why}); "
                                 "leave it unset")
        if any(kind in str(self.optim) for kind in OWN_PARAMETER_OPTIMIZERS):
            raise UsageError(own_parameters_refusal(self.optim))
        if self.packing or self.padding_free:  # TRL's own: they take text datasets only
            raise UsageError("packing / padding_free are TRL's text-only options; set pack_rows: true for "
                             "bimode's packed annealing of image-text rows")
        if self.pack_rows and not self.max_length:
            raise UsageError("pack_rows packs rows up to max_length: set max_length (R-4B: 16384)")
        if self.pack_rows and self.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            raise UsageError(f"pack_rows with train_sampling_strategy {self.train_sampling_strategy}: packs "
                             "already hold rows of mixed lengths without padding; use one or the other")
        super().__post_init__()

    def component_lrs(self) -> dict[str, float]:
        given = {"vision": self.vision_lr, "projector": self.projector_lr, "llm": self.llm_lr}
        return {c: self.learning_rate if lr is None else lr for c, lr in given.items()}

    def frozen(self) -> set[str]:
        flags = {"vision": self.freeze_vision, "projector": self.freeze_projector, "llm": self.freeze_llm}
        return {c for c, f in flags.items() if f}


def expand_targets(records: list[Record], target_modes: str) -> list[tuple[Record, str]]:
    """(record, target mode) pairs to train on."""
    pairs = []
    for r in records:
        if target_modes == "labelled":
            pairs.append((r, r.mode or (ThinkingMode.THINK if r.reasoning else ThinkingMode.NO_THINK)))
        elif target_modes == "both":
            pairs += [(r, ThinkingMode.THINK)] * bool(r.reasoning) + [(r, ThinkingMode.NO_THINK)]
        elif target_modes in TARGET_MODES:
            pairs.append((r, target_modes))
        else:
            raise UsageError(f"target_modes must be labelled, both, think or no_think, not {target_modes!r}")
    return pairs


class BimodeCollator:
    """Turns dataset rows ({"row": index into the (record, mode) pairs}) into a padded batch, or packs
    ({"pack": [indices]}, train/packing.py) into one padding-free sequence.

    TRL wants a `datasets.Dataset`; holding only indices there and tokenizing here keeps images decoded
    only when a batch needs them.
    """

    def __init__(self, pairs, processor, mask_empty_think: bool = False, model=None, images: RowImages | None = None):
        # model: the model trained, whose own get_rope_index gives multi-axis models' packed rows their positions
        self.pairs, self.processor, self.mask, self.model = pairs, processor, mask_empty_think, model
        # images: each pair's images, decoded as batches need them; a pair whose pixels fail gives way to the next
        self.images = images if images is not None else RowImages([record for record, _ in pairs])
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, rows):
        packed = "pack" in rows[0]
        indices = [i for row in rows for i in row["pack"]] if packed else [row["row"] for row in rows]
        examples, bad = [], []
        for i in indices:
            i, images, failed = self.images.load(i)
            bad += failed
            examples.append(tokenize_example(self.processor, *self.pairs[i], self.mask, images=images))
        batch = (collate_packed(examples, self.processor, self.model) if packed
                 else collate(examples, self.processor, self.pad_id))
        if bad:  # for the trainer, which counts and records them (this may run in a DataLoader worker)
            batch[BAD_ROWS_KEY] = bad
        return batch


class AnnealTrainer(BadRowsMixin, StrictResumeMixin, SFTTrainer):
    """SFTTrainer with parameter groups per model component, each at its own learning rate, for the optimizer
    `optim` names (transformers' factory: adamw_torch, adamw_torch_fused, sgd, adafactor, adamw_8bit, ...), and
    rows whose images fail to decode counted (train/bad_rows.py)."""

    def __init__(self, *args, component_lrs: dict[str, float], **kwargs):
        check_overrides(type(self))  # a library release that changed an overridden private method fails here
        self.component_lrs = component_lrs
        super().__init__(*args, **kwargs)
        expose_output_bias(self.model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.note_bad_rows(inputs.pop(BAD_ROWS_KEY, []))  # on every process, every micro-batch
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.model.training and "attention_mask" not in inputs and "position_ids" in inputs:
            count_packed_tokens(self, inputs["position_ids"])  # Qwen-VL packs: TRL counts (4, 1, T) as 1 token
        return out

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = optimizer_groups(self.model, self.component_lrs, self.args.weight_decay)
            for g in groups:
                g.pop("component")
            self.optimizer = component_optimizer(self.args, self.model, groups)
        return self.optimizer


def own_parameters_refusal(optim) -> str:
    return (f"optim {optim}: this optimizer picks its own parameters, so bimode's per-component learning rates "
            "(vision_lr, projector_lr, llm_lr) and frozen components cannot apply; choose another optim "
            "(adamw_torch, adamw_torch_fused, adamw_8bit, sgd, adafactor, ...)")


def component_optimizer(args, model, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names, built by transformers' public factory
    (`Trainer.get_optimizer_cls_and_kwargs`: betas, eps, `optim_args`), over bimode's per-component groups,
    whose learning rate and weight decay win over the factory's defaults. Optimizers that choose their own
    parameters (GaLore, APOLLO, LOMO, layer-wise, optimizer factories) would drop those groups: refused."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if {"params", "model", "optimizer_dict"} & set(kwargs) or not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise UsageError(own_parameters_refusal(args.optim))
    optimizer = optimizer_cls(groups, **kwargs)
    if kwargs.get("optim_bits") == 8:  # as transformers does for 8-bit bitsandbytes: embeddings stay 32-bit
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def build_trainer(cfg: AnnealConfig, model=None, processor=None, model_args=None) -> AnnealTrainer:
    """model_args: TRL's ModelConfig (use_peft, lora_r, ...; None: full fine-tuning of cfg.model_path)."""
    model, processor, read = load_start(cfg, model, processor, model_args=model_args)
    tokenizer = getattr(processor, "tokenizer", processor)
    rows = checked_rows(cfg, read, text=target_text_limit(cfg, tokenizer))
    pairs, origins = [], []
    for row in rows:
        for pair in expand_targets([row.record], cfg.target_modes):
            pairs.append(pair)
            origins.append((row.file, row.row))
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)  # the permutation shuffling the pairs themselves gives
    pairs, origins = [pairs[i] for i in order], [origins[i] for i in order]
    # LoRA: the trainer wraps the model (TRL's path); frozen components get no adapters
    peft_config = build_peft_config(model_args, model, tokenizer, cfg, cfg.frozen()) if model_args is not None else None
    if peft_config is None and not any(freeze(model, cfg.frozen()).values()):
        raise UsageError("every component is frozen: nothing to train")
    cfg.dataset_kwargs = {"skip_prepare_dataset": True}
    cfg.remove_unused_columns = False
    return AnnealTrainer(
        model=model,
        args=cfg,
        train_dataset=training_rows(cfg, model, processor, pairs),
        data_collator=BimodeCollator(pairs, processor, cfg.nonthinking_loss_mask, model,
                                     RowImages([record for record, _ in pairs], origins)),
        processing_class=processor,
        component_lrs=cfg.component_lrs(),
        peft_config=peft_config,
    )


def target_text_limit(cfg: AnnealConfig, tokenizer) -> TextLimit | None:
    """max_length on a row's own text: its system prompt, question and the longest target it trains on (the
    reasoning and answer of a thinking target). Template and image tokens are not counted, so a row refused is
    surely over max_length, and a row whose images take it over is not found here."""
    if not cfg.max_length:
        return None

    def text_of(record: Record) -> tuple[str, str]:
        texts = [own_text(record.messages(with_target=mode)) for _, mode in expand_targets([record], cfg.target_modes)]
        sizes = {"question": len(record.question), "reasoning": len(record.reasoning or ""),
                 "answer": len(record.answer) + len(record.direct_answer or "")}
        return max(texts, key=len), max(sizes, key=sizes.get)

    return TextLimit(text_of, token_counter(tokenizer), cfg.max_length, f"max_length {cfg.max_length}")


def training_rows(cfg: AnnealConfig, model, processor, pairs) -> datasets.Dataset:
    """What the sampler draws from: indices of (record, mode) pairs, or packs of them with `pack_rows`."""
    if cfg.pack_rows:
        reason = packing_unsupported(model)
        if reason is None:
            packs = plan_packs(estimated_lengths(processor, pairs), cfg.max_length)
            logger.info("pack_rows: %d rows in %d packs of up to %d tokens", len(pairs), len(packs), cfg.max_length)
            use_varlen_attention(model)
            return datasets.Dataset.from_dict({"pack": packs})
        logger.warning("pack_rows: this model trains padded: %s", reason)
    rows = {"row": list(range(len(pairs)))}
    if cfg.train_sampling_strategy in ("group_by_length", "batch_rebalance"):  # transformers' samplers read it
        rows[cfg.length_column_name] = estimated_lengths(processor, pairs)
    return datasets.Dataset.from_dict(rows)


def run_anneal(cfg: AnnealConfig) -> Path:
    return train_and_save(build_trainer(cfg), cfg.resume_from_checkpoint)


__all__ = ["AnnealConfig", "AnnealTrainer", "COMPONENTS", "build_trainer", "expand_targets", "run_anneal"]
