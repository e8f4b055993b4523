"""How the encoder network (networks.py) is run, behind one interface: `eager`, `compile`
(torch.compile) and `tensorrt` (torch-tensorrt, fp16), chosen with `--backend`; `auto` takes
the fastest one available.

Each returns a module with the encoder's call signature (float N x C x S x S -> features), so
`features.extract_features` runs any of them. Results agree with `eager` within
`TOLERANCE` (cosine similarity of the unit-norm features; tested).

TensorRT engines are built for the bundle, the input shape, the batch range and the GPU, and
cached on disk in the cache directory (bundles stay immutable): `<cache>/tensorrt/<bundle hash
prefix>-<gpu>-<C>x<S>-b<max batch>-trt<version>.ep`. `sdns-monitor export` builds one ahead of
time.

Loading an engine unpickles it (torch.export.load), so a cached engine is code: whoever can
write it can run code in this process. Two checks stand between the cache and that call:
- the cache directory and its `tensorrt/` folder must belong to this user (or root) and be
  writable by nobody else, or nothing is loaded or built (ConfigError: `chmod go-w`);
- each engine has a sidecar, `<engine>.json`, written after it, that binds it to the full
  bundle hash and records its SHA-256. The engine's bytes are read once, hashed and compared
  before they are unpickled; a missing sidecar, another bundle's hash, another digest or a file
  someone else could write is logged and the engine built again, never loaded.
The digest does not stand in for the permissions (whoever can write the engine can write its
sidecar too): it ties an engine to one bundle and catches a file changed or swapped in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
from collections.abc import Callable
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
ENGINES = "tensorrt"  # the cache directory's folder of TensorRT engines


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
    return cache_dir / ENGINES / f"{key}.ep"


def engine_cache(cache_dir: Path) -> Path:
    """`cache_dir/tensorrt`, created owner-only where missing, once neither it nor `cache_dir`
    can be written by another user. Raises ConfigError otherwise (an engine is code)."""
    engines = Path(cache_dir) / ENGINES
    for d in (engines.parent, engines):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as exc:
            raise ConfigError(
                f"cannot use the cache directory {d} ({exc.strerror}); choose another --cache-dir"
            ) from None
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(
                f"cache directory {d} belongs to another user (uid {st.st_uid}), whose engines "
                "would run as code here; choose another --cache-dir"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"cache directory {d} is writable by others (mode {stat.S_IMODE(st.st_mode):o}), "
                f"and a cached engine runs as code: run `chmod go-w {d}` or choose another "
                "--cache-dir"
            )
    return engines


def sidecar_path(engine: Path) -> Path:
    """Where the record that binds `engine` to its bundle lives: `<engine>.json`."""
    return engine.with_name(engine.name + ".json")


class _Untrusted(Exception):
    """Why a cached engine is not loaded (logged; the engine is built again)."""


def _read_own_file(path: Path) -> bytes:
    """The bytes of `path`, a regular file of this user (or root) that nobody else can write,
    read through one descriptor so that what was checked is what is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _Untrusted(f"{path.name} is missing") from None
    except OSError as exc:
        raise _Untrusted(f"{path.name} cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Untrusted(f"{path.name} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _Untrusted(
                f"{path.name} can be written by others (uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o})"
            )
        return f.read()


def load_cached_engine(path: Path, bundle_hash: str) -> nn.Module | None:
    """The engine cached at `path` for the bundle `bundle_hash`, or None when there is none or
    it is not trusted (logged): then build a new one (`cached_engine` does).

    Trusted: its sidecar (`store_engine` writes it) names `bundle_hash` and the SHA-256 of the
    engine's bytes, and no other user can write either file. All of it is checked on the bytes
    read once, before torch.export.load unpickles them. The directory is `engine_cache`'s to
    check.
    """
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = _read_own_file(path)
        try:
            record = json.loads(_read_own_file(sidecar_path(path)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Untrusted(f"{sidecar_path(path).name} is not JSON") from None
        if not isinstance(record, dict):
            raise _Untrusted(f"{sidecar_path(path).name} is not a JSON object")
        if record.get("bundle_hash") != bundle_hash:
            raise _Untrusted(f"it was built for bundle {record.get('bundle_hash')!r}")
        if record.get("engine_sha256") != hashlib.sha256(data).hexdigest():
            raise _Untrusted("its SHA-256 is not the one its sidecar records")
    except _Untrusted as why:
        log.warning(
            "TensorRT engine %s not loaded: %s; building it again (rerun `sdns-monitor export` "
            "to cache it ahead of time)",
            path,
            why,
        )
        return None
    log.info("TensorRT engine from the cache: %s", path)
    module: nn.Module = torch.export.load(io.BytesIO(data)).module()
    return module


def store_engine(tmp: Path, path: Path, bundle_hash: str) -> None:
    """Move the engine just written at `tmp` to `path`, then write its sidecar binding it to
    `bundle_hash`. Whole files only: a reader never sees half an engine, and one that sees a new
    engine with an old sidecar refuses it (the digest differs) and builds again."""
    data = tmp.read_bytes()
    record = {"bundle_hash": bundle_hash, "engine_sha256": hashlib.sha256(data).hexdigest()}
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    side_tmp = path.with_name(f".{path.name}.json.tmp{os.getpid()}")
    try:
        side_tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(side_tmp, 0o644)
        os.replace(side_tmp, sidecar_path(path))
    except BaseException:
        side_tmp.unlink(missing_ok=True)
        raise


def cached_engine(
    cache_dir: Path, path: Path, bundle_hash: str, build: Callable[[Path], nn.Module]
) -> nn.Module:
    """The trusted engine at `path` (under `engine_cache(cache_dir)`), or a new one: `build`
    writes it to the temporary path it is given and returns the compiled module."""
    engine_cache(cache_dir)
    module = load_cached_engine(path, bundle_hash)
    if module is not None:
        return module
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        compiled = build(tmp)
        store_engine(tmp, path, bundle_hash)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("TensorRT engine cached at %s", path)
    return compiled


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
    root = cache_dir or default_cache_dir()
    path = engine_path(root, bundle_hash, device, spec, max_batch)
    c, s = spec.channels, spec.model_size

    def build(tmp: Path) -> nn.Module:
        inputs = [
            torch_tensorrt.Input(
                min_shape=(1, c, s, s),
                opt_shape=(max(1, max_batch // 4), c, s, s),
                max_shape=(max_batch, c, s, s),
                dtype=torch.float32,
            )
        ]
        log.info(
            "building a TensorRT engine (fp16, batch 1-%d); this takes minutes once", max_batch
        )
        compiled: nn.Module = torch_tensorrt.compile(
            encoder, ir="dynamo", inputs=inputs, enabled_precisions={torch.float16, torch.float32}
        )
        example = [torch.randn(max(1, max_batch // 4), c, s, s, device=device)]
        torch_tensorrt.save(compiled, str(tmp), inputs=example)
        return compiled

    return cached_engine(root, path, bundle_hash, build)


def _is_convnet(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules()) and not any(
        isinstance(m, nn.MultiheadAttention | nn.LayerNorm) for m in module.modules()
    )


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The least cosine similarity between rows of two feature matrices."""
    a = torch.nn.functional.normalize(a.float(), dim=1)
    b = torch.nn.functional.normalize(b.float(), dim=1)
    return float((a * b).sum(dim=1).min())
