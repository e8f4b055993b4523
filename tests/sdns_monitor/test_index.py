"""The reference index: exact and approximate search, and how far apart they are."""

from __future__ import annotations

import numpy as np
import torch

from sdns_monitor.index import ReferenceIndex, approximation_quality, exact_topk


def _unit(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_approximate_search_is_measured_against_exact() -> None:
    rng = np.random.default_rng(0)
    centres = _unit(rng, 20, 32) * 4  # clustered features, as a trained encoder's are
    bank = np.concatenate([c + 0.5 * rng.standard_normal((200, 32)) for c in centres])
    bank = (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32)
    queries = torch.from_numpy(bank[::37] + 0.01)
    queries = torch.nn.functional.normalize(queries, dim=1)
    ood = torch.from_numpy(_unit(rng, 100, 32))

    flat = approximation_quality(ReferenceIndex(bank, "Flat"), queries, ood, 10, 0.1)
    assert flat["recall_at_10"] == 1.0 and flat["auroc_change"] == 0.0
    ivf = approximation_quality(ReferenceIndex(bank, "IVF16,Flat"), queries, ood, 10, 0.1)
    assert 0.9 <= ivf["recall_at_10"] <= 1.0  # 64 of 16 lists probed: all of them
    assert abs(ivf["auroc_change"]) < 0.01 and ivf["auroc_exact"] == flat["auroc_exact"]


def test_neighbours_returns_ids_of_the_nearest() -> None:
    rng = np.random.default_rng(1)
    bank = _unit(rng, 500, 16)
    sims, ids = ReferenceIndex(bank).neighbours(torch.from_numpy(bank[[3, 7]]), 1)
    assert ids[:, 0].tolist() == [3, 7] and torch.allclose(sims[:, 0], torch.ones(2))


def test_exact_topk_on_tensors_matches_faiss_flat() -> None:
    """The matrix product + top-k that "Flat" uses on a GPU gives FAISS's exact neighbours
    (checked here on the CPU: the same torch code runs on the device)."""
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(500, 32)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 32))).float())
    faiss_sims = ReferenceIndex(bank, "Flat").neighbours(queries, 7)[0]
    torch_sims = exact_topk(queries, torch.from_numpy(bank), 7)
    assert torch.allclose(torch_sims, faiss_sims, atol=1e-5)


def test_an_invalid_factory_fails_when_the_index_is_prepared_not_at_the_first_frame() -> None:
    import pytest

    from sdns_monitor.errors import ConfigError

    bank = np.eye(8, dtype=np.float32)
    index = ReferenceIndex(bank, "NoSuchIndex,Flat")
    with pytest.raises(ConfigError, match="invalid FAISS index factory 'NoSuchIndex,Flat'"):
        index.prepare(3)
    assert ReferenceIndex(bank, "NoSuchIndex,Flat").prepare(None) is not None  # exact: no FAISS
