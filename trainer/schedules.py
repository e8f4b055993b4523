"""Per-step schedules (DINO's helpers): each returns one value per optimisation step, so a run
of any length keeps every schedule proportional to its number of epochs."""

from __future__ import annotations

import numpy as np


def cosine(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_from: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_from` to `start` over `warmup_steps`, then a half cosine from
    `start` to `end` over the remaining steps."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    warmup_steps = min(warmup_steps, total_steps)
    warm = (
        np.linspace(warmup_from, start, warmup_steps, endpoint=False)
        if warmup_steps
        else np.array([])
    )
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    body = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, body]).astype(np.float64)


def linear(start: float, end: float, total_steps: int) -> np.ndarray:
    """Linear from `start` (first step) to `end` (last step)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    return np.linspace(start, end, total_steps, dtype=np.float64)
