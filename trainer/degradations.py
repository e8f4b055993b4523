"""Synthetic camera degradations of held-out reference images: the validation shifts `fit`
chooses the bundle's score on (trainer.selection).

A monitor has to see what goes wrong with a camera: it loses focus or shakes, the sensor gets
noisy, the exposure or white balance drifts, something covers part of the lens, the encoder
starves the bit rate, the feed freezes on a flat frame. Validation images are the reference
data's own, so no fault data is needed; each family below turns them into frames a camera
with that fault would deliver, at a level drawn per image between a mild and a clear case.
The levels are this module's own, in units of the frame (fractions of its side, of full
scale), so they mean the same at every frame size; blurs have a floor in pixels, so that a
mild one still blurs a small frame.

`degrade(images, family, rng)` applies one family; `FAMILIES` lists them, and
`families_for(channels)` the ones that apply to grayscale or colour frames. Every family is
seeded by the caller's generator, so a fit is repeatable.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Degrade = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _per_image(n: int, lo: float, hi: float, rng: np.random.Generator) -> torch.Tensor:
    """N levels drawn uniformly in [lo, hi), shaped to broadcast over N x C x H x W."""
    return torch.from_numpy(rng.uniform(lo, hi, n)).float().view(n, 1, 1, 1)


def _filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter image i with kernels[i] (N x K x K, each summing to 1), every channel alike,
    borders replicated."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # N*C x 1 x K x K
    padded = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def defocus(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A lens out of focus: a disk blur of radius 1.5-6% of the side (at least 1 px)."""
    n, _, h, w = x.shape
    radius = np.maximum(rng.uniform(0.015, 0.06, n) * max(h, w), 1.0)
    half = max(1, int(np.ceil(radius.max())))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    dist = np.sqrt(yy**2 + xx**2)[None]
    # A disk with an antialiased rim, so small radii still blur a little.
    disk = np.clip(radius[:, None, None] + 0.5 - dist, 0.0, 1.0)
    kernels = torch.from_numpy(disk / disk.sum(axis=(1, 2), keepdims=True)).float()
    return _filter(x, kernels)


