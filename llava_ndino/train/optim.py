"""Optimiser factory: torch AdamW, or bitsandbytes 8-bit AdamW (plain or paged) for QLoRA recipes."""

from __future__ import annotations

import torch

BETAS, EPS = (0.9, 0.999), 1e-8


def make_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    """Return the ``train.optimizer`` named ``name`` over ``param_groups`` (each with its lr/weight decay)."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, betas=BETAS, eps=EPS)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(param_groups, betas=BETAS, eps=EPS)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(param_groups, betas=BETAS, eps=EPS)
    raise ValueError(f"unknown optimizer {name!r}: use adamw, adamw_8bit or paged_adamw_8bit")
