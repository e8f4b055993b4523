"""Routes: message keys (cameras) scored by other bundles than `model` (stream/routing.py)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    model_validator,
)


class Route(BaseModel):
    """Keys (exact, or a regex over the whole key) scored by the bundle at `model`
    (sdns_monitor.routing)."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    keys: list[str] = []
    key_pattern: str | None = None

    @model_validator(mode="after")
    def _something_to_match(self) -> Route:
        if not self.keys and self.key_pattern is None:
            raise ValueError(f"the route to {self.model} needs keys or a key_pattern")
        if self.key_pattern is not None:
            try:
                re.compile(self.key_pattern)
            except re.error as exc:
                raise ValueError(
                    f"key_pattern {self.key_pattern!r} is not a regex: {exc}"
                ) from None
        return self

    def matches(self, key: str) -> bool:
        if key in self.keys:
            return True
        return self.key_pattern is not None and re.fullmatch(self.key_pattern, key) is not None
