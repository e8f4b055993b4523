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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sdns_monitor.index import ReferenceIndex
from sdns_monitor.scoring import combined_score

if TYPE_CHECKING:
    from sdns_monitor.bundle import LowLevelSpec

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


# --- image statistics: exposure, contrast, sharpness, noise and colour ----------------------
#
# The pooled features above are centred and normalised, so they cannot see a frame that is
# darker, flatter, blurrier or tinted as long as its layout holds, and the encoder is trained
# by its augmentations to ignore exactly those changes. These statistics keep them. Each is
# one number per frame; `STATISTICS` names them in order (colour frames add the per-channel
# and saturation entries). The score is the mean distance to the nearest reference frames in
# statistics standardised on the training images (`statistics_score`).

STATISTICS_K = 10
_LOG_FLOOR = 1e-4  # in [0, 1] units, so a flat frame's log energies stay finite


def statistics_names(channels: int) -> list[str]:
    per_channel = [f"{kind}_{c}" for kind in ("mean", "std") for c in range(channels)]
    colour = ["saturation"] if channels == 3 else []
    return (
        per_channel
        + colour
        + [
            "laplacian",
            "laplacian_half",
            "gradient",
            "laplacian_median",
            "clipped_high",
            "clipped_low",
        ]
    )


def _laplacian(luma: torch.Tensor) -> torch.Tensor:
    """|4-neighbour Laplacian| of N x H x W images, borders replicated, flattened to N x HW."""
    p = F.pad(luma.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    centre = p[:, 1:-1, 1:-1]
    lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * centre
    return lap.abs().flatten(1)


def image_statistics(prepared: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """uint8 N x S x S x C -> float32 N x D statistics (`statistics_names(C)`): per-channel
    mean and standard deviation (exposure, contrast, colour balance), mean saturation, the
    log energy of the luma Laplacian at full and half resolution and of the gradient
    (sharpness, and with the two scales apart, noise vs blur), the log median absolute
    Laplacian (a robust noise level), and the fractions of clipped bright and dark pixels."""
    channels = prepared.shape[-1]
    out = []
    for i in range(0, prepared.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(prepared[i : i + chunk])).float() / 255.0
        pixels = x.flatten(1, 2)  # N x HW x C, as the frames are laid out
        parts = [pixels.mean(1), pixels.std(1, correction=0)]
        if channels == 3:
            parts.append((x.amax(3) - x.amin(3)).flatten(1).mean(1, keepdim=True))
            luma = x @ x.new_tensor([0.299, 0.587, 0.114])
        else:
            luma = x[..., 0]
        lap = _laplacian(luma)
        half = (
            _laplacian(F.avg_pool2d(luma.unsqueeze(1), 2).squeeze(1))
            if luma.shape[-1] >= 4
            else lap
        )
        dy = (luma[:, 1:, :] - luma[:, :-1, :]).abs().flatten(1).mean(1)
        dx = (luma[:, :, 1:] - luma[:, :, :-1]).abs().flatten(1).mean(1)
        y = luma.flatten(1)
        # The lower median, as torch.median gives it, by selection instead of a sort.
        median = lap.kthvalue((lap.shape[1] + 1) // 2, dim=1).values
        parts.append(
            torch.stack(
                [
                    (lap.mean(1) + _LOG_FLOOR).log(),
                    (half.mean(1) + _LOG_FLOOR).log(),
                    (0.5 * (dx + dy) + _LOG_FLOOR).log(),
                    (median + _LOG_FLOOR).log(),
                    (y > 0.98).float().mean(1),
                    (y < 0.02).float().mean(1),
                ],
                dim=1,
            )
        )
        out.append(torch.cat(parts, dim=1))
    if not out:
        return torch.zeros(0, len(statistics_names(channels)))
    return torch.cat(out)


def statistics_score(
    stats: torch.Tensor, reference: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, k: int
) -> np.ndarray:
    """Mean Euclidean distance of each frame's standardised statistics to its k nearest
    reference frames' (higher = more out-of-distribution; float64)."""
    if stats.shape[0] == 0:
        return np.zeros(0)
    z = (stats - mean) / std
    ref = (reference - mean) / std
    k = min(k, ref.shape[0])
    out = []
    for i in range(0, z.shape[0], 1024):
        d = torch.cdist(z[i : i + 1024].double(), ref.double())
        out.append(d.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out).numpy()


# --- the combined score ----------------------------------------------------------------------


class LowLevelScorer:
    """The low-level parts of a bundle's combined score, ready to score prepared frames.

    `bank` is the bundle's low-level bank (pooled pixels, then statistics; see LowLevelSpec).
    Only the parts the spec's combined score uses are computed, unless asked for.
    """

    def __init__(self, spec: LowLevelSpec, bank: np.ndarray, device: torch.device) -> None:
        self.spec = spec
        n_stats = len(spec.statistics.names) if spec.statistics is not None else 0
        pixel_dim = bank.shape[1] - n_stats
        self.pixels = ReferenceIndex(np.ascontiguousarray(bank[:, :pixel_dim]), "Flat", device)
        self.pixels.prepare(spec.k)
        self.statistics: torch.Tensor | None = None
        if spec.statistics is not None:
            self.statistics = torch.from_numpy(np.ascontiguousarray(bank[:, pixel_dim:]))
            self._mean = torch.tensor(spec.statistics.mean)
            self._std = torch.tensor(spec.statistics.std)

    def part_scores(
        self, prepared: np.ndarray, parts: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Score of each part (default: the combined score's) for prepared frames."""
        out: dict[str, np.ndarray] = {}
        for part in parts or self.spec.parts:
            if part == "pixels":
                feats = lowlevel_features(prepared, self.spec.side)
                out[part] = self.pixels.kernel_scores(feats, self.spec.k, self.spec.temperature)
            elif part == "statistics" and self.statistics is not None:
                assert self.spec.statistics is not None
                out[part] = statistics_score(
                    image_statistics(prepared),
                    self.statistics,
                    self._mean,
                    self._std,
                    self.spec.statistics.k,
                )
            else:
                raise ValueError(f"the bundle's low-level bank has no {part!r} part")
        return out

    def combined(self, sdns: np.ndarray, prepared: np.ndarray) -> np.ndarray:
        """The combined score of prepared frames whose SDNS scores are `sdns`."""
        return combine(self.spec, sdns, self.part_scores(prepared))


def combine(spec: LowLevelSpec, sdns: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """SDNS and the spec's parts, each standardised as the spec records, added."""
    terms = [(sdns, spec.sdns_mean, spec.sdns_std)]
    for part in spec.parts:
        if part == "pixels":
            terms.append((parts[part], spec.low_mean, spec.low_std))
        else:
            assert spec.statistics is not None
            terms.append((parts[part], spec.statistics.score_mean, spec.statistics.score_std))
    return combined_score(terms)
