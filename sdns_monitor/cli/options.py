"""The model-loading options several commands share, and the one path by which a command loads
a model.

Their help comes from the `run` settings of the same name (sdns_monitor/settings/run.py), so each
is explained once; each command keeps its own default (eval and score load eager, export
builds TensorRT, run takes RunSettings').
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic.fields import FieldInfo

from sdns_monitor.settings import SETTINGS, BackendName, ScoreName

if TYPE_CHECKING:
    from sdns_monitor.detector import Detector


def setting_help(field: FieldInfo) -> str:
    """A setting's description and the range its constraints allow: the help of its option and
    its entry in docs/configuration.md (`Messages per micro-batch. Range: 1 to 8192.`)."""
    bounds: dict[str, Any] = {}
    for constraint in field.metadata:
        for kind in ("ge", "gt", "le", "lt"):
            if getattr(constraint, kind, None) is not None:
                bounds[kind] = getattr(constraint, kind)
    if "ge" in bounds and "le" in bounds:
        allowed = f"{bounds['ge']} to {bounds['le']}"
    else:
        low = f"at least {bounds['ge']}" if "ge" in bounds else None
        low = f"above {bounds['gt']}" if "gt" in bounds else low
        high = f"at most {bounds['le']}" if "le" in bounds else None
        high = f"below {bounds['lt']}" if "lt" in bounds else high
        allowed = " and ".join(b for b in (low, high) if b)
    text = field.description or ""
    return f"{text} Range: {allowed}." if allowed else text


def _help(setting: str) -> str:
    return setting_help(SETTINGS[setting])


DeviceOpt = Annotated[str, typer.Option(help=_help("device"))]
ScoreOpt = Annotated[ScoreName, typer.Option(help=_help("score"))]
BackendOpt = Annotated[BackendName, typer.Option(help=_help("backend"))]
CacheDirOpt = Annotated[Path | None, typer.Option(help=_help("cache_dir"))]
PublicKeyOpt = Annotated[Path | None, typer.Option(help=_help("public_key"))]
# A flag with no --no- form, as in `run`.
RequireSignedOpt = Annotated[bool, typer.Option("--require-signed", help=_help("require_signed"))]


def load_detector(
    model: Path,
    *,
    device: str,
    score: ScoreName = "auto",
    backend: BackendName = "eager",
    public_key: Path | None = None,
    require_signed: bool = False,
    **engine: Any,
) -> Detector:
    """The verified bundle at `model`, loaded as the options ask; `engine` passes the encoder's
    `cache_dir` and `batch_size` on to Detector. Torch is imported here, not when the CLI
    starts."""
    from sdns_monitor.detector import Detector

    return Detector.load(
        model,
        device=device,
        score=score,
        backend=backend,
        public_key=public_key,
        require_signed=require_signed,
        **engine,
    )
