"""sdns-monitor: out-of-distribution monitoring of image streams (the runtime package).

    >>> from sdns_monitor import Detector
    >>> det = Detector.load("models/cam1.sdns")
    >>> result = det.score(images)  # scores, p-values, flags

Higher score = more out-of-distribution, everywhere in the project.
"""

__version__ = "0.1.0"

from sdns_monitor.detector import Detector
from sdns_monitor.scoring import ScoreResult

__all__ = ["Detector", "ScoreResult", "__version__"]
