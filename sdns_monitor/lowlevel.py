"""The low-level score beside SDNS: a kernel k-NN density of compact pixel features.

The features a self-distilled encoder learns are invariant to much of what makes a frame look
wrong at the pixel level (thin strokes instead of filled shapes, a black or noisy sensor):
METHOD.md's prototype table shows the pixel kernel score catching what SDNS misses. The
combined score adds the two, each standardised on in-distribution validation images:

    combined(x) = (a_sdns(x) - mean_sdns) / std_sdns + (a_low(x) - mean_low) / std_low

It is kept apart from the faithful SDNS score: a bundle stores both calibrations, and
`Detector(score="sdns")` always gives the paper's score.

Low-level features are the prepared frame average-pooled to at most 256 values (16 x 16 for
one channel, 9 x 9 x 3 for colour), centred on their mean and L2-normalised. A flat frame
(black, grey, fog on the lens) becomes the zero vector, similar to nothing, so it scores as far
from every reference frame; centring also keeps the shared bright background of noise from
looking like a filled shape. Measured on Fashion-MNIST training images (10k bank, 2k held-out
validation images; no test set), AUROC of the low-level score without / with centring:
shifted validation images 0.977 / 0.993, uniform noise 0.901 / 1.000, stripes 0.986 / 0.999,
flat grey 0.870 / 1.000 (pooling to 28 x 28 instead of 16 x 16 changed none by more than 0.01).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_DIM = 256
DEFAULT_K = 200
FLAT = 1e-4  # centred norm below which a pooled frame counts as flat (in [0, 1] units)


def pooled_side(size: int, channels: int) -> int:
    """Side of the pooled image: the largest that keeps side^2 x channels <= MAX_DIM."""
    return max(1, min(size, math.isqrt(MAX_DIM // channels)))


def lowlevel_features(prepared: np.ndarray, side: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 N x S x S x C (see Detector.prepare) -> float32 N x (side^2 C): pooled, centred,
    unit norm (0 for a flat frame)."""
    out = []
    for i in range(0, prepared.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(prepared[i : i + chunk]))
        x = x.permute(0, 3, 1, 2).float() / 255.0
        x = F.adaptive_avg_pool2d(x, side).flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        norm = x.norm(dim=1, keepdim=True)
        flat = norm < FLAT  # rounding leaves a flat frame a tiny residue: make it exactly 0
        out.append(torch.where(flat, torch.zeros_like(x), x / norm.clamp_min(FLAT)))
    if not out:
        return torch.zeros(0, side * side * prepared.shape[-1])
    return torch.cat(out)
