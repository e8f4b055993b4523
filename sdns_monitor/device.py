"""Device handling in one place."""

from __future__ import annotations

import torch

from sdns_monitor.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> the first CUDA GPU when visible, else the CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda") from None
