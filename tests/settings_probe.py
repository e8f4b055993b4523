"""What the settings loader really reads, asked of the loader itself (for tests of docs and
deploy files that name SDNS_* variables)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sdns_monitor.settings import load_settings


def env_read_by_the_loader() -> set[str]:
    """The SDNS_* variables load_settings looks up: ask it, through a recording mapping."""

    class Recorder(Mapping[str, str]):
        def __init__(self) -> None:
            self.asked: set[str] = set()

        def __getitem__(self, key: str) -> str:
            self.asked.add(key)
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

    env = Recorder()
    load_settings({"topic": ["frames"], "model": "m.sdns"}, env)
    assert "SDNS_BOOTSTRAP_SERVERS" in env.asked, "the loader no longer looks names up one by one"
    return {name for name in env.asked if name.startswith("SDNS_")}
