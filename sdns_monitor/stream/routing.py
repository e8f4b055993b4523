"""Many cameras, many models, one `run`: message keys routed to bundles.

A camera's notion of normal is its own scene, so a fleet usually needs one model per camera or
per group of cameras. Routes, in the config file, map keys to bundles; the first route that
matches a key wins, and keys no route matches use `model`:

    model = "models/default.sdns"

    [[routes]]
    keys = ["lobby-1", "lobby-2"]          # exact keys (UTF-8)
    model = "models/lobby.sdns"

    [[routes]]
    key_pattern = "parking-.*"             # a regular expression the whole key must match
    model = "models/parking.sdns"

Each bundle is loaded once, however many routes name it. Frames of several models in one
micro-batch are scored model by model and their records sent in offset order, so commits and
delivery guarantees are the same as with one model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdns_monitor.detector import Detector
from sdns_monitor.settings import Route

_CACHE_LIMIT = 65_536  # distinct keys remembered; beyond that routes are matched again
_CACHED_KEY_BYTES = 256  # longer keys are matched each time (a producer's junk keys are not kept)


@dataclass
class Models:
    """The models of one monitor: `default` and one Detector per route (routes naming the same
    bundle share it). Immutable once built; a reload builds a new one."""

    default: Detector
    routes: list[tuple[Route, Detector]] = field(default_factory=list)
    _cache: dict[bytes | None, Detector] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        default: Path,
        routes: list[Route],
        load: Callable[[Path], Detector],
        reuse: Models | None = None,
        changed: set[Path] | None = None,
    ) -> Models:
        """Load every bundle once. With `reuse`, bundles not in `changed` (None: all changed)
        keep the Detector already loaded."""
        loaded: dict[Path, Detector] = {}
        if reuse is not None and changed is not None:
            for path, det in reuse.by_path().items():
                if path not in changed:
                    loaded[path] = det
            if default not in changed:  # the model in use, wherever it was loaded from
                loaded[default] = reuse.default

        def get(path: Path) -> Detector:
            if path not in loaded:
                loaded[path] = load(path)
            return loaded[path]

        return cls(get(default), [(r, get(r.model)) for r in routes])

    def by_path(self) -> dict[Path, Detector]:
        out = {Path(self.default.bundle.path): self.default}
        for route, det in self.routes:
            out.setdefault(route.model, det)
        return out

    def unique(self) -> list[Detector]:
        """Each loaded model once (the default first)."""
        seen: dict[int, Detector] = {id(self.default): self.default}
        for _, det in self.routes:
            seen.setdefault(id(det), det)
        return list(seen.values())

    def for_key(self, key: bytes | None) -> Detector:
        """The model of a message key. Keys that are not UTF-8 match no route."""
        found = self._cache.get(key)
        if found is not None:
            return found
        found = self.default
        if key is not None and self.routes:
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None:
                found = next((det for route, det in self.routes if route.matches(text)), found)
        if len(self._cache) < _CACHE_LIMIT and (key is None or len(key) <= _CACHED_KEY_BYTES):
            self._cache[key] = found  # threads may race to the same answer: harmless
        return found
