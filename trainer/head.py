"""The DINO projection head and the student/teacher pair that trains the backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sdns_monitor.networks import Backbone, BackboneConfig, create_backbone


class DinoHead(nn.Module):
    """MLP in_dim -> hidden -> hidden -> bottleneck (GELU, no batch norm), L2-normalise, then a
    weight-normalised linear layer bottleneck -> K prototypes without bias.

    The last layer's norm (weight_norm's `original0`) starts at 1 and is trainable; the trainer
    freezes the whole last layer during the first epoch, as DINO does.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


class Encoder(nn.Module):
    """Backbone + head. `forward(crops)` runs a list of crop batches, grouping equal sizes into
    one backbone call each (DINO's multi-crop wrapper), and returns head logits per crop batch."""

    def __init__(self, backbone: Backbone, head: DinoHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> list[Tensor]:
        out: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats = self.backbone(torch.cat(crops[start:end]))
            logits = self.head(feats)
            out.extend(logits.split([c.shape[0] for c in crops[start:end]]))
            start = end
        return out


def build_pair(
    config: BackboneConfig, out_dim: int, hidden_dim: int, bottleneck_dim: int
) -> tuple[Encoder, Encoder]:
    """Student (with the configured drop-path) and teacher (a copy without drop-path, no grads)."""
    backbone = create_backbone(config)
    student = Encoder(backbone, DinoHead(backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim))
    teacher_backbone = create_backbone(config.model_copy(update={"drop_path": 0.0}))
    teacher = Encoder(
        teacher_backbone,
        DinoHead(backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim),
    )
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameters only (buffers are the teacher's own)."""
    t_params: list[Tensor] = list(teacher.parameters())
    s_params: list[Tensor] = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or the module itself."""
    inner = getattr(module, "module", module)
    assert isinstance(inner, nn.Module)
    return inner
