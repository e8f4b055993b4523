"""DINO multi-crop augmentation, batched on the images' device.

One call of :meth:`MultiCrop.views` turns a batch ``N x C x H x W`` (floats in [0, 1])
into the crops SDNS trains on: global crops then local crops, each a tensor
``N x C x S x S`` normalised with the data set's mean/std. Every random choice is drawn
per image from an explicit ``torch.Generator`` and applied with masks, so the cost is a
handful of batched kernels per view, never a Python loop over images.

Recipe per view (DINO): random resized crop with horizontal flip (one affine sampling
step), optionally the SDNS shift T (negatives only: crop -> T -> photometric), colour
jitter, grayscale, Gaussian blur, solarize (second global crop only), clamp, normalise.

Example:
    >>> crops = MultiCrop(CropConfig(global_size=28, local_size=14, n_local=4), [0.5], [0.25])
    >>> g = torch.Generator().manual_seed(0)
    >>> positives = crops.views(x, g)  # 2 global + 4 local
    >>> negatives = crops.views(x, g, shift_kind="rot", n_global=1)  # 1 global + 4 local of T(x)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.negatives import SHIFTS, shift

# ITU-R 601 luma weights, as PIL's convert("L") in DINO's pipeline (torchvision: 0.2989 R).
_LUMA = (0.299, 0.587, 0.114)
# Aspect-ratio range of DINO's (and torchvision's) RandomResizedCrop.
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Crop boxes tried per image before falling back to the whole image (torchvision: 10).
_CROP_ATTEMPTS = 10
# DINO's blur sigmas are in pixels of a 224 px crop; they are scaled to the crop size.
_BLUR_REFERENCE_SIZE = 224.0


@dataclass(frozen=True)
class CropConfig:
    """Multi-crop recipe. Defaults are DINO's; sizes and ``n_local`` have none.

    Probabilities set to 0 switch an op off (tests use that to isolate the geometry).
    """

    global_size: int  # e.g. 28/32, or 256 for the paper recipe
    local_size: int  # e.g. 14/16, or 128
    n_local: int  # L (paper 8)
    global_scale: tuple[float, float] = (0.4, 1.0)  # crop area / image area
    local_scale: tuple[float, float] = (0.15, 0.4)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # b, c, s, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at 224 px; scaled by size/224
    # Blur probability for (first global, second global, local) crops, as in DINO.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: float = 0.2  # second global crop only
    flip_p: float = 0.5
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    def __post_init__(self) -> None:
        if min(self.global_size, self.local_size) < 1 or self.n_local < 0:
            raise ValueError(
                "crop sizes must be >= 1 and n_local >= 0, got "
                f"{self.global_size}, {self.local_size}, {self.n_local}"
            )
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        probs = (self.jitter_p, self.gray_p, self.solarize_p, self.flip_p, *self.blur_p)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"probabilities must lie in [0, 1], got {probs}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if min(self.jitter) < 0.0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {self.jitter}")


# --- random numbers -------------------------------------------------------------------


def _uniform(
    n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """``n`` uniform numbers in [lo, hi), drawn on the generator's device, moved to ``device``."""
    u = torch.rand(n, generator=generator, device=generator.device).to(device)
    return lo + (hi - lo) * u


