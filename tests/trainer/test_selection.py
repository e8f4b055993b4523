"""Choosing k and the default score on validation data (trainer.selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdns_monitor.index import ReferenceIndex
from sdns_monitor.lowlevel import LowLevelScorer
from trainer.config import make_config
from trainer.degradations import FAMILIES, degrade, families_for
from trainer.selection import (
    K_CANDIDATES,
    VALIDATION_SHIFTS,
    ValidationSet,
    build_lowlevel,
    choose_k,
    shifted_validation,
)


def test_choose_k_takes_the_smallest_k_close_to_exact() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    index = ReferenceIndex(bank)
    id_feats = torch.from_numpy(bank[:200] + 0.05 * rng.normal(size=(200, 16)).astype(np.float32))
    ood = torch.from_numpy(rng.normal(size=(200, 16)).astype(np.float32))
    id_feats = torch.nn.functional.normalize(id_feats, dim=1)
    ood = torch.nn.functional.normalize(ood, dim=1)
    k, record = choose_k(index, id_feats, ood, 0.04)
    assert set(record["auroc_by_k"]) == {str(c) for c in K_CANDIDATES}
    close = [c for c in K_CANDIDATES if record["auroc_by_k"][str(c)] >= record["auroc_all"] - 0.002]
    assert k == (close[0] if close else None)
    assert record["chosen"] == k


def test_shifted_validation_keeps_pixels_and_has_one_set_per_shift_and_degradation() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    shifted, families = shifted_validation(images, 0)
    assert list(families) == [*VALIDATION_SHIFTS, *families_for(1)]
    assert shifted.shape == (10 * len(families), 8, 8, 1) and shifted.dtype == np.uint8
    # Every shift (rotation, tile and pixel permutations) only moves pixels around.
    for kind in VALIDATION_SHIFTS:
        part = shifted[families[kind]].reshape(10, -1)
        np.testing.assert_array_equal(
            np.sort(part, axis=1), np.sort(images.reshape(10, -1), axis=1)
        )
    again, _ = shifted_validation(images, 0)
    np.testing.assert_array_equal(shifted, again)  # seeded: a fit is repeatable


def test_shifted_validation_leaves_out_the_training_negative_and_held_back_families() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    _, every = shifted_validation(images, 0)
    assert "colour-cast" in every and len(every) == len(VALIDATION_SHIFTS) + len(FAMILIES)
    _, fewer = shifted_validation(images, 0, exclude={"rot", "defocus"})
    assert set(every) - set(fewer) == {"rot", "defocus"}


def _frames(n: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Frames of one textured scene with per-frame jitter, 32 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    out = []
    for _ in range(n):
        phase, gain = rng.uniform(0, 0.5), rng.uniform(0.9, 1.1)
        waves = 0.2 * np.sin(6 * xx + phase) * np.cos(5 * yy)
        texture = 0.1 * np.sin(60 * xx + 3 * phase) * np.sin(50 * yy)  # about a 3.5 px period
        scene = (0.5 + waves + texture)[..., None]
        scene = scene * gain * np.array([1.0, 0.9, 0.8])[:channels]
        out.append(scene + rng.normal(0, 0.01, scene.shape))
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_degradation_changes_frames_and_keeps_their_shape(family: str) -> None:
    frames = _frames(6)
    out = degrade(frames, family, np.random.default_rng(0))
    assert out.shape == frames.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
    assert (changed > 1.0).all(), changed  # every frame, more than a rounding


def test_statistics_join_the_combined_score_when_validation_shows_they_gain() -> None:
    """Pixels and SDNS stand-ins that cannot see exposure or blur: the statistics part
    catches the degradations and is chosen; the record says what was measured."""
    train, val = _frames(300, seed=1), _frames(60, seed=2)
    shifted, families = shifted_validation(val, 0, exclude=set(VALIDATION_SHIFTS))
    rng = np.random.default_rng(3)
    sdns = (rng.normal(size=len(val)), rng.normal(size=len(shifted)))  # sees nothing
    validation = ValidationSet(val, shifted, torch.zeros(0), torch.zeros(0), families)
    cfg = make_config("quick", aux=[], neg_source="id")
    spec, bank = build_lowlevel(train, validation, sdns, cfg, torch.device("cpu"))
    assert bank.shape == (len(train), spec.bank_dim(3))
    v = spec.validation
    assert v["default"] == "combined" and "statistics" in spec.parts
    assert v["auroc_by_parts"]["statistics"] > v["auroc_sdns"] + 0.2
    assert set(v["by_family"]["combined"]) == set(families)
    # The shipped scorer reproduces the validation scores of the chosen combination.
    scorer = LowLevelScorer(spec, bank, torch.device("cpu"))
    combined = scorer.combined(sdns[0], val)
    assert abs(float(np.mean(combined))) < 1e-6 * len(spec.parts) + 1e-6


def test_without_a_gain_the_default_stays_sdns() -> None:
    train, val = _frames(300, seed=1), _frames(60, seed=2)
    shifted, families = shifted_validation(val, 0, exclude=set(VALIDATION_SHIFTS))
    # An SDNS stand-in that already separates every family perfectly.
    sdns = (np.zeros(len(val)), np.full(len(shifted), 100.0))
    validation = ValidationSet(val, shifted, torch.zeros(0), torch.zeros(0), families)
    cfg = make_config("quick", aux=[], neg_source="id")
    spec, _ = build_lowlevel(train, validation, sdns, cfg, torch.device("cpu"))
    assert spec.validation["default"] == "sdns"
