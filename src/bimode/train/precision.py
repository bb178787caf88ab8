"""Precision defaults for TRL's configs on machines without a GPU."""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def fp32_unless_asked_on_cpu(cfg) -> None:
    """TRL resolves an unset `bf16` to True. On a CPU that means bf16 autocast, which CPUs without AVX-512 BF16
    or AMX emulate many times slower than fp32 (measured: a test that took 22 s on one 2-core machine took
    418 s on another), and which the small models trained on CPUs do not need: there, unset means fp32.
    An explicit `bf16: true` is kept."""
    if cfg.bf16 is None and not cfg.fp16 and (cfg.use_cpu or not accelerator_available()):
        cfg.bf16 = False
