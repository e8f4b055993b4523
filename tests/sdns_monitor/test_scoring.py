"""The kernel anomaly score, conformal p-values and the reference index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdns_monitor.errors import ConfigError
from sdns_monitor.index import ReferenceIndex
from sdns_monitor.scoring import (
    cannot_flag,
    conformal_cutoff,
    kernel_score,
    p_values,
    score_tolerance,
)


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _direct(sims: np.ndarray, n: int, temperature: float) -> np.ndarray:
    """-log((1/N) sum exp((s - 1) / T)), summed naively in float64."""
    s = sims.astype(np.float64)
    return -np.log(np.exp((s - 1.0) / temperature).sum(axis=1) / n)


# --- kernel score ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.04, 0.5])
def test_kernel_score_matches_the_formula(temperature: float) -> None:
    rng = np.random.default_rng(0)
    sims = rng.uniform(0.5, 1.0, size=(6, 40))
    got = kernel_score(torch.from_numpy(sims), 40, temperature)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _direct(sims, 40, temperature), rtol=1e-12)


def test_kernel_score_of_all_neighbours_in_top_k_order_equals_exact() -> None:
    sims = torch.from_numpy(np.random.default_rng(1).uniform(-1.0, 1.0, size=(5, 60)))
    top_all = torch.topk(sims, 60, dim=1).values  # k = N, sorted as a k-NN search returns
    torch.testing.assert_close(kernel_score(top_all, 60, 0.04), kernel_score(sims, 60, 0.04))


def test_kernel_score_top_k_is_still_divided_by_n() -> None:
    sims = np.array([[0.9, 0.8, 0.7]])
    got = kernel_score(torch.from_numpy(sims), 1000, 0.1).item()
    assert got == pytest.approx(_direct(sims, 1000, 0.1)[0])


def test_kernel_score_is_stable_where_the_naive_sum_underflows() -> None:
    # exp((-1 - 1) / 0.001) underflows to 0 in float64; the log-sum-exp form does not.
    sims = torch.full((1, 10), -1.0)
    got = kernel_score(sims, 10, 0.001).item()
    assert got == pytest.approx(2.0 / 0.001)


def test_higher_similarity_gives_lower_anomaly_score() -> None:
    near = kernel_score(torch.full((1, 5), 0.9), 5, 0.04)
    far = kernel_score(torch.full((1, 5), 0.5), 5, 0.04)
    assert near.item() < far.item()
    # Identical to every reference: s = 1, a = 0.
    assert kernel_score(torch.ones(1, 5), 5, 0.04).item() == pytest.approx(0.0, abs=1e-12)


def test_top_k_with_all_neighbours_equals_exact_and_fewer_is_an_upper_bound() -> None:
    bank = _unit(100, 16, seed=1)
    queries = torch.from_numpy(_unit(7, 16, seed=2))
    index = ReferenceIndex(bank, "Flat")
    exact = index.kernel_scores(queries, None, 0.5)
    np.testing.assert_allclose(
        exact,
        _direct(queries.numpy().astype(np.float64) @ bank.T.astype(np.float64), 100, 0.5),
        rtol=1e-6,
    )
    np.testing.assert_allclose(index.kernel_scores(queries, 100, 0.5), exact, rtol=1e-12)
    # FAISS path with k = N - 1 and k = 10: fewer terms, smaller sum, higher anomaly score.
    k99 = index.kernel_scores(queries, 99, 0.5)
    k10 = index.kernel_scores(queries, 10, 0.5)
    assert np.all(k99 >= exact - 1e-9)
    assert np.all(k10 >= k99 - 1e-9)


# --- p-values --------------------------------------------------------------------------


def test_p_values_small_example_by_hand() -> None:
    calibration = np.array([1.0, 2.0, 3.0, 4.0])
    scores = np.array([0.0, 2.0, 2.5, 4.0, 5.0])
    # #{c >= s}: 4, 3, 2, 1, 0 -> (1 + count) / 5.
    np.testing.assert_allclose(p_values(scores, calibration), [1.0, 0.8, 0.6, 0.4, 0.2])


def test_p_values_are_in_unit_interval_and_decrease_with_score() -> None:
    rng = np.random.default_rng(3)
    calibration = np.sort(rng.normal(size=200))
    scores = np.sort(rng.normal(scale=2.0, size=500))
    p = p_values(scores, calibration)
    assert np.all(p > 0) and np.all(p <= 1)
    assert np.all(np.diff(p) <= 0)
    assert p.min() == pytest.approx(1 / 201)
    assert p.max() == 1.0


def test_p_values_without_calibration_are_one() -> None:
    np.testing.assert_allclose(p_values(np.array([1.0, 2.0]), np.zeros(0)), [1.0, 1.0])


# --- the index -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 20])
def test_flat_top_k_equals_top_k_of_exact_products(k: int) -> None:
    bank = _unit(300, 32, seed=4)
    queries = torch.from_numpy(_unit(9, 32, seed=5))
    sims = ReferenceIndex(bank, "Flat").search(queries, k)
    exact = torch.topk(queries @ torch.from_numpy(bank).T, k, dim=1).values
    assert sims.shape == (9, k)
    torch.testing.assert_close(sims, exact, rtol=0, atol=1e-5)


def test_search_without_k_returns_every_similarity() -> None:
    bank = _unit(30, 8, seed=6)
    queries = torch.from_numpy(_unit(4, 8, seed=7))
    index = ReferenceIndex(bank)
    assert len(index) == 30 and index.dim == 8
    for k in (None, 30, 500):
        torch.testing.assert_close(index.search(queries, k), queries @ torch.from_numpy(bank).T)


def test_chunked_scores_equal_unchunked() -> None:
    bank = _unit(64, 8, seed=8)
    queries = torch.from_numpy(_unit(23, 8, seed=9))
    index = ReferenceIndex(bank)
    for k in (None, 7):
        whole = index.kernel_scores(queries, k, 0.04, chunk=1024)
        chunked = index.kernel_scores(queries, k, 0.04, chunk=5)
        assert whole.shape == (23,)
        # Not bit-equal: BLAS picks other fp32 kernels for other shapes (the precision contract).
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=score_tolerance(8, 0.04))


def test_no_queries_give_no_scores() -> None:
    index = ReferenceIndex(_unit(10, 4, seed=10))
    assert index.kernel_scores(torch.zeros(0, 4), 3, 0.04).shape == (0,)


def test_ivf_factory_is_searched_by_inner_product() -> None:
    bank = _unit(400, 16, seed=11)
    queries = torch.from_numpy(bank[:5])  # each query is in the bank
    sims = ReferenceIndex(bank, "IVF4,Flat").search(queries, 3)
    assert sims.shape == (5, 3)
    assert torch.allclose(sims[:, 0], torch.ones(5), atol=1e-5)


def test_invalid_faiss_factory_is_a_config_error() -> None:
    index = ReferenceIndex(_unit(10, 4, seed=12), "NoSuchIndex,Flat")
    with pytest.raises(ConfigError, match="invalid FAISS index factory 'NoSuchIndex,Flat'"):
        index.search(torch.from_numpy(_unit(2, 4, seed=13)), 3)


def test_reference_features_must_be_float32_matrix() -> None:
    with pytest.raises(ValueError):
        ReferenceIndex(np.zeros((3, 4), np.float64))
    with pytest.raises(ValueError):
        ReferenceIndex(np.zeros(4, np.float32))


@pytest.mark.parametrize("n", [10, 99, 100, 1000])
@pytest.mark.parametrize("alarm_rate", [0.01, 0.05, 0.1, 0.3])
def test_conformal_cutoff_separates_exactly_the_flagged_scores(n: int, alarm_rate: float) -> None:
    cal = np.sort(np.random.default_rng(n).normal(size=n))
    probes = np.sort(np.concatenate([cal, cal + 1e-9, cal - 1e-9, [cal[0] - 1, cal[-1] + 1]]))
    flagged = p_values(probes, cal) < alarm_rate
    cutoff = conformal_cutoff(cal, alarm_rate)
    if cutoff is None:
        assert not flagged.any()
    else:
        np.testing.assert_array_equal(flagged, probes > cutoff)


def test_cannot_flag_says_when_the_calibration_set_is_too_small() -> None:
    assert cannot_flag(99, 0.01) is not None  # smallest p-value 1/100 is not below 0.01
    assert cannot_flag(100, 0.01) is None  # 1/101 < 0.01
    message = cannot_flag(60, 0.01)
    assert message is not None and "at least 100 images" in message and "\n" not in message
    # the rule agrees with the flags the p-values give
    for n in (9, 10, 99, 100):
        calibration = np.sort(np.random.default_rng(n).random(n))
        smallest = p_values(np.array([10.0]), calibration)[0]
        assert (cannot_flag(n, 0.1) is None) == bool(smallest < 0.1)
