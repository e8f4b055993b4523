"""sdns-monitor: out-of-distribution monitoring of image streams (the runtime package).

    >>> from sdns_monitor import Detector
    >>> det = Detector.load("models/cam1.sdns")
    >>> result = det.score(images)  # scores, p-values, flags

Higher score = more out-of-distribution, everywhere in the project.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sdns_monitor.detector import Detector
    from sdns_monitor.scoring import ScoreResult

__all__ = ["Detector", "ScoreResult", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the detector on first use: `sdns_monitor.errors`, `.frames` or `.records` alone
    (alert consumers, producers) should not pay for importing torch."""
    if name == "Detector":
        from sdns_monitor.detector import Detector

        return Detector
    if name == "ScoreResult":
        from sdns_monitor.scoring import ScoreResult

        return ScoreResult
    raise AttributeError(f"module 'sdns_monitor' has no attribute {name!r}")
