"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio`` of the peak."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: ``peak (step + 1) /
    warmup`` during warmup, then ``min + (peak - min) (1 + cos(pi p)) / 2`` with ``p`` going 0 -> 1 over
    the remaining steps (the last step gets ``min = min_ratio peak``)."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got {total_steps}, {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps - 1)
    p = min(1.0, (step - warmup_steps) / decay)
    lo = min_ratio * peak_lr
    return lo + (peak_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
