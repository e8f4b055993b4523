"""Encoder features: prepared uint8 images in, L2-normalised teacher features out.

Shared by `Detector` and by the trainer (reference bank, calibration), so both see exactly the
same preprocessing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdns_monitor.bundle import InputSpec
from sdns_monitor.preprocess import normalise


def encoder_input(
    images: np.ndarray | torch.Tensor, spec: InputSpec, device: torch.device
) -> torch.Tensor:
    """Prepared uint8 N x size x size x C -> normalised float N x C x model_size x model_size."""
    x = normalise(images, spec.mean, spec.std, device)
    if spec.model_size != x.shape[-1]:
        x = F.interpolate(
            x, size=(spec.model_size, spec.model_size), mode="bilinear", align_corners=False
        )
    return x


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    spec: InputSpec,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Features of prepared uint8 images (see `preprocess.prepare_uint8`), unit norm, on CPU."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = encoder_input(images[start : start + batch_size], spec, device)
        out.append(F.normalize(encoder(x).float(), dim=1).cpu())
    encoder.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)
