"""Backbones by name: shapes, smaller (local-crop) inputs, configuration errors, drop-path."""

from __future__ import annotations

import pytest
import torch

from sdns_monitor.errors import ConfigError
from sdns_monitor.networks import BACKBONES, BackboneConfig, DropPath, create_backbone


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("name", "channels", "feature_dim"),
    # None: the CNN's feature size is an architecture detail; it must match its output.
    [
        ("cnn-small", 1, None),
        ("cnn-small", 3, None),
        ("resnet18-cifar", 3, 512),
        ("vit-tiny", 1, 192),
    ],
)
def test_backbone_maps_images_to_features_and_accepts_half_size(
    name: str, channels: int, feature_dim: int | None
) -> None:
    torch.manual_seed(0)
    cfg = BackboneConfig(name=name, in_channels=channels, image_size=16, patch_size=4, width=4)
    net = create_backbone(cfg).eval()
    if feature_dim is None:
        feature_dim = net.feature_dim
    assert net.feature_dim == feature_dim
    with torch.no_grad():
        full = net(torch.randn(2, channels, 16, 16, generator=_gen(1)))
        half = net(torch.randn(3, channels, 8, 8, generator=_gen(2)))
    assert full.shape == (2, feature_dim)
    assert half.shape == (3, feature_dim)
    assert torch.isfinite(full).all() and torch.isfinite(half).all()
    # Features depend on the image (not a constant map).
    assert not torch.allclose(full[0], full[1])


def test_cnn_width_scales_feature_dim() -> None:
    dims = [
        create_backbone(BackboneConfig(name="cnn-small", image_size=16, width=w)).feature_dim
        for w in (4, 8)
    ]
    assert dims[1] == 2 * dims[0]


def test_every_registered_backbone_is_listed() -> None:
    assert set(BACKBONES) >= {"cnn-small", "resnet18-cifar", "vit-tiny", "vit-small"}


def test_unknown_backbone_is_a_config_error_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'") as info:
        create_backbone(BackboneConfig(name="resnet9000"))
    assert "cnn-small" in str(info.value)


def test_vit_image_size_must_be_a_multiple_of_the_patch() -> None:
    with pytest.raises(ConfigError, match="multiple of its patch size"):
        create_backbone(BackboneConfig(name="vit-tiny", image_size=18, patch_size=4))


def test_vit_position_embedding_is_interpolated_not_resized_in_place() -> None:
    torch.manual_seed(0)
    net = create_backbone(BackboneConfig(name="vit-tiny", image_size=16, patch_size=4)).eval()
    before = net.pos_embed.detach().clone()
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8, generator=_gen(3)))
    assert net.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(net.pos_embed, before)


def test_drop_path_is_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    net = create_backbone(
        BackboneConfig(name="vit-tiny", image_size=16, patch_size=4, drop_path=0.5)
    )
    x = torch.randn(4, 1, 16, 16, generator=_gen(4))
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x), net(x))
        net.train()
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(2)
        b = net(x)
    assert not torch.allclose(a, b)


def test_without_drop_path_train_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    net = create_backbone(BackboneConfig(name="vit-tiny", image_size=16, patch_size=4)).train()
    x = torch.randn(2, 1, 16, 16, generator=_gen(5))
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))


def test_drop_path_drops_whole_samples_and_rescales_the_rest() -> None:
    drop = DropPath(0.5)
    x = torch.ones(400, 3, 2)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out.reshape(400, -1)
    # Each sample is either dropped (all 0) or kept and scaled by 1 / keep (all 2).
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(dim=1).values == per_sample.max(dim=1).values)
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert kept == pytest.approx(0.5, abs=0.1)
    assert torch.equal(drop.eval()(x), x)
