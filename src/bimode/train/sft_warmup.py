"""A plain PyTorch SFT loop for small models: the annotator warm-up and fast tests.

Large-scale annealing goes through TRL (bimode.train.anneal); this loop exists because the embedded default
trains in minutes where per-step framework overhead matters, and tests need a trained model in seconds.
Recipe from docs/embedded_default.md: AdamW (0.9, 0.98), 5% warm-up, cosine to 10% of the peak rate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from bimode.data.records import TARGET_MODES, Record
from bimode.train.tokenization import collate, tokenize_example


@dataclass
class SimpleSFTConfig:
    steps: int = 600
    batch_size: int = 32  # records per step; each contributes one sequence per target mode
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    seed: int = 0
    progress: bool = True


def cosine_lr(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(model, processor, records: list[Record], modes=TARGET_MODES,
              cfg: SimpleSFTConfig = SimpleSFTConfig()) -> list[float]:
    """Train on every record in each of `modes` (a record's own `mode` wins when modes is None).

    Returns the loss per step.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    examples = []
    for record in records:
        for mode in (modes if modes is not None else [record.mode]):
            examples.append(tokenize_example(processor, record, mode))
    per_record = len(modes) if modes is not None else 1
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, cfg.steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    model.train()
    losses = []
    steps = range(cfg.steps)
    if cfg.progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sft", unit="step")
    order: list[int] = []
    for _ in steps:
        if len(order) < cfg.batch_size * per_record:
            order += rng.sample(range(len(examples)), len(examples))
        batch_ids, order = order[: cfg.batch_size * per_record], order[cfg.batch_size * per_record:]
        batch = collate([examples[i] for i in batch_ids], processor, tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cfg.progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
