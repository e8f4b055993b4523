"""The SDNS loss: self-distillation on positives plus uniformity on negatives.

L_pos = mean over (teacher global view t, student positive view v != t) of H(P_t, P_s)
L_neg = mean over negative crops n of H(U, P_s(n)) = logsumexp(z/tau_s) - mean_k(z/tau_s)
L     = L_pos + lambda * L_neg
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LossParts:
    total: Tensor
    positive: Tensor
    negative: Tensor


def uniformity_loss(logits: Tensor, student_temp: float) -> Tensor:
    """Mean cross-entropy H(U, softmax(z / tau)) between the uniform distribution and the student."""
    z = logits.float() / student_temp
    return (torch.logsumexp(z, dim=-1) - z.mean(dim=-1)).mean()


class SdnsLoss(nn.Module):
    """DINO's centred, sharpened distillation loss with SDNS's negative term.

    `center` is an EMA (momentum 0.9) of the mean teacher logits over the positive global crops
    of the whole batch, across processes when training is distributed.
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        neg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.neg_weight = neg_weight
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_pos: list[Tensor],
        teacher_global: list[Tensor],
        student_neg: list[Tensor],
        teacher_temp: float,
    ) -> LossParts:
        """student_pos: logits of every positive view (the global views first, in the teacher's
        order); teacher_global: teacher logits of the global views; student_neg: logits of every
        negative crop (may be empty)."""
        teacher_probs = [
            F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach()
            for t in teacher_global
        ]
        student_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_pos]
        total = student_pos[0].new_zeros((), dtype=torch.float32)
        pairs = 0
        for ti, q in enumerate(teacher_probs):
            for vi, logp in enumerate(student_logp):
                if vi == ti:
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                pairs += 1
        positive = total / pairs
        if student_neg:
            negative = uniformity_loss(torch.cat(student_neg), self.student_temp)
        else:
            negative = torch.zeros_like(positive)
        self.update_center(torch.cat(teacher_global))
        return LossParts(
            positive + self.neg_weight * negative, positive.detach(), negative.detach()
        )

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_logits.shape[0]), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
