"""How the encoder network (networks.py) is run, behind one interface: `eager`, `compile`
(torch.compile) and `tensorrt` (torch-tensorrt, fp16), chosen with `--backend`; `auto` takes
the fastest one available.

Each returns a module with the encoder's call signature (float N x C x S x S -> features), so
`features.extract_features` runs any of them. Results agree with `eager` within
`TOLERANCE` (cosine similarity of the unit-norm features; tested).

TensorRT engines are built for the bundle, the input shape, the batch range and the GPU, and
cached on disk in the cache directory (bundles stay immutable): `<cache>/tensorrt/<bundle hash
prefix>-<gpu>-<C>x<S>-b<max batch>-trt<version>.ep`. `sdns-monitor export` builds one ahead of
time. A cached engine is a file this library wrote itself; keep the cache directory private.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sdns_monitor.bundle import InputSpec
from sdns_monitor.errors import ConfigError, MissingExtraError

log = logging.getLogger("sdns_monitor.backends")

Backend = Literal["auto", "eager", "compile", "tensorrt"]
BACKENDS = ("auto", "eager", "compile", "tensorrt")
# The least cosine similarity between a backend's features and eager fp32 features.
TOLERANCE = {"eager": 1.0 - 1e-6, "compile": 1.0 - 1e-4, "tensorrt": 0.999}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdns-monitor"


def tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device) -> Literal["eager", "compile", "tensorrt"]:
    """`auto` -> tensorrt on a CUDA GPU with torch-tensorrt installed, else compile on a GPU,
    else eager (on CPUs torch.compile's warm-up of a minute rarely pays for a small encoder)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name  # type: ignore[return-value]
    if device.type == "cuda":
        return "tensorrt" if tensorrt_available() else "compile"
    return "eager"


def build_encoder(
    encoder: nn.Module,
    backend: str,
    device: torch.device,
    spec: InputSpec,
    *,
    bundle_hash: str,
    cache_dir: Path | None = None,
    max_batch: int = 256,
) -> tuple[nn.Module, str]:
    """The encoder run by `backend` on `device`; returns it and the backend's name."""
    name = resolve_backend(backend, device)
    encoder = encoder.to(device).eval()
    if name == "eager":
        if device.type == "cuda" and _is_convnet(encoder):
            encoder = encoder.to(memory_format=torch.channels_last)
        return encoder, name
    if name == "compile":
        return torch.compile(encoder, dynamic=True), name  # type: ignore[return-value]
    return _tensorrt(encoder, device, spec, bundle_hash, cache_dir, max_batch), name


def engine_path(
    cache_dir: Path, bundle_hash: str, device: torch.device, spec: InputSpec, max_batch: int
) -> Path:
    import torch_tensorrt

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    key = (
        f"{bundle_hash[:16]}-{gpu}-{spec.channels}x{spec.model_size}-b{max_batch}-"
        f"trt{torch_tensorrt.__version__}"
    )
    return cache_dir / "tensorrt" / f"{key}.ep"


def _tensorrt(
    encoder: nn.Module,
    device: torch.device,
    spec: InputSpec,
    bundle_hash: str,
    cache_dir: Path | None,
    max_batch: int,
) -> nn.Module:
    try:
        import torch_tensorrt
    except ImportError:
        raise MissingExtraError(
            "--backend tensorrt needs torch-tensorrt: pip install 'sdns-monitor[tensorrt]' "
            "(NVIDIA GPUs only), or use --backend auto, compile or eager"
        ) from None
    if device.type != "cuda":
        raise ConfigError(
            "--backend tensorrt runs on a CUDA GPU; use --device cuda or another backend"
        )
    path = engine_path(cache_dir or default_cache_dir(), bundle_hash, device, spec, max_batch)
    if path.exists():
        log.info("TensorRT engine from the cache: %s", path)
        module: nn.Module = torch.export.load(str(path)).module()
        return module
    c, s = spec.channels, spec.model_size
    inputs = [
        torch_tensorrt.Input(
            min_shape=(1, c, s, s),
            opt_shape=(max(1, max_batch // 4), c, s, s),
            max_shape=(max_batch, c, s, s),
            dtype=torch.float32,
        )
    ]
    log.info("building a TensorRT engine (fp16, batch 1-%d); this takes minutes once", max_batch)
    compiled = torch_tensorrt.compile(
        encoder, ir="dynamo", inputs=inputs, enabled_precisions={torch.float16, torch.float32}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    example = [torch.randn(max(1, max_batch // 4), c, s, s, device=device)]
    torch_tensorrt.save(compiled, str(tmp), inputs=example)
    os.replace(tmp, path)  # whole files only: a concurrent reader never sees half an engine
    log.info("TensorRT engine cached at %s", path)
    return compiled  # type: ignore[no-any-return]


def _is_convnet(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules()) and not any(
        isinstance(m, nn.MultiheadAttention | nn.LayerNorm) for m in module.modules()
    )


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The least cosine similarity between rows of two feature matrices."""
    a = torch.nn.functional.normalize(a.float(), dim=1)
    b = torch.nn.functional.normalize(b.float(), dim=1)
    return float((a * b).sum(dim=1).min())