def _coin(n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Boolean mask of ``n`` independent draws that are True with probability ``p``.

    Always consumes ``n`` numbers, so the random stream does not depend on ``p``.
    """
    return _uniform(n, 0.0, 1.0, generator, device) < p


def _per_sample(values: Tensor) -> Tensor:
    """Shape ``N`` -> ``N x 1 x 1 x 1`` to broadcast over C, H, W."""
    return values.view(-1, 1, 1, 1)


# --- geometry -------------------------------------------------------------------------


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """Random resized-crop boxes, torchvision's rule with continuous coordinates.

    Per image, up to 10 (area fraction, log-uniform aspect ratio in (3/4, 4/3)) pairs are
    drawn; the first that fits inside the image wins, else the whole image (with its aspect
    clamped to the ratio range) is used. The centre is then uniform over positions that
    keep the box inside the image.

    Returns:
        ``n x 4`` tensor of (centre x, centre y, width, height) in pixels, float32.
    """
    area = float(height * width)
    frac = _uniform(n * _CROP_ATTEMPTS, scale[0], scale[1], generator, device)
    log_ratio = _uniform(
        n * _CROP_ATTEMPTS, math.log(_RATIO[0]), math.log(_RATIO[1]), generator, device
    )
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(frac * area * ratio).view(n, _CROP_ATTEMPTS)
    h = torch.sqrt(frac * area / ratio).view(n, _CROP_ATTEMPTS)
    fits = (w <= width) & (h <= height)
    # argmax returns the first maximal index: the first attempt that fits.
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)
    any_fits = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fallback_w, fallback_h = float(width), width / _RATIO[0]
    elif in_ratio > _RATIO[1]:
        fallback_w, fallback_h = height * _RATIO[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    box_w = torch.where(any_fits, w.gather(1, first)[:, 0], fallback_w)
    box_h = torch.where(any_fits, h.gather(1, first)[:, 0], fallback_h)

    cx = box_w / 2 + _uniform(n, 0.0, 1.0, generator, device) * (width - box_w)
    cy = box_h / 2 + _uniform(n, 0.0, 1.0, generator, device) * (height - box_h)
    return torch.stack([cx, cy, box_w, box_h], dim=1)


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int,
    flip: Tensor,
    mode: Literal["bilinear", "bicubic"] = "bilinear",
) -> Tensor:
    """Cut box i out of image i, resize it to ``size x size`` and mirror it where ``flip[i]``.

    Crop, resize and flip are one affine map, so the whole batch is a single
    ``affine_grid`` + ``grid_sample``. ``align_corners=False`` maps output pixel centres
    onto the box's pixel grid: a box equal to the image at ``size`` == H == W samples every
    pixel centre exactly (identity up to float rounding). No antialiasing: crops are mostly
    upsampled in this method, and mild downsampling (e.g. 28 -> 14 local crops) is acceptable.
    """
    n, c, h, w = images.shape
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    cx, cy, bw, bh = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flip.to(device=images.device, dtype=images.dtype)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    # Normalised output u in [-1, 1] -> input pixel cx + u * bw / 2 -> normalised input.
    theta[:, 0, 0] = sign * bw / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    # "border" only matters for the outermost half pixel that bilinear weights touch.
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


# --- photometric ops (per-sample factors, shape N) ------------------------------------


def grayscale(images: Tensor) -> Tensor:
    """Luma (0.299 R + 0.587 G + 0.114 B) repeated to all channels; C != 3: channel mean."""
    if images.shape[1] == 3:
        weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        gray = (images * weights).sum(dim=1, keepdim=True)
    else:
        gray = images.mean(dim=1, keepdim=True)
    return gray.expand_as(images)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale image i by ``factor[i]`` (0 = black, 1 = unchanged), clamped to [0, 1]."""
    return (images * _per_sample(factor)).clamp(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend image i with its mean grey level: ``f * x + (1 - f) * mean``, clamped (torchvision)."""
    mean = grayscale(images)[:, :1].mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * images + (1 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend image i with its grayscale: ``f * x + (1 - f) * gray``; no-op unless C == 3."""
    if images.shape[1] != 3:
        return images
    f = _per_sample(factor)
    return (f * images + (1 - f) * grayscale(images)).clamp(0.0, 1.0)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB in [0, 1] -> HSV with hue in [0, 1) (fraction of a turn), batched."""
    r, g, b = images.unbind(dim=1)
    maxc, argmax = images.max(dim=1)
    minc = images.min(dim=1).values
    delta = maxc - minc
    # Guard divisions; grey pixels (delta == 0) get hue 0 and black pixels saturation 0.
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    safe_max = torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    hue_r = (g - b) / safe_delta
    hue_g = (b - r) / safe_delta + 2.0
    hue_b = (r - g) / safe_delta + 4.0
    hue = torch.where(argmax == 0, hue_r, torch.where(argmax == 1, hue_g, hue_b))
    hue = torch.where(delta > 0, (hue / 6.0).remainder(1.0), torch.zeros_like(hue))
    sat = delta / safe_max
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV (hue in [0, 1)) -> RGB, batched, branch-free.

    Uses channel_n = V - V * S * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6 and
    n = 5, 3, 1 for R, G, B: the same piecewise-linear hexcone as the textbook sextant
    table, without a per-sextant gather.
    """
    hue, sat, val = hsv.unbind(dim=1)
    offsets = hsv.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offsets + 6.0 * hue[:, None]).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return val[:, None] - (val * sat)[:, None] * ramp


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of image i by ``factor[i]`` turns (in [-0.5, 0.5]) in HSV space.

    Exact HSV round trip, i.e. torchvision's ``adjust_hue`` with a per-image factor (a YIQ
    rotation would be cheaper but changes luma differently from the DINO recipe).
    No-op unless C == 3.
    """
    if images.shape[1] != 3:
        return images
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + factor.view(-1, 1, 1)).remainder(1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above ``threshold`` (``x -> 1 - x``), as DINO's PIL solarize."""
    return torch.where(images >= threshold, 1.0 - images, images)


