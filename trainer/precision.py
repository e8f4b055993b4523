"""The training precision: bf16 autocast or fp32, chosen by measuring where that is needed.

`precision: auto` is bf16 autocast on a GPU. On a CPU it is bf16 only when oneDNN runs bf16
natively (AVX-512 BF16 or AMX; without them bf16 is emulated and slower) and a timed training
step is at least BF16_MIN_SPEEDUP faster than in fp32. The step is timed on copies of the
networks and the loss, so training itself is unchanged; under torchrun every process trains
in rank 0's choice. `choose_precision` returns what the manifest records.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.loop import Trainer

# bf16 must be at least this much faster than fp32, measured, for `auto` to choose it.
BF16_MIN_SPEEDUP = 1.1
# Training steps timed per precision by `auto` on a CPU (after one warm-up step each).
PRECISION_PROBE_STEPS = 2


def autocast(device: torch.device, use_bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); without it bf16
    is emulated and slower than fp32."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())


def choose_precision(trainer: Trainer) -> tuple[bool, dict[str, Any]]:
    """(bf16?, the record) for the trainer's `precision` setting and device (module docstring)."""
    cfg, device = trainer.cfg, trainer.device
    if cfg.precision != "auto":
        return cfg.precision == "bf16", {
            "chosen": cfg.precision,
            "method": "set by the recipe or --precision",
        }
    if device.type == "cuda":
        return True, {"chosen": "bf16", "method": "auto: bf16 autocast on a GPU"}
    if not cpu_has_bf16():
        return False, {"chosen": "fp32", "method": "auto: this CPU has no native bf16 (oneDNN)"}
    seconds = {p: time_step(trainer, p == "bf16") for p in ("fp32", "bf16")}
    choice = torch.tensor([seconds["fp32"] >= BF16_MIN_SPEEDUP * seconds["bf16"]])
    if dist.is_initialized():
        dist.broadcast(choice, src=0)  # every process trains in rank 0's precision
    bf16 = bool(choice.item())
    return bf16, {
        "chosen": "bf16" if bf16 else "fp32",
        "method": f"auto: bf16 when a timed step is >= {BF16_MIN_SPEEDUP}x faster",
        "seconds_per_step": seconds,
    }


def time_step(trainer: Trainer, bf16: bool) -> float:
    """Seconds of one forward and backward pass of a training batch, on copies of the
    trainer's networks and loss (the best of PRECISION_PROBE_STEPS after a warm-up)."""
    from trainer.loop import _to_float

    cfg = trainer.cfg
    student, teacher = copy.deepcopy(trainer.student_module), copy.deepcopy(trainer.teacher)
    loss_fn = copy.deepcopy(trainer.loss)  # its centre moves on every call
    gen = torch.Generator(trainer.device).manual_seed(cfg.seed)
    n = min(cfg.batch_size // trainer.info.world_size, trainer.images.shape[0])
    x = _to_float(trainer.images[:n], trainer.device)
    a = None if trainer.aux is None else _to_float(trainer.aux[:n], trainer.device)
    crops, n_pos, n_neg = trainer._views(x, a, gen)
    n_sources = 0 if n_neg == 0 else n_neg // (1 + cfg.n_local)
    best = math.inf
    for i in range(PRECISION_PROBE_STEPS + 1):
        t0 = time.perf_counter()
        with autocast(trainer.device, bf16):
            with torch.no_grad():
                teacher_out = teacher(crops[:2])
            pos, neg = trainer._split(student(crops), n_pos, n_sources)
            parts = loss_fn(pos, teacher_out, neg, cfg.teacher_temp)
        parts.total.backward()
        student.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best
