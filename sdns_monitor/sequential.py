"""The camera test: is this camera's stream of p-values still what healthy frames give?

Frame p-values are the evidence; the decision is a CUSUM over each camera's sequence of them
(METHOD.md "Camera alarms"). Each frame adds the log of a likelihood ratio,

    e(p) = log( mean_k k * p^(k - 1) / c ),    k in KAPPAS,

the ratio of a mixture of power densities (small p-values likely) to the uniform density that
healthy p-values have, and the statistic is S_t = max(0, S_{t-1} + e(p_t)). The camera alarms
when S_t exceeds h, and its alarm clears once S_t is back at 0 (it is held at h meanwhile, so
clearing takes about h / |E e(p)| healthy frames, some twenty-five).

Why this test. A conformal test martingale (the product of the same ratios) bounds the false
alarm probability over an infinite stream by Ville's inequality, but it never restarts: on an
unbounded stream of slightly non-uniform p-values it drifts up and alarms eventually. The
CUSUM is the martingale restarted at every frame (its maximum over all restarts), and gives the
guarantee in the form a monitor needs, a run length: when healthy p-values are independent and
E e(p) <= 0, i.e. E[ratio] <= 1, Lorden's bound gives an expected run between false alarms of
at least e^h frames. So h = log(ERT) sets the test from one number, with no simulation to
trust; `benchmarks/alarms.py` measures the run length it really gives and the delays.

The margin. Healthy p-values of a real camera are not exactly uniform: they come from one fixed
calibration set, and the camera's normal frames differ a little from the reference images (the
demo's healthy cameras are flagged at 1.4% for a nominal 1%). The constant c makes the ratio
average one when healthy p-values are `margin` times smaller than uniform (p ~ U / margin, i.e.
flagged `margin` times as often as the alarm rate says): c = mean_k margin^(1 - k). The bound
then holds for any camera at most that far from uniform. Conformal p-values are super-uniform
(P(p <= t) <= t), so exact exchangeability needs no margin at all.

KAPPAS were chosen on simulated location shifts of normal scores (AUROC 0.76 to 0.98; no test
data): with margin 1.5 and h = log(6.3e7), the median delay is 13 frames at frame AUROC 0.95
(90% within 17), 29 at 0.86, 86 at 0.76.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KAPPAS = (0.25, 0.5, 0.75)
DEFAULT_MARGIN = 1.5


def evidence(p_values: np.ndarray, margin: float | np.ndarray = DEFAULT_MARGIN) -> np.ndarray:
    """e(p) of each p-value (float64): positive for p-values smaller than healthy ones.
    `margin`: one for all, or one per p-value (frames of models with different margins)."""
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-12, 1.0)
    ratio = np.mean([k * p ** (k - 1.0) for k in KAPPAS], axis=0)
    m = np.asarray(margin, dtype=np.float64)
    c = np.mean([m ** (1.0 - k) for k in KAPPAS], axis=0)
    return np.asarray(np.log(ratio / c))


def camera_margin(configured: float | None, held_out_ratio: float | None) -> float:
    """The margin a model's frames are tested with: the configured one (`camera_margin`), else
    the larger of DEFAULT_MARGIN and how many times the alarm rate the bundle's held-out
    reference images were flagged (bundle.HeldOutCheck; fit measures it). The held-out images
    come from the reference data, so the ratio sees the calibration set's own error, not how a
    camera's frames differ from the reference: DEFAULT_MARGIN is there for that."""
    if configured is not None:
        return configured
    return max(DEFAULT_MARGIN, held_out_ratio or 0.0)


def threshold(ert_frames: float) -> float:
    """h for an expected run of at least `ert_frames` healthy frames between false alarms."""
    if ert_frames <= 1:
        raise ValueError(
            f"the expected run between false alarms must exceed 1 frame, got {ert_frames}"
        )
    return math.log(ert_frames)


@dataclass
class Cusum:
    """One camera's statistic. `step` returns True on the frame that opens an alarm."""

    h: float
    s: float = 0.0
    alarmed: bool = False

    def step(self, e: float) -> bool:
        self.s = max(0.0, self.s + e)
        if self.alarmed:
            self.s = min(self.s, self.h)  # held at h: clearing takes h of healthy evidence
            return False
        if self.s > self.h:
            self.alarmed = True
            self.s = self.h
            return True
        return False

    def cleared(self) -> bool:
        """True once an alarmed statistic is back at 0 (call after `step`)."""
        if self.alarmed and self.s <= 0.0:
            self.alarmed = False
            return True
        return False


def run_lengths(evidence_stream: np.ndarray, h: float) -> list[int]:
    """Frames between alarms of a CUSUM restarted after each alarm (the false alarms of a
    healthy stream, in simulation)."""
    out, s, since = [], 0.0, 0
    for e in evidence_stream:
        since += 1
        s = max(0.0, s + float(e))
        if s > h:
            out.append(since)
            s, since = 0.0, 0
    return out
