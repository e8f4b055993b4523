"""Shifting transformations T that turn images into SDNS negatives.

A shift keeps low-level statistics (pixel values, textures, edges) but destroys the
high-level layout the encoder should become specific to; the student is trained to be
uncertain on T(x). Every shift here is drawn independently per image.

All functions take a batched float tensor ``N x C x H x W`` on any device and never loop
over the batch in Python: randomness is drawn as whole tensors from an explicit
``torch.Generator`` (same seed -> same output). Numbers are drawn on the generator's own
device and then moved to the images' device, so a CPU generator works with CUDA images;
pass a generator on the images' device to avoid that small copy.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> negatives = shift(images, "rot", g)  # each image rotated by 90, 180 or 270 degrees
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SHIFTS: tuple[str, ...] = ("rot", "rot360", "perm4", "perm16", "pixperm", "none")
"""Names accepted by :func:`shift`, in the order the method description lists them."""


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 numbers drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check_batch(images: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"expected a float tensor N x C x H x W, got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )


def _check_square(images: Tensor, kind: str) -> None:
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"shift {kind!r} needs square images, got H x W = {images.shape[-2]} x "
            f"{images.shape[-1]}; resize or crop to a square first"
        )


def rotate90(images: Tensor, k: Tensor) -> Tensor:
    """Rotate image i by ``k[i] * 90`` degrees counter-clockwise (exact, as ``torch.rot90``).

    Args:
        images: ``N x C x H x W`` with H == W.
        k: integer tensor of shape ``N`` (any integers; taken modulo 4).

    The four candidate rotations are computed for the whole batch and selected with
    ``torch.where``: four cheap copies instead of boolean indexing, which would force a
    host/device synchronisation on a GPU.
    """
    _check_square(images, "rot")
    k = k.to(images.device).remainder(4).view(-1, 1, 1, 1)
    out = images
    for quarter in range(1, 4):
        out = torch.where(k == quarter, torch.rot90(images, quarter, dims=(-2, -1)), out)
    return out


def rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate image i counter-clockwise by ``angles[i]`` radians about its centre.

    Bilinear sampling with zero padding (corners that leave the frame become 0). The
    rotation is done in pixel units, so non-square images are not sheared. A multiple of
    90 degrees on a square image reproduces ``rotate90`` up to float rounding, because the
    pixel centres then land exactly on pixel centres.
    """
    n, _, h, w = images.shape
    angles = angles.to(device=images.device, dtype=images.dtype)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid works in normalised coordinates ([-1, 1] on both axes); conjugating the
    # pixel-space rotation with diag(w/2, h/2) keeps the rotation rigid when h != w.
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_permutations(
    n: int, size: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """``n`` uniformly random NON-identity permutations of ``range(size)``, shape ``n x size``.

    Rejection sampling: rows that came out as the identity are redrawn until none is left
    (probability 1/size! per row per round, so almost always zero or one extra round). This
    costs one host/device synchronisation per round on a GPU.
    """
    if size < 2:
        raise ValueError(f"a non-identity permutation needs at least 2 elements, got {size}")
    identity = torch.arange(size, device=device)
    perms = torch.argsort(_rand((n, size), generator, device), dim=1)
    redraw = (perms == identity).all(dim=1)
    while bool(redraw.any()):
        fresh = torch.argsort(_rand((n, size), generator, device), dim=1)
        perms = torch.where(redraw[:, None], fresh, perms)
        redraw = (perms == identity).all(dim=1)
    return perms


def tile_shuffle(images: Tensor, grid: int, perms: Tensor) -> Tensor:
    """Cut each image into ``grid x grid`` tiles and reorder them by ``perms``.

    Tiles are numbered row-major; output tile ``p`` of image ``i`` is input tile
    ``perms[i, p]``. If H or W is not divisible by ``grid``, the tiles cover the top-left
    ``(H // grid * grid) x (W // grid * grid)`` region and the remainder rows (bottom) and
    columns (right) stay where they are, so the output keeps the input's shape.

    Args:
        images: ``N x C x H x W``.
        grid: tiles per side (2 for ``perm4``, 4 for ``perm16``).
        perms: integer tensor ``N x grid**2``, each row a permutation of ``range(grid**2)``.
    """
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of {h} x {w} pixels are too small for a {grid} x {grid} grid")
    region = images[..., : th * grid, : tw * grid]
    # N, C, gy, th, gx, tw -> N, gy*gx, C, th, tw: one row per tile, row-major.
    tiles = region.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    rows = torch.arange(n, device=images.device)[:, None]
    shuffled = tiles[rows, perms.to(images.device)]
    shuffled = shuffled.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    out = images.clone()
    out[..., : th * grid, : tw * grid] = shuffled.reshape(n, c, th * grid, tw * grid)
    return out


def pixel_permute(images: Tensor, perms: Tensor) -> Tensor:
    """Move pixels of image i so that output position p holds input position ``perms[i, p]``.

    Positions are flattened row-major (``p = y * W + x``); every channel of an image uses
    the same permutation, so a pixel's colour survives, only its place changes.
    """
    n, c, h, w = images.shape
    index = perms.to(images.device)[:, None, :].expand(n, c, h * w)
    return torch.gather(images.reshape(n, c, h * w), 2, index).reshape(n, c, h, w)


def shift(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Apply the shifting transformation ``kind`` to every image, drawn per image.

    Args:
        images: float ``N x C x H x W`` (any value range; shifts only move pixels).
        kind: one of :data:`SHIFTS`:
            ``rot`` 90/180/270 degrees, uniform (exact; square images);
            ``rot360`` uniform angle in [0, 360) degrees, bilinear, zero padding;
            ``perm4`` / ``perm16`` shuffle a 2x2 / 4x4 grid of tiles into a non-identity
            order (see :func:`tile_shuffle` for sizes not divisible by the grid);
            ``pixperm`` a non-identity permutation of pixel positions shared by channels;
            ``none`` the images themselves (returned as is, not copied).
        generator: source of all randomness.

    Raises:
        ValueError: unknown ``kind``, or images the shift cannot handle.
    """
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; choose one of {', '.join(SHIFTS)}")
    _check_batch(images)
    n, _, h, w = images.shape
    device = images.device
    if kind == "none":
        return images
    if kind == "rot":
        _check_square(images, kind)
        quarters = 1 + torch.floor(_rand((n,), generator, device) * 3).long()
        return rotate90(images, quarters.clamp_(1, 3))
    if kind == "rot360":
        return rotate(images, _rand((n,), generator, device) * (2 * math.pi))
    if kind in ("perm4", "perm16"):
        grid = 2 if kind == "perm4" else 4
        return tile_shuffle(images, grid, random_permutations(n, grid * grid, generator, device))
    # pixperm
    return pixel_permute(images, random_permutations(n, h * w, generator, device))
