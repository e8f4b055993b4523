"""The DINO head, the student/teacher pair and the EMA update (METHOD.md "Networks")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdns_monitor.networks import BackboneConfig, DropPath
from trainer.head import DinoHead, Encoder, build_pair, ema_update

CNN = BackboneConfig(name="cnn-small", in_channels=1, image_size=16, width=4)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _head() -> DinoHead:
    torch.manual_seed(0)
    return DinoHead(in_dim=12, out_dim=32, hidden_dim=16, bottleneck_dim=8)


def test_head_maps_features_to_k_logits() -> None:
    out = _head()(torch.randn(5, 12, generator=_gen()))
    assert out.shape == (5, 32)


def test_last_layer_norm_starts_at_one_and_is_trainable() -> None:
    head = _head()
    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones_like(g))
    assert g.requires_grad
    head(torch.randn(4, 12, generator=_gen(1))).square().sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_prototypes_have_unit_norm_so_logits_are_cosines() -> None:
    head = _head()
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))
    # Input to the last layer is L2-normalised, so every logit lies in [-1, 1].
    out = head(torch.randn(64, 12, generator=_gen(2)) * 100)
    assert out.abs().max() <= 1.0 + 1e-5


def test_last_layer_has_no_bias() -> None:
    assert _head().last_layer.bias is None


def test_build_pair_teacher_starts_equal_without_grads() -> None:
    torch.manual_seed(0)
    student, teacher = build_pair(CNN, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    # Same outputs, too (eval mode: batch norm uses the same running statistics).
    x = [torch.randn(3, 1, 16, 16, generator=_gen(3))]
    torch.testing.assert_close(student.eval()(x)[0], teacher.eval()(x)[0])


def test_build_pair_teacher_has_no_drop_path() -> None:
    vit = BackboneConfig(name="vit-tiny", in_channels=1, image_size=16, patch_size=4, drop_path=0.3)
    torch.manual_seed(0)
    student, teacher = build_pair(vit, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    s_rates = [m.p for m in student.modules() if isinstance(m, DropPath)]
    t_rates = [m.p for m in teacher.modules() if isinstance(m, DropPath)]
    assert max(s_rates) == pytest.approx(0.3)
    assert t_rates and all(p == 0.0 for p in t_rates)
    # In train mode (as the loop runs the teacher) its output is deterministic.
    teacher.train()
    x = [torch.randn(4, 1, 16, 16, generator=_gen(4))]
    torch.testing.assert_close(teacher(x)[0], teacher(x)[0])


def test_ema_update_on_parameters_leaves_buffers_alone() -> None:
    torch.manual_seed(0)
    student, teacher = build_pair(CNN, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(5)))
        for b in student.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    t_before = {k: v.clone() for k, v in teacher.named_parameters()}
    t_buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    s_params = dict(student.named_parameters())
    ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * t_before[name] + 0.1 * s_params[name].detach()
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
        assert not p.requires_grad
    for name, b in teacher.named_buffers():
        assert torch.equal(b, t_buffers[name]), name


def test_ema_update_with_momentum_one_keeps_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = build_pair(CNN, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    for a, b in zip(before, teacher.parameters(), strict=True):
        assert torch.equal(a, b)


class _CountingBackbone(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.inner(x)


def test_encoder_groups_equal_sizes_and_keeps_input_order() -> None:
    torch.manual_seed(0)
    student, _ = build_pair(CNN, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    counting = _CountingBackbone(student.backbone)
    encoder = Encoder(counting, student.head).eval()  # type: ignore[arg-type]
    g = _gen(6)
    crops = [
        torch.randn(2, 1, 16, 16, generator=g),
        torch.randn(3, 1, 16, 16, generator=g),
        torch.randn(2, 1, 8, 8, generator=g),
        torch.randn(1, 1, 8, 8, generator=g),
        torch.randn(4, 1, 16, 16, generator=g),
    ]
    with torch.no_grad():
        out = encoder(crops)
        # Adjacent crops of one size share one backbone call.
        assert counting.batch_sizes == [5, 3, 4]
        assert [o.shape for o in out] == [(c.shape[0], 32) for c in crops]
        for crop, logits in zip(crops, out, strict=True):
            torch.testing.assert_close(logits, encoder([crop])[0], rtol=1e-5, atol=1e-5)
