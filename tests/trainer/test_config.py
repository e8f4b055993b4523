"""Training configuration: recipes, overrides, validation at the edge, size resolution."""

from __future__ import annotations

import pytest

from sdns_monitor.errors import ConfigError
from trainer.config import RECIPES, TrainConfig, make_config


def test_unknown_recipe_is_a_config_error_listing_the_recipes() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'turbo'") as info:
        make_config("turbo")
    for name in RECIPES:
        assert name in str(info.value)


def test_recipe_values_apply_and_none_overrides_are_ignored() -> None:
    cfg = make_config("quick", width=None, epochs=None, seed=None, aux=None)
    assert cfg.recipe == "quick"
    assert cfg.width == RECIPES["quick"]["width"]
    assert cfg.epochs == RECIPES["quick"]["epochs"]
    assert cfg.seed == TrainConfig().seed
    assert cfg.aux == TrainConfig().aux


def test_explicit_overrides_beat_the_recipe() -> None:
    cfg = make_config("quick", width=8, epochs=3, aux=["photos"])
    assert (cfg.width, cfg.epochs, cfg.aux) == (8, 3, ["photos"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("width", 2), ("lr", -1.0), ("batch_size", 1), ("negatives", "rot45"), ("alarm_rate", 1.5)],
)
def test_invalid_value_is_a_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"invalid training option {field}"):
        make_config("quick", **{field: value})


def test_unknown_option_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        make_config("quick", bogus=1)


def test_raw_aux_negatives_need_aux_source() -> None:
    with pytest.raises(ConfigError, match="neg_source 'aux'"):
        make_config("quick", negatives="none", neg_source="id")
    with pytest.raises(ConfigError):
        make_config("quick", negatives="none", neg_source="both")
    cfg = make_config("quick", negatives="none", neg_source="aux")
    assert cfg.uses_aux


def test_aux_sources_need_aux_data_unless_negatives_are_off() -> None:
    with pytest.raises(ConfigError, match="auxiliary data"):
        make_config("quick", aux=[], neg_source="both")
    assert not make_config("quick", aux=[], neg_source="id").uses_aux
    assert not make_config("quick", aux=[], negatives="off").uses_aux


def test_with_sizes_from_native_size() -> None:
    cfg = make_config("quick")
    with pytest.raises(RuntimeError):
        _ = cfg.sizes
    assert cfg.with_sizes(28).sizes == (28, 28, 14)
    assert cfg.with_sizes(64).sizes == (32, 32, 16)  # data size is capped at 32
    assert cfg.with_sizes(16).sizes == (16, 16, 8)
    assert cfg.with_sizes(6).sizes[2] == 4  # local crops never below 4 px


def test_with_sizes_keeps_explicit_sizes() -> None:
    cfg = make_config("paper-cifar10").with_sizes(28)
    assert cfg.sizes == (32, 256, 128)
    assert make_config("quick", data_size=20).with_sizes(64).sizes == (20, 20, 10)


def test_global_size_below_data_size_is_refused() -> None:
    with pytest.raises(ConfigError):
        make_config("quick", data_size=32, global_size=16)


def test_config_round_trips_through_json() -> None:
    cfg = make_config("default", width=8, aux=["textures"]).with_sizes(28)
    again = TrainConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg


def test_raw_negatives_default_to_auxiliary_source() -> None:
    assert make_config("quick", negatives="none").neg_source == "aux"
    with pytest.raises(ConfigError, match="needs neg_source 'aux'"):
        make_config("quick", negatives="none", neg_source="id")
