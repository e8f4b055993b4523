"""The SDNS loss: DINO distillation on positives, uniformity on negatives (METHOD.md "Loss")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import SdnsLoss, uniformity_loss

K = 32


def _logits(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --- uniformity ------------------------------------------------------------------------


def test_uniformity_is_logsumexp_minus_mean() -> None:
    z = _logits(5, K)
    tau = 0.1
    expected = (torch.logsumexp(z / tau, dim=-1) - (z / tau).mean(dim=-1)).mean()
    assert uniformity_loss(z, tau).item() == pytest.approx(expected.item(), rel=1e-6)


def test_uniformity_is_cross_entropy_from_uniform_by_hand() -> None:
    z = _logits(4, K, seed=1).double().numpy()
    tau = 0.1
    # H(U, P) = -sum_k (1/K) log P_k, averaged over rows.
    expected = np.mean(-_log_softmax(z / tau).mean(axis=-1))
    got = uniformity_loss(torch.from_numpy(z), tau).item()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("value", [0.0, 3.7, -12.0])
def test_uniformity_of_constant_logits_is_log_k(value: float) -> None:
    z = torch.full((3, K), value)
    assert uniformity_loss(z, 0.1).item() == pytest.approx(math.log(K), abs=1e-5)


def test_uniformity_of_non_constant_logits_exceeds_log_k() -> None:
    for seed in range(5):
        z = _logits(6, K, seed=seed, scale=0.05 * (seed + 1))
        assert uniformity_loss(z, 0.1).item() > math.log(K) + 1e-4


# --- positives -------------------------------------------------------------------------


def _views(seed: int, b: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Student logits of 2 global + 2 local views, teacher logits of the 2 global views."""
    student = [_logits(b, K, seed=seed + i) for i in range(4)]
    teacher = [_logits(b, K, seed=seed + 10 + i) for i in range(2)]
    return student, teacher


def _dino_by_hand(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: np.ndarray,
    student_temp: float,
    teacher_temp: float,
) -> float:
    terms = []
    for ti, t in enumerate(teacher):
        q = np.exp(_log_softmax((t.double().numpy() - center) / teacher_temp))
        for vi, s in enumerate(student):
            if vi == ti:  # a view is never compared with itself
                continue
            logp = _log_softmax(s.double().numpy() / student_temp)
            terms.append(np.mean(np.sum(-q * logp, axis=-1)))
    assert len(terms) == 2 * 4 - 2
    return float(np.mean(terms))


def test_positive_term_is_dino_loss_over_pairs_of_different_views() -> None:
    student, teacher = _views(seed=0)
    loss = SdnsLoss(K, student_temp=0.1)
    parts = loss(student, teacher, [], teacher_temp=0.04)
    expected = _dino_by_hand(student, teacher, np.zeros((1, K)), 0.1, 0.04)
    assert parts.positive.item() == pytest.approx(expected, rel=1e-5)
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)


def test_second_call_uses_the_updated_center() -> None:
    loss = SdnsLoss(K, student_temp=0.1, center_momentum=0.9)
    s1, t1 = _views(seed=0)
    loss(s1, t1, [], teacher_temp=0.04)
    center = loss.center.double().numpy().copy()
    assert np.abs(center).max() > 0
    s2, t2 = _views(seed=100)
    parts = loss(s2, t2, [], teacher_temp=0.07)
    expected = _dino_by_hand(s2, t2, center, 0.1, 0.07)
    assert parts.positive.item() == pytest.approx(expected, rel=1e-5)


def test_no_gradient_flows_into_teacher_logits() -> None:
    student, teacher = _views(seed=3)
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    negatives = [_logits(3, K, seed=50).requires_grad_()]
    parts = SdnsLoss(K)(student, teacher, negatives, teacher_temp=0.04)
    parts.total.backward()
    for t in teacher:
        assert t.grad is None
    for s in [*student, *negatives]:
        assert s.grad is not None
        assert s.grad.abs().sum() > 0


def test_center_is_ema_of_batch_mean_teacher_logits() -> None:
    loss = SdnsLoss(K, center_momentum=0.9)
    start = _logits(1, K, seed=7)
    loss.center.copy_(start)
    student, teacher = _views(seed=4, b=5)
    loss(student, teacher, [], teacher_temp=0.04)
    batch_mean = torch.cat(teacher).mean(dim=0, keepdim=True)  # all 2 * B rows
    expected = 0.9 * start + 0.1 * batch_mean
    torch.testing.assert_close(loss.center, expected, rtol=1e-5, atol=1e-6)


# --- negatives -------------------------------------------------------------------------


def test_negative_term_is_uniformity_of_all_negative_crops() -> None:
    student, teacher = _views(seed=5)
    negatives = [_logits(3, K, seed=60), _logits(3, K, seed=61), _logits(2, K, seed=62)]
    parts = SdnsLoss(K, student_temp=0.1)(student, teacher, negatives, teacher_temp=0.04)
    expected = uniformity_loss(torch.cat(negatives), 0.1)
    assert parts.negative.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts.negative.item() > math.log(K)


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.5])
def test_neg_weight_scales_the_negative_term(weight: float) -> None:
    student, teacher = _views(seed=6)
    negatives = [_logits(3, K, seed=70)]
    parts = SdnsLoss(K, neg_weight=weight)(student, teacher, negatives, teacher_temp=0.04)
    assert parts.total.item() == pytest.approx(
        parts.positive.item() + weight * parts.negative.item(), rel=1e-6
    )


def test_empty_negatives_give_zero_negative_term() -> None:
    student, teacher = _views(seed=8)
    parts = SdnsLoss(K, neg_weight=3.0)(student, teacher, [], teacher_temp=0.04)
    assert parts.negative.item() == 0.0
    assert parts.total.item() == pytest.approx(parts.positive.item())


def test_loss_parts_for_logging_carry_no_graph() -> None:
    student, teacher = _views(seed=9)
    student = [s.requires_grad_() for s in student]
    parts = SdnsLoss(K)(student, teacher, [_logits(3, K, seed=80)], teacher_temp=0.04)
    assert parts.total.requires_grad
    assert not parts.positive.requires_grad
    assert not parts.negative.requires_grad
