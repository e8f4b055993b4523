"""Shifting transformations: each is the geometric operation it claims, drawn per image."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.negatives import (
    SHIFTS,
    pixel_permute,
    random_permutations,
    rotate,
    rotate90,
    shift,
    tile_shuffle,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    # Random pixels: no image equals any rotation or tile shuffle of itself.
    return torch.rand(n, c, size, size, generator=_gen(seed))


def _tiles(images: torch.Tensor, grid: int) -> torch.Tensor:
    """N x grid**2 x (C * th * tw), tiles in row-major order."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    t = images.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(n, grid * grid, c * th * tw)


# --- rotations -------------------------------------------------------------------------


def test_rotate90_four_times_is_identity_and_matches_torch_rot90() -> None:
    x = _images()
    k = torch.tensor([0, 1, 2, 3, 4, -1, 5, 2])
    out = rotate90(x, k)
    for i in range(len(x)):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    y = x
    for _ in range(4):
        y = rotate90(y, k)
    assert torch.equal(y, x)


def test_rot_uses_only_90_180_270_and_each_occurs() -> None:
    x = _images(n=60)
    out = shift(x, "rot", _gen())
    seen = []
    for i in range(len(x)):
        matches = [q for q in range(4) if torch.equal(out[i], torch.rot90(x[i], q, dims=(-2, -1)))]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == {1, 2, 3}


def test_rot_rejects_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        shift(torch.rand(2, 1, 8, 6), "rot", _gen())


def test_rotate_by_0_and_360_degrees_is_identity_and_90_matches_rot90() -> None:
    x = _images(size=9)
    n = len(x)
    assert torch.allclose(rotate(x, torch.zeros(n)), x, atol=1e-5)
    assert torch.allclose(rotate(x, torch.full((n,), 2 * math.pi)), x, atol=1e-5)
    quarter = rotate(x, torch.full((n,), math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_rot360_keeps_the_centre_pixel_and_varies_the_angle() -> None:
    x = _images(n=32, size=9)
    out = shift(x, "rot360", _gen())
    assert torch.allclose(out[..., 4, 4], x[..., 4, 4], atol=1e-5)
    # Not restricted to multiples of 90 degrees: most images differ from every rot90.
    rot90s = torch.stack([torch.rot90(x, q, dims=(-2, -1)) for q in range(4)])
    off_grid = ((out[None] - rot90s).abs().amax(dim=(2, 3, 4)) > 1e-3).all(dim=0)
    assert off_grid.float().mean() > 0.9


def test_rotate_keeps_non_square_images_rigid() -> None:
    # A 180 degree turn of a non-square image is exact flipping of both axes.
    x = torch.rand(3, 2, 6, 10, generator=_gen())
    out = rotate(x, torch.full((3,), math.pi))
    assert torch.allclose(out, x.flip(-1, -2), atol=1e-5)


# --- tile shuffles -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "grid"), [("perm4", 2), ("perm16", 4)])
def test_tile_shuffle_is_a_non_identity_permutation_of_tiles(kind: str, grid: int) -> None:
    x = _images(n=200, c=3, size=8)
    out = shift(x, kind, _gen())
    tiles_in, tiles_out = _tiles(x, grid), _tiles(out, grid)
    # Same multiset of tiles: every output tile is exactly one input tile, each used once.
    match = (tiles_out[:, :, None, :] == tiles_in[:, None, :, :]).all(dim=-1)  # N x out x in
    assert (match.sum(dim=2) == 1).all()
    assert (match.sum(dim=1) == 1).all()
    perms = match.float().argmax(dim=2)
    assert not (perms == torch.arange(grid * grid)).all(dim=1).any()
    assert len({tuple(p.tolist()) for p in perms}) > 10  # genuinely random orders


def test_tile_shuffle_follows_the_given_order() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # Swap the left and right tiles of each row of a 2x2 grid.
    out = tile_shuffle(x, 2, torch.tensor([[1, 0, 3, 2]]))
    expected = torch.tensor([[2.0, 3, 0, 1], [6, 7, 4, 5], [10, 11, 8, 9], [14, 15, 12, 13]]).view(
        1, 1, 4, 4
    )
    assert torch.equal(out, expected)


def test_tile_shuffle_leaves_remainder_rows_and_columns_in_place() -> None:
    x = torch.rand(4, 1, 9, 11, generator=_gen())
    out = shift(x, "perm16", _gen(3))
    assert out.shape == x.shape
    assert torch.equal(out[..., 8:, :], x[..., 8:, :])
    assert torch.equal(out[..., :, 8:], x[..., :, 8:])
    assert not torch.equal(out[..., :8, :8], x[..., :8, :8])


def test_random_permutations_are_never_the_identity() -> None:
    # 2 elements: half of all draws are the identity, so rejection must do real work.
    perms = random_permutations(500, 2, _gen(), torch.device("cpu"))
    assert (perms == torch.tensor([1, 0])).all()
    with pytest.raises(ValueError):
        random_permutations(3, 1, _gen(), torch.device("cpu"))


# --- pixel permutation -------------------------------------------------------------------


def test_pixperm_moves_pixels_with_all_their_channels() -> None:
    n, h, w = 16, 6, 7
    pos = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(n, 1, h, w)
    # Channels are known functions of the position, so a shared permutation keeps them tied.
    x = torch.cat([pos, 2 * pos + 1, -pos], dim=1)
    out = shift(x, "pixperm", _gen())
    assert torch.equal(out[:, 1], 2 * out[:, 0] + 1)
    assert torch.equal(out[:, 2], -out[:, 0])
    # Every position appears exactly once per image, and never all in place.
    assert torch.equal(out[:, 0].reshape(n, -1).sort(dim=1).values, pos.reshape(n, -1))
    assert not (out == x).all(dim=(1, 2, 3)).any()
    # Each image gets its own permutation.
    assert not torch.equal(out[0], out[1])


def test_pixperm_keeps_the_value_multiset_of_random_images() -> None:
    x = _images(n=4, c=1)
    out = shift(x, "pixperm", _gen())
    assert torch.equal(out.reshape(4, -1).sort(dim=1).values, x.reshape(4, -1).sort(dim=1).values)


def test_pixel_permute_follows_the_given_order() -> None:
    x = torch.tensor([[[[10.0, 11.0], [12.0, 13.0]]]])
    out = pixel_permute(x, torch.tensor([[3, 2, 1, 0]]))
    assert torch.equal(out, torch.tensor([[[[13.0, 12.0], [11.0, 10.0]]]]))


# --- all shifts ----------------------------------------------------------------------------


def test_none_is_the_identity() -> None:
    x = _images()
    assert torch.equal(shift(x, "none", _gen()), x)


@pytest.mark.parametrize("kind", [k for k in SHIFTS if k != "none"])
def test_same_seed_same_output_different_seed_different_output(kind: str) -> None:
    x = _images(n=16, c=1, size=8)
    a = shift(x, kind, _gen(5))
    assert torch.equal(a, shift(x, kind, _gen(5)))
    assert not torch.equal(a, shift(x, kind, _gen(6)))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not torch.equal(a, x)


def test_unknown_shift_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"rot360.*pixperm"):
        shift(_images(), "jigsaw", _gen())
