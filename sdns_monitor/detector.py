"""`Detector`: load a bundle, score images. The library API that services embed.

>>> det = Detector.load("models/cam1.sdns")
>>> result = det.score(frames)            # uint8 arrays, float tensors, PIL images or bytes
>>> result.scores, result.p_values, result.flags
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image

from sdns_monitor.backends import build_encoder
from sdns_monitor.bundle import Bundle, load_bundle
from sdns_monitor.device import resolve_device
from sdns_monitor.errors import BundleError, ConfigError, FrameError
from sdns_monitor.features import extract_features
from sdns_monitor.frames import decode_bytes, from_array, from_pil
from sdns_monitor.index import ReferenceIndex
from sdns_monitor.lowlevel import LowLevelScorer
from sdns_monitor.networks import create_backbone
from sdns_monitor.preprocess import prepare_uint8
from sdns_monitor.scoring import ScoreResult, p_values

ImageInput = np.ndarray | torch.Tensor | Image.Image | bytes
ScoreMode = Literal["auto", "sdns", "combined"]


def check_rule(alarm_rate: float | None, threshold: float | None) -> None:
    """The two flagging rules are mutually exclusive (DESIGN.md "Thresholds")."""
    if alarm_rate is not None and threshold is not None:
        raise ConfigError("--alarm-rate and --threshold are mutually exclusive; give one")
    if alarm_rate is not None and not 0.0 < alarm_rate < 1.0:
        raise ConfigError(f"--alarm-rate must lie in (0, 1), got {alarm_rate}")


class Detector:
    """A loaded model: encoder, reference index and calibration scores.

    `score`: "sdns" is the paper's kernel score on teacher features; "combined" adds the
    low-level score (sdns_monitor.lowlevel), when the bundle has one; "auto" takes the bundle's
    default, which `fit` chose on validation data.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "auto",
        batch_size: int = 256,
        score: ScoreMode = "auto",
        backend: str = "eager",
        cache_dir: Path | None = None,
    ):
        """`backend`: eager, compile, tensorrt or auto (sdns_monitor.backends); `cache_dir`
        holds TensorRT engines (default ~/.cache/sdns-monitor)."""
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = batch_size
        encoder = create_backbone(self.manifest.backbone)
        try:
            encoder.load_state_dict(bundle.state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BundleError(f"{bundle.path}: weights do not fit the backbone ({first})") from None
        self.encoder, self.backend = build_encoder(
            encoder,
            backend,
            self.device,
            self.manifest.input,
            bundle_hash=bundle.hash,
            cache_dir=cache_dir,
            max_batch=batch_size,
        )
        spec = self.manifest.score
        self.k = spec.k
        self.index = ReferenceIndex(bundle.features, spec.index_factory, self.device)
        self.index.prepare(self.k)
        self.temperature = spec.temperature
        self.alarm_rate = self.manifest.calibration.default_alarm_rate
        low = spec.lowlevel
        self.lowlevel: LowLevelScorer | None = None
        mode = score
        if mode == "auto":
            mode = spec.default if low is not None else "sdns"
        if mode == "combined":
            if low is None or bundle.lowlevel is None or bundle.calibration_combined is None:
                raise ConfigError(
                    f"{bundle.path} has no combined score (fitted without the low-level bank); "
                    "use --score sdns or refit"
                )
            self.lowlevel = LowLevelScorer(low, bundle.lowlevel, self.device)
            self.calibration = bundle.calibration_combined
        elif mode == "sdns":
            self.calibration = bundle.calibration
        else:
            raise ConfigError(f"unknown score {mode!r}; use auto, sdns or combined")
        self.score_mode: Literal["sdns", "combined"] = mode

    @property
    def held_out_ratio(self) -> float | None:
        """How many times the alarm rate held-out reference images were flagged with this
        detector's score, at worst (bundle.HeldOutCheck); None if the bundle has no check."""
        check = self.manifest.calibration.held_out.get(self.score_mode)
        return None if check is None else check.ratio

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        *,
        public_key: Path | None = None,
        require_signed: bool = False,
        **kwargs: Any,
    ) -> Detector:
        """Load and verify the bundle at `path` (and its signature, given `public_key`)."""
        bundle = load_bundle(path, public_key=public_key, require_signed=require_signed)
        return cls(bundle, device=device, **kwargs)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def hash(self) -> str:
        return self.bundle.hash

    # ------------------------------------------------------------------ inputs
    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Any accepted input -> uint8 N x size x size x channels, ready for the encoder.

        numpy arrays follow DESIGN.md "Frames" (H x W, H x W x C, N x H x W x C; uint8 or
        floats in [0, 1]); float tensors are N x C x H x W in [0, 1]; PIL images and encoded
        bytes (JPEG, PNG, WebP, .npy) are decoded. A list may mix them.
        """
        spec = self.manifest.input
        if isinstance(images, list | tuple):
            parts = [self.prepare(item) for item in images]
            if not parts:
                return np.zeros((0, spec.size, spec.size, spec.channels), np.uint8)
            return np.concatenate(parts)
        return prepare_uint8(_to_frames(cast(ImageInput, images)), spec.size, spec.channels)

    # ------------------------------------------------------------------ scoring
    def features(self, prepared: np.ndarray) -> torch.Tensor:
        """Unit-norm teacher features of prepared images (see `prepare`)."""
        return extract_features(
            self.encoder, prepared, self.manifest.input, self.device, self.batch_size
        )

    def anomaly_scores(self, prepared: np.ndarray) -> np.ndarray:
        """Anomaly scores of prepared images (the detector's score mode); higher = more
        out-of-distribution."""
        sdns = self.sdns_scores(prepared)
        return sdns if self.lowlevel is None else self.lowlevel.combined(sdns, prepared)

    def sdns_scores(self, prepared: np.ndarray) -> np.ndarray:
        """a(z), the paper's kernel score on teacher features, whatever the score mode."""
        feats = self.features(prepared)
        return self.index.kernel_scores(feats, self.k, self.temperature)

    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        alarm_rate: float | None = None,
        threshold: float | None = None,
    ) -> ScoreResult:
        """Scores, conformal p-values and flags. Flags are p < alarm_rate (default: the
        bundle's) or, when `threshold` is given, score > threshold."""
        check_rule(alarm_rate, threshold)
        scores = self.anomaly_scores(self.prepare(images))
        return self.result(scores, alarm_rate=alarm_rate, threshold=threshold)

    def result(
        self, scores: np.ndarray, *, alarm_rate: float | None = None, threshold: float | None = None
    ) -> ScoreResult:
        """Turn anomaly scores into p-values and flags."""
        pv = p_values(scores, self.calibration)
        if threshold is not None:
            return ScoreResult(scores, pv, scores > threshold, None, threshold)
        rate = self.alarm_rate if alarm_rate is None else alarm_rate
        return ScoreResult(scores, pv, pv < rate, rate, None)


def _to_frames(item: ImageInput) -> np.ndarray:
    """One input -> uint8 N x H x W x C."""
    if isinstance(item, np.ndarray):
        return from_array(item)
    if isinstance(item, torch.Tensor):
        if not item.is_floating_point() or item.ndim != 4:
            raise FrameError(
                f"tensors must be float N x C x H x W in [0, 1], got {item.dtype} {tuple(item.shape)}; "
                "pass uint8 images as numpy arrays"
            )
        return from_array(item.detach().float().cpu().permute(0, 2, 3, 1).numpy())
    if isinstance(item, Image.Image):
        return from_pil(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_bytes(bytes(item))
    raise FrameError(
        f"cannot score a {type(item).__name__}: pass arrays, tensors, PIL images or bytes"
    )
