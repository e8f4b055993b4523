"""The layout promises of docs/architecture.md: modules readable in one sitting, each named."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
MAX_LINES = 450
# Packages whose every module docs/architecture.md names; data/ and report/ are named as folders.
NAMED = ["sdns_monitor", "sdns_monitor/stream", "sdns_monitor/cli", "trainer"]


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "sdns_monitor").rglob("*.py")) + sorted((ROOT / "trainer").rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_module_is_longer_than_one_sitting(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by idea"


def test_the_architecture_page_names_every_module() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for package in NAMED
        for p in _modules(package)
        if f"`{p.name}`" not in ARCHITECTURE
    ]
    assert missing == [], f"docs/architecture.md does not describe {missing}"
    for folder in ("data/", "report/", "cli/", "stream/", "settings/"):
        assert f"`{folder}`" in ARCHITECTURE
