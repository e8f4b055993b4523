"""Turn uint8 images into model input: channels, size, normalisation.

Training and scoring use these same functions, so a frame scored in production goes through
exactly the resize the reference images went through. Images are uint8 N x H x W x C arrays
(C in 1, 3, 4) until the last step, which makes a float N x C x S x S tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sdns_monitor.errors import FrameError

# ITU-R BT.601 luma weights, as PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 N x H x W x C images to `channels` (1 = grayscale, 3 = RGB).

    Alpha is dropped; RGB becomes gray by BT.601 luma; gray becomes RGB by repetition.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise FrameError(
            f"expected N x H x W x C images with C in 1, 3, 4, got shape {images.shape}"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    c = images.shape[-1]
    if c == 4:
        images, c = images[..., :3], 3
    if c == channels:
        return np.ascontiguousarray(images)
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    gray = images.astype(np.float32) @ _LUMA
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]


def resize_uint8(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize uint8 N x H x W x C images to size x size (bilinear, antialiased), as uint8.

    The aspect ratio is not kept: frames of one camera share a shape, and squashing keeps the
    whole field of view, which a centre crop would not.
    """
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk]
        part = part if part.flags.writeable else part.copy()  # torch wants to own its memory
        t = torch.from_numpy(part).permute(0, 3, 1, 2).float()
        t = F.interpolate(
            t, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = t.round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def prepare_uint8(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Channels then size: what every image goes through before it meets the encoder."""
    return resize_uint8(to_channels(images, channels), size)


def normalise(
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 N x H x W x C (numpy or tensor) -> float32 N x C x H x W, normalised per channel."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # decoded frames may be read-only views; torch wants to own them
    t = torch.as_tensor(images).to(device)
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=t.device).view(1, -1, 1, 1)
    return (t - m) / s