def motion_blur(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A shaking mount or a fast pan: a straight streak of 3-12% of the side in a random
    direction (at least 2 px)."""
    n, _, h, w = x.shape
    length = np.maximum(rng.uniform(0.03, 0.12, n) * max(h, w), 2.0)
    angle = rng.uniform(0, np.pi, n)
    half = max(1, int(np.ceil(length.max() / 2)))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    along = xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]
    across = -xx[None] * np.sin(angle)[:, None, None] + yy[None] * np.cos(angle)[:, None, None]
    line = np.clip(1.0 - np.abs(across), 0, 1) * np.clip(
        length[:, None, None] / 2 + 0.5 - np.abs(along), 0, 1
    )
    kernels = torch.from_numpy(line / line.sum(axis=(1, 2), keepdims=True)).float()
    return _filter(x, kernels)


def sensor_noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A failing or high-gain sensor: Gaussian noise of 4-20% of full scale."""
    sigma = _per_image(x.shape[0], 0.04, 0.2, rng)
    noise = torch.from_numpy(rng.standard_normal(x.shape)).float()
    return x + sigma * noise


def overexposure(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Too much light (a stuck iris, direct sun): exposure gain 1.6-4, clipped."""
    return x * _per_image(x.shape[0], 1.6, 4.0, rng)


def underexposure(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Too little light (night, a failed illuminator): gain 0.08-0.45 with the sensor noise
    that the missing light leaves (2% of full scale)."""
    gain = _per_image(x.shape[0], 0.08, 0.45, rng)
    return x * gain + 0.02 * torch.from_numpy(rng.standard_normal(x.shape)).float()


def haze(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Fog, a smeared or condensed lens: the frame blended 30-80% towards a bright veil."""
    a = _per_image(x.shape[0], 0.3, 0.8, rng)
    veil = _per_image(x.shape[0], 0.6, 0.9, rng)
    return (1 - a) * x + a * veil


def colour_cast(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A white balance gone wrong: per-channel gains 1 +- 0.15-0.5 along a random tint."""
    n, c = x.shape[:2]
    tint = rng.standard_normal((n, c))
    tint -= tint.mean(axis=1, keepdims=True)
    tint /= np.maximum(np.abs(tint).max(axis=1, keepdims=True), 1e-6)
    gains = 1.0 + rng.uniform(0.15, 0.5, (n, 1)) * tint
    return x * torch.from_numpy(gains).float().view(n, c, 1, 1)


def channel_fault(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A broken cable or a wrong pixel format: one channel dead, or the channels reordered."""
    n = x.shape[0]
    out = x.clone()
    dead = rng.random(n) < 0.5
    for i in range(n):
        if dead[i]:
            out[i, rng.integers(3)] = 0.0
        else:
            out[i] = x[i, rng.permutation(3)] if rng.random() < 0.5 else x[i].flip(0)
    return out


def occlusion(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Something in front of the lens: a box of 15-50% of the frame's area in a flat dark or
    grey colour."""
    n, _, h, w = x.shape
    out = x.clone()
    for i in range(n):
        area = rng.uniform(0.15, 0.5)
        aspect = np.exp(rng.uniform(-0.7, 0.7))
        bh = min(h, max(1, round(np.sqrt(area * h * w / aspect))))
        bw = min(w, max(1, round(area * h * w / bh)))
        top, left = rng.integers(h - bh + 1), rng.integers(w - bw + 1)
        out[i, :, top : top + bh, left : left + bw] = float(rng.uniform(0.0, 0.5))
    return out


def flat_frame(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A dead feed (no signal, a lens cap, a frozen encoder): one flat colour with faint
    noise."""
    n, c = x.shape[:2]
    colour = torch.from_numpy(rng.uniform(0, 1, (n, c))).float().view(n, c, 1, 1)
    return colour + 0.01 * torch.from_numpy(rng.standard_normal(x.shape)).float()


def pixelate(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A stream scaled down on the way (a wrong resolution profile): the frame shrunk by 3-6x
    and blown up again."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i, factor in enumerate(rng.uniform(3, 6, n)):
        small = F.interpolate(
            x[i : i + 1], size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="area"
        )
        out[i : i + 1] = F.interpolate(small, size=(h, w), mode="nearest")
    return out


def compression(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A starved encoder: JPEG at quality 4-15 (PIL's encoder)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        pixels = (x[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(4, 16)))
        decoded = np.asarray(Image.open(buffer).convert(image.mode), dtype=np.float32) / 255.0
        out[i] = torch.from_numpy(decoded.reshape(pixels.shape)).permute(2, 0, 1)
    return out


def upside_down(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A camera mounted the wrong way: turned by 180 degrees, or by 90 either way."""
    turns = rng.choice([1, 2, 3], x.shape[0])
    return torch.stack(
        [torch.rot90(img, int(t), dims=(1, 2)) for img, t in zip(x, turns, strict=True)]
    )


FAMILIES: dict[str, Degrade] = {
    "defocus": defocus,
    "motion-blur": motion_blur,
    "sensor-noise": sensor_noise,
    "overexposure": overexposure,
    "underexposure": underexposure,
    "haze": haze,
    "colour-cast": colour_cast,
    "channel-fault": channel_fault,
    "occlusion": occlusion,
    "flat-frame": flat_frame,
    "pixelate": pixelate,
    "compression": compression,
    "upside-down": upside_down,
}
COLOUR_ONLY = frozenset({"colour-cast", "channel-fault"})


def families_for(channels: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The families that apply to frames of `channels` channels, less `exclude`."""
    return [
        name
        for name in FAMILIES
        if name not in exclude and (channels == 3 or name not in COLOUR_ONLY)
    ]


def degrade(images: np.ndarray, family: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 N x H x W x C images under one degradation family (levels drawn per image).
    The frames are square, so quarter turns keep their shape."""
    if family not in FAMILIES:
        raise ValueError(f"unknown degradation {family!r}; choose one of {', '.join(FAMILIES)}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    y = FAMILIES[family](x, rng)
    return (y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
