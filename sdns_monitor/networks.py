"""The encoder networks (backbones) by name: the network that ships in a bundle; how it is
run (eager, torch.compile, TensorRT) is `backends.py`.

`create_backbone(BackboneConfig(name="cnn-small", in_channels=1, image_size=28))` returns a plain
`torch.nn.Module` mapping N x C x H x W float images to N x feature_dim features. Every backbone
accepts inputs smaller than `image_size` (local crops): the CNNs pool globally, the ViTs
interpolate their position embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torchvision.models import resnet18

from sdns_monitor.errors import ConfigError


class BackboneConfig(BaseModel):
    """Everything needed to rebuild a backbone; stored in the bundle manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "cnn-small"
    in_channels: int = Field(1, ge=1, le=4)
    image_size: int = Field(28, ge=8)
    patch_size: int = Field(4, ge=1)  # ViTs only
    width: int = Field(16, ge=4)  # cnn-small: channels of the stem
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)  # ViTs only; the teacher always uses 0


class Backbone(nn.Module):
    """Interface: `forward(x) -> N x feature_dim`."""

    feature_dim: int


class SmallCNN(Backbone):
    """A full-resolution 3x3 stem (w channels), two stride-2 stages (2w, 4w; two 3x3 convs
    each), a 1x1 conv to 16w, mean pool. Conv-BN-ReLU throughout.

    Sized for 28-32 px images on a CPU: w = 16 gives 256-d features and about 0.1 M
    parameters. Only the stem runs at full resolution: small convolutions are memory-bound on
    CPUs, and a second full-resolution conv doubled the training step time when measured.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        w = width

        def block(
            cin: int, cout: int, stride: int = 1, k: int = 3, relu: bool = True
        ) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                nn.BatchNorm2d(cout),
            ]
            return [*layers, nn.ReLU(inplace=True)] if relu else layers

        self.body = nn.Sequential(
            *block(in_channels, w),
            *block(w, 2 * w, stride=2),
            *block(2 * w, 2 * w),
            *block(2 * w, 4 * w, stride=2),
            *block(4 * w, 4 * w),
            # No ReLU before pooling: batch-normalised, signed features differ between images
            # from the first step; all-positive pooled features start nearly parallel (mean
            # cosine 0.97), which left DINO's centred teacher uniform and training collapsed.
            *block(4 * w, 16 * w, k=1, relu=False),
        )
        self.feature_dim = 16 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))


class CifarResNet18(Backbone):
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), no classifier."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.net = net
        self.feature_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops a residual branch)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """ViT with a class token whose output is the feature; position embeddings are interpolated
    for crops smaller than `image_size` (DINO's multi-crop needs that)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(
                f"ViT image size {image_size} is not a multiple of its patch size {patch_size}"
            )
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        grid = image_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        n = math.isqrt(patch_pos.shape[1])
        if gh == n and gw == n:
            return self.pos_embed
        grid = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


def _init_vit_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_REGISTRY: dict[str, Callable[[BackboneConfig], Backbone]] = {
    "cnn-small": lambda c: SmallCNN(c.in_channels, c.width),
    "resnet18-cifar": lambda c: CifarResNet18(c.in_channels),
    "vit-tiny": lambda c: VisionTransformer(
        c.in_channels, c.image_size, c.patch_size, 192, 12, 3, c.drop_path
    ),
    "vit-small": lambda c: VisionTransformer(
        c.in_channels, c.image_size, c.patch_size, 384, 12, 6, c.drop_path
    ),
}

BACKBONES: tuple[str, ...] = tuple(_REGISTRY)


def create_backbone(config: BackboneConfig) -> Backbone:
    """Build the backbone `config.name` with randomly initialised weights."""
    try:
        factory = _REGISTRY[config.name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {config.name!r}; choose one of {', '.join(BACKBONES)}"
        ) from None
    return factory(config)
