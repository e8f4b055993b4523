"""Routing keys (cameras) to bundles: route validation, first match wins, reuse on reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdns_monitor.detector import Detector
from sdns_monitor.errors import ConfigError
from sdns_monitor.settings import Route, load_settings
from sdns_monitor.stream.routing import Models


def _settings_with(tmp_path: Path, text: str) -> object:
    config = tmp_path / "c.toml"
    config.write_text("topic = ['frames']\nmodel = 'default.sdns'\n" + text)
    return load_settings({}, {}, config)


def test_routes_come_from_the_config_file(tmp_path: Path) -> None:
    settings = _settings_with(
        tmp_path,
        "[[routes]]\nkeys = ['a', 'b']\nmodel = 'ab.sdns'\n"
        "[[routes]]\nkey_pattern = 'park-.*'\nmodel = 'park.sdns'\n",
    )
    routes = settings.routes  # type: ignore[attr-defined]
    assert [r.model for r in routes] == [Path("ab.sdns"), Path("park.sdns")]
    assert routes[0].keys == ["a", "b"] and routes[1].key_pattern == "park-.*"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[routes]]\nmodel = 'x.sdns'\n", "needs keys or a key_pattern"),
        ("[[routes]]\nkey_pattern = '(['\nmodel = 'x.sdns'\n", "is not a regex"),
        ("[[routes]]\nkeys = ['a']\n", "routes.0.model"),
        ("[[routes]]\nkeys = ['a']\nmodel = 'x.sdns'\ncamera = 'a'\n", "camera"),
    ],
)
def test_bad_routes_are_one_line_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _settings_with(tmp_path, text)


def test_first_matching_route_wins_and_other_keys_use_the_default(det: Detector) -> None:
    other, third = Detector(det.bundle, device="cpu"), Detector(det.bundle, device="cpu")
    models = Models(
        det,
        [
            (Route(model=Path("b.sdns"), keys=["cam-b"]), other),
            (Route(model=Path("p.sdns"), key_pattern="cam-.*"), third),
        ],
    )
    assert models.for_key(b"cam-b") is other  # exact key, listed first
    assert models.for_key(b"cam-zz") is third  # the pattern
    assert models.for_key(b"xcam-zz") is det  # a pattern matches the whole key only
    assert models.for_key(None) is det and models.for_key(b"\xff\xfe") is det
    assert models.for_key(b"cam-b") is other  # again, from the cache
    assert models.unique() == [det, other, third]


def test_each_bundle_loads_once_and_a_reload_reloads_only_what_changed(det: Detector) -> None:
    loads: list[Path] = []

    def load(path: Path) -> Detector:
        loads.append(path)
        return Detector(det.bundle, device="cpu")

    routes = [
        Route(model=Path("shared.sdns"), keys=["a"]),
        Route(model=Path("shared.sdns"), keys=["b"]),
        Route(model=Path("own.sdns"), keys=["c"]),
    ]
    models = Models.load(Path("default.sdns"), routes, load)
    assert sorted(loads) == sorted([Path("default.sdns"), Path("shared.sdns"), Path("own.sdns")])
    assert models.for_key(b"a") is models.for_key(b"b")
    loads.clear()
    again = Models.load(Path("default.sdns"), routes, load, models, changed={Path("own.sdns")})
    assert loads == [Path("own.sdns")]
    assert again.default is models.default and again.for_key(b"a") is models.for_key(b"a")
    assert again.for_key(b"c") is not models.for_key(b"c")


def test_the_key_cache_holds_no_long_keys(tiny_bundle: Path) -> None:
    det = Detector.load(tiny_bundle, device="cpu")
    route = Route(model=tiny_bundle, key_pattern="lobby-.*")
    models = Models(det, [(route, det)])
    for i in range(50):  # fifty 1 MB keys once held 48 MiB in the cache
        models.for_key(b"%d" % i + b"k" * 1_000_000)
    assert models.for_key(b"lobby-1") is det and models._cache.keys() == {b"lobby-1"}
