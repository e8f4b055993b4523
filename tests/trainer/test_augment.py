"""Batched DINO multi-crop: geometry, photometric ops against torchvision, view recipes."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import torch
import torchvision.transforms.functional as TF

from trainer.augment import (
    CropConfig,
    MultiCrop,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    resized_crop,
    rgb_to_hsv,
    sample_crop_boxes,
    solarize,
)

CPU = torch.device("cpu")

# Every photometric op off, whole-image crops, no flip: the pipeline is then pure geometry.
PLAIN = CropConfig(
    global_size=8,
    local_size=8,
    n_local=2,
    global_scale=(1.0, 1.0),
    local_scale=(1.0, 1.0),
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=(0.0, 0.0, 0.0),
    solarize_p=0.0,
    flip_p=0.0,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=_gen(seed))


def _unnormalise(view: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return view * s + m


def _high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-image energy of neighbour differences (a discrete gradient)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.pow(2).sum(dim=(1, 2, 3)) + dy.pow(2).sum(dim=(1, 2, 3))


# --- views ------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "interpolation"), [(1, "bilinear"), (3, "bicubic")])
def test_views_count_shapes_dtype_and_value_range(
    channels: int, interpolation: Literal["bilinear", "bicubic"]
) -> None:
    cfg = CropConfig(
        global_size=12,
        local_size=6,
        n_local=3,
        jitter_p=1.0,
        solarize_p=1.0,
        interpolation=interpolation,
    )
    mean, std = [0.5] * channels, [0.25] * channels
    crops = MultiCrop(cfg, mean, std)
    x = _images(n=6, c=channels, size=10)
    for shift_kind, n_global in [(None, 2), ("rot", 1), ("perm4", 1), ("rot360", 1)]:
        views = crops.views(x, _gen(), shift_kind=shift_kind, n_global=n_global)
        assert len(views) == n_global + 3
        for i, v in enumerate(views):
            size = 12 if i < n_global else 6
            assert v.shape == (6, channels, size, size)
            assert v.dtype == torch.float32
            raw = _unnormalise(v, mean, std)
            assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_views_are_reproducible_per_seed() -> None:
    crops = MultiCrop(CropConfig(global_size=8, local_size=4, n_local=2), [0.5], [0.5])
    x = _images(c=1)
    a = crops.views(x, _gen(3), shift_kind="rot")
    b = crops.views(x, _gen(3), shift_kind="rot")
    c = crops.views(x, _gen(4), shift_kind="rot")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(not torch.equal(u, v) for u, v in zip(a, c, strict=True))


def test_plain_views_reproduce_the_input_normalised() -> None:
    x = _images(c=3)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    views = MultiCrop(PLAIN, mean, std).views(x, _gen())
    for v in views:
        assert torch.allclose(_unnormalise(v, mean, std), x, atol=1e-5)


def test_rot_negative_view_is_a_rotation_of_the_input() -> None:
    x = _images(n=30, c=1)
    views = MultiCrop(PLAIN, [0.0], [1.0]).views(x, _gen(), shift_kind="rot", n_global=1)
    assert len(views) == 1 + PLAIN.n_local
    quarters = set()
    for v in views:
        for i in range(len(x)):
            diffs = [(v[i] - torch.rot90(x[i], q, dims=(-2, -1))).abs().max() for q in range(4)]
            best = int(torch.stack(diffs).argmin())
            assert diffs[best] < 1e-5
            quarters.add(best)
    assert quarters == {1, 2, 3}


def test_flip_probability_one_mirrors_every_crop() -> None:
    x = _images()
    cfg = dataclasses.replace(PLAIN, flip_p=1.0)
    for v in MultiCrop(cfg, [0.0], [1.0]).views(x, _gen()):
        assert torch.allclose(v, x.flip(-1), atol=1e-5)


def test_gray_probability_one_gives_equal_channels() -> None:
    x = _images()
    cfg = dataclasses.replace(PLAIN, gray_p=1.0)
    for v in MultiCrop(cfg, [0.0], [1.0]).views(x, _gen()):
        assert torch.allclose(v, grayscale(x), atol=1e-5)


def test_gray_probability_selects_about_that_share_of_images() -> None:
    x = _images(n=400, size=4)
    cfg = dataclasses.replace(PLAIN, gray_p=0.3, n_local=0, global_size=4)
    v = MultiCrop(cfg, [0.0], [1.0]).views(x, _gen())[0]
    is_gray = (v - v[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert 0.22 < is_gray.float().mean() < 0.38
    # The others are untouched.
    assert torch.allclose(v[~is_gray], x[~is_gray], atol=1e-5)


def test_solarize_only_on_the_second_global_crop() -> None:
    x = _images()
    cfg = dataclasses.replace(PLAIN, solarize_p=1.0)
    first, second, *local = MultiCrop(cfg, [0.0], [1.0]).views(x, _gen())
    assert torch.allclose(first, x, atol=1e-5)
    assert torch.allclose(second, solarize(x), atol=1e-5)
    assert all(torch.allclose(v, x, atol=1e-5) for v in local)


def test_blur_follows_the_per_view_probabilities() -> None:
    x = _images(n=200, c=1, size=16)
    cfg = dataclasses.replace(
        PLAIN, global_size=16, local_size=16, blur_p=(1.0, 0.0, 0.5), blur_sigma=(50.0, 100.0)
    )
    first, second, local, _ = MultiCrop(cfg, [0.0], [1.0]).views(x, _gen())
    blurred = (first - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert blurred.all()
    assert torch.allclose(second, x, atol=1e-5)
    share = ((local - x).abs().amax(dim=(1, 2, 3)) > 1e-4).float().mean()
    assert 0.4 < share < 0.6


def test_views_reject_bad_input() -> None:
    crops = MultiCrop(PLAIN, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="rot, rot360"):
        crops.views(_images(), _gen(), shift_kind="jigsaw")
    with pytest.raises(ValueError, match="channels"):
        crops.views(_images(c=1), _gen())
    with pytest.raises(ValueError, match="float"):
        crops.views((_images() * 255).to(torch.uint8), _gen())
    with pytest.raises(ValueError):
        dataclasses.replace(PLAIN, local_scale=(0.5, 0.2))


# --- geometry ---------------------------------------------------------------------------


def test_crop_boxes_respect_scale_ratio_and_image_bounds() -> None:
    h, w = 28, 20
    boxes = sample_crop_boxes(2000, h, w, (0.15, 0.4), _gen(), CPU)
    cx, cy, bw, bh = boxes.unbind(dim=1)
    area = bw * bh / (h * w)
    assert area.min() >= 0.15 - 1e-4 and area.max() <= 0.4 + 1e-4
    ratio = bw / bh
    assert ratio.min() >= 0.75 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert (cx - bw / 2 >= -1e-4).all() and (cx + bw / 2 <= w + 1e-4).all()
    assert (cy - bh / 2 >= -1e-4).all() and (cy + bh / 2 <= h + 1e-4).all()
    # Centres spread over the image rather than sticking to one place.
    assert cx.std() > 2 and cy.std() > 2


def test_resized_crop_samples_the_requested_box() -> None:
    # Pixel value = its x coordinate (centre of pixel j is j + 0.5), so crops are ramps.
    h = w = 16
    ramp = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, 1, w).expand(2, 1, h, w)
    boxes = torch.tensor([[6.0, 8.0, 8.0, 8.0], [6.0, 8.0, 8.0, 8.0]])  # x from 2 to 10
    out = resized_crop(ramp, boxes, 4, flip=torch.tensor([False, True]))
    expected = torch.tensor([3.0, 5.0, 7.0, 9.0])  # centres of 4 output pixels over [2, 10]
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-5)
    assert torch.allclose(out[1, 0, 0], expected.flip(0), atol=1e-5)


# --- photometric ops against torchvision ------------------------------------------------


def test_colour_ops_match_torchvision_per_image() -> None:
    # Grey levels use PIL's luma weight 0.299 for red (DINO augments PIL images);
    # torchvision's tensor ops use 0.2989, hence the looser tolerance where grey enters.
    x = _images(n=5, c=3)
    factors = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4])
    hues = torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1])
    ours = {
        "brightness": adjust_brightness(x, factors),
        "contrast": adjust_contrast(x, factors),
        "saturation": adjust_saturation(x, factors),
        "hue": adjust_hue(x, hues),
    }
    for i in range(len(x)):
        f, hue = float(factors[i]), float(hues[i])
        assert torch.allclose(ours["brightness"][i], TF.adjust_brightness(x[i], f), atol=1e-5)
        assert torch.allclose(ours["contrast"][i], TF.adjust_contrast(x[i], f), atol=1e-3)
        assert torch.allclose(ours["saturation"][i], TF.adjust_saturation(x[i], f), atol=1e-3)
        assert torch.allclose(ours["hue"][i], TF.adjust_hue(x[i], hue), atol=1e-4)
    expected_gray = TF.rgb_to_grayscale(x, num_output_channels=3)
    assert torch.allclose(grayscale(x), expected_gray, atol=1e-3)


def test_hsv_round_trip_and_single_channel_colour_ops() -> None:
    x = _images(n=4, c=3)
    x[0] = 0.5  # grey: hue undefined, must not produce NaN
    x[1] = 0.0  # black: saturation undefined
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    gray = _images(n=4, c=1)
    shift = torch.full((4,), 0.1)
    assert torch.equal(adjust_hue(gray, shift), gray)
    assert torch.equal(adjust_saturation(gray, shift), gray)
    assert torch.equal(grayscale(gray), gray)


def test_blur_reduces_high_frequency_energy_and_keeps_constants() -> None:
    x = _images(n=3, c=3, size=24)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = gaussian_blur(x, sigma, radius=6)
    energy_in, energy_out = _high_frequency_energy(x), _high_frequency_energy(out)
    assert (energy_out < 0.5 * energy_in).all()
    # Stronger blur, less high-frequency energy.
    ratio = energy_out / energy_in
    assert ratio[0] > ratio[1] > ratio[2]
    flat = torch.full((3, 3, 24, 24), 0.7)
    assert torch.allclose(gaussian_blur(flat, sigma, radius=6), flat, atol=1e-6)


def test_blur_matches_torchvision_gaussian_blur() -> None:
    x = _images(n=2, c=3, size=12)
    sigma = torch.tensor([0.8, 1.5])
    out = gaussian_blur(x, sigma, radius=3)
    for i in range(2):
        expected = TF.gaussian_blur(x[i], kernel_size=[7, 7], sigma=[float(sigma[i])] * 2)
        assert torch.allclose(out[i], expected, atol=1e-5)
