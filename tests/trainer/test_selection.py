"""Choosing k and the default score on validation data (trainer.selection)."""

from __future__ import annotations

import numpy as np
import torch

from sdns_monitor.index import ReferenceIndex
from trainer.selection import K_CANDIDATES, VALIDATION_SHIFTS, choose_k, shifted_validation


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


def test_shifted_validation_keeps_pixels_and_has_one_set_per_shift() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    shifted = shifted_validation(images, 0)
    assert shifted.shape == (10 * len(VALIDATION_SHIFTS), 8, 8, 1) and shifted.dtype == np.uint8
    # Every shift (rotation, tile and pixel permutations) only moves pixels around.
    for i in range(len(VALIDATION_SHIFTS)):
        part = shifted[i * 10 : (i + 1) * 10].reshape(10, -1)
        np.testing.assert_array_equal(
            np.sort(part, axis=1), np.sort(images.reshape(10, -1), axis=1)
        )


def test_shifted_validation_leaves_out_the_training_negative() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    assert len(shifted_validation(images, 0, exclude="rot")) == 10 * (len(VALIDATION_SHIFTS) - 1)
    assert len(shifted_validation(images, 0, exclude="off")) == 10 * len(VALIDATION_SHIFTS)