def blur_kernel_radius(max_sigma: float) -> int:
    """Half-width of the Gaussian kernel: 3 sigma covers 99.7% of its mass."""
    return max(1, math.ceil(3.0 * max_sigma))


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur image i with an isotropic Gaussian of std ``sigma[i]`` pixels.

    Separable: one vertical and one horizontal depthwise convolution with a kernel of
    ``2 * radius + 1`` taps per image. The batch is folded into channels (``1 x N*C x H x W``
    with ``groups = N*C``) so each image gets its own kernel in one conv call. Borders are
    reflected (torchvision's choice), falling back to replicate when the image is too small.
    """
    n, c, h, w = images.shape
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(device=images.device, dtype=images.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # one row per (image, channel) group
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return x.reshape(n, c, h, w)


# --- the multi-crop -------------------------------------------------------------------


class MultiCrop:
    """Makes DINO global and local crops of a batch, optionally shifted into negatives.

    Args:
        cfg: the crop recipe.
        mean, std: per-channel normalisation (length C, or 1 to share across channels),
            applied last.
    """

    def __init__(self, cfg: CropConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same non-zero length, got {mean}, {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.cfg = cfg
        self._mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def views(
        self,
        images: Tensor,
        generator: torch.Generator,
        shift_kind: str | None = None,
        n_global: int = 2,
    ) -> list[Tensor]:
        """Crops of ``images`` (float ``N x C x H x W`` in [0, 1]), normalised.

        Returns ``n_global`` global crops (``N x C x G x G``) followed by ``n_local`` local
        crops (``N x C x l x l``). Global crop 0 uses DINO's first global recipe (blur
        ``blur_p[0]``), later global crops the second (blur ``blur_p[1]`` and solarize).

        If ``shift_kind`` is given, the shifting transformation (:func:`negatives.shift`)
        is applied right after the crop and before the photometric augmentations: that is
        how the method builds negatives (crop -> T -> flip/colour/blur). Flip is folded
        into the crop's affine map, so it comes before T here; for the shifts offered a
        mirrored crop is as likely as any other input, so the distribution of negatives
        is the same.

        Example: positives ``views(x, g)``; negatives ``views(x, g, "rot", n_global=1)``.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"expected a float tensor N x C x H x W in [0, 1], got {images.dtype} of "
                f"shape {tuple(images.shape)}"
            )
        if shift_kind is not None and shift_kind not in SHIFTS:
            raise ValueError(f"unknown shift {shift_kind!r}; choose one of {', '.join(SHIFTS)}")
        channels = images.shape[1]
        if self._mean.shape[1] not in (1, channels):
            raise ValueError(
                f"mean/std have {self._mean.shape[1]} entries but the images have "
                f"{channels} channels"
            )
        cfg = self.cfg
        recipes: list[tuple[int, tuple[float, float], float, float]] = []
        for i in range(n_global):
            blur_p = cfg.blur_p[0] if i == 0 else cfg.blur_p[1]
            solarize_p = 0.0 if i == 0 else cfg.solarize_p
            recipes.append((cfg.global_size, cfg.global_scale, blur_p, solarize_p))
        recipes += [(cfg.local_size, cfg.local_scale, cfg.blur_p[2], 0.0)] * cfg.n_local
        return [
            self._view(images, generator, size, scale, blur_p, solarize_p, shift_kind)
            for size, scale, blur_p, solarize_p in recipes
        ]

    def _view(
        self,
        images: Tensor,
        generator: torch.Generator,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        shift_kind: str | None,
    ) -> Tensor:
        """One crop of every image: geometry, optional shift, photometric ops, normalise."""
        cfg = self.cfg
        n, _, h, w = images.shape
        dev = images.device

        boxes = sample_crop_boxes(n, h, w, scale, generator, dev)
        flip = _coin(n, cfg.flip_p, generator, dev)
        x = resized_crop(images, boxes, size, flip, cfg.interpolation)
        if shift_kind is not None:
            x = shift(x, shift_kind, generator)
        # Bicubic sampling and rot360's bilinear mix can overshoot [0, 1] slightly; the
        # colour ops assume [0, 1].
        x = x.clamp(0.0, 1.0)

        # Colour jitter, fixed order (brightness, contrast, saturation, hue). Unselected
        # images keep their pixels exactly through torch.where rather than relying on
        # neutral factors. Random numbers are drawn even for ops that are off, so the
        # stream (and with it every later view) does not depend on which probabilities
        # are zero.
        b, c, s, hue = cfg.jitter
        jitter = _coin(n, cfg.jitter_p, generator, dev)
        f_b = _uniform(n, max(0.0, 1 - b), 1 + b, generator, dev)
        f_c = _uniform(n, max(0.0, 1 - c), 1 + c, generator, dev)
        f_s = _uniform(n, max(0.0, 1 - s), 1 + s, generator, dev)
        f_h = _uniform(n, -hue, hue, generator, dev)
        if cfg.jitter_p > 0:
            jittered = adjust_hue(
                adjust_saturation(adjust_contrast(adjust_brightness(x, f_b), f_c), f_s), f_h
            )
            x = torch.where(_per_sample(jitter), jittered, x)

        gray = _coin(n, cfg.gray_p, generator, dev)
        if cfg.gray_p > 0:
            x = torch.where(_per_sample(gray), grayscale(x), x)

        sigma_scale = size / _BLUR_REFERENCE_SIZE
        lo, hi = cfg.blur_sigma[0] * sigma_scale, cfg.blur_sigma[1] * sigma_scale
        blur = _coin(n, blur_p, generator, dev)
        sigma = _uniform(n, lo, hi, generator, dev)
        if blur_p > 0:  # skip the convolutions when no image can be selected
            blurred = gaussian_blur(x, sigma, blur_kernel_radius(hi))
            x = torch.where(_per_sample(blur), blurred, x)

        solar = _coin(n, solarize_p, generator, dev)
        if solarize_p > 0:
            x = torch.where(_per_sample(solar), solarize(x), x)

        x = x.clamp(0.0, 1.0)
        mean = self._mean.to(device=dev, dtype=x.dtype)
        std = self._std.to(device=dev, dtype=x.dtype)
        return (x - mean) / std
