"""Spec strings: names, splits, defaults, class filters and the errors a user meets."""

from __future__ import annotations

import pytest

from sdns_monitor.data import KNOWN, DatasetSpec, parse_spec, usage
from sdns_monitor.errors import DataError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mnist:test", DatasetSpec("mnist", ("test",))),
        ("mnist", DatasetSpec("mnist", ("train",))),
        ("MNIST:Val", DatasetSpec("mnist", ("val",))),
        ("fashion-mnist:test@0-4", DatasetSpec("fashion-mnist", ("test",), (0, 1, 2, 3, 4))),
        ("animals@3", DatasetSpec("animals", (), (3,))),
        ("animals@5,0,2", DatasetSpec("animals", (), (0, 2, 5))),
        ("animals@0-1,7", DatasetSpec("animals", (), (0, 1, 7))),
        ("textures", DatasetSpec("textures", ("5000",))),
        ("photos:100", DatasetSpec("photos", ("100",))),
        ("folder:/data/ref", DatasetSpec("folder", ("/data/ref",))),
        ("folder:/data/a:b@c", DatasetSpec("folder", ("/data/a:b@c",))),
        ("folder:/data/ref@1,2", DatasetSpec("folder", ("/data/ref",), (1, 2))),
        ("npz:/x/f.npz", DatasetSpec("npz", ("/x/f.npz",))),
        ("cifar10:/root:test", DatasetSpec("cifar10", ("/root", "test"))),
        ("cifar10:/root", DatasetSpec("cifar10", ("/root", "train"))),
        (
            "cifar100:/r/cifar-100-python:train@0,2,5",
            DatasetSpec("cifar100", ("/r/cifar-100-python", "train"), (0, 2, 5)),
        ),
        ("svhn:relative/dir:extra", DatasetSpec("svhn", ("relative/dir", "extra"))),
    ],
)
def test_parse_spec_fills_defaults_and_classes(text: str, expected: DatasetSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("imagenet:train", "unknown dataset 'imagenet'"),
        ("", "unknown dataset ''"),
        ("mnist:bogus", "bad split 'bogus'.*train, val, test"),
        ("fashion-mnist:val", "bad split 'val'"),
        ("cifar10:/root:valid", "bad split 'valid'"),
        ("svhn:/root:validation", "bad split"),
        ("mnist:test@x", "bad class filter 'x'"),
        ("mnist:test@4-1", "bad class range '4-1'"),
        ("animals:train", "animals takes no argument"),
        ("textures:-5", "positive integer"),
        ("photos:0", "positive integer"),
        ("textures:lots", "positive integer"),
        ("folder:", "needs a path"),
        ("npz", "needs a path"),
        ("cifar100", "root directory"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_spec(text)


def test_known_names_and_usage_cover_every_dataset() -> None:
    assert set(KNOWN) == {
        "mnist",
        "fashion-mnist",
        "animals",
        "textures",
        "photos",
        "folder",
        "npz",
        "cifar10",
        "cifar100",
        "svhn",
        "kafka",
    }
    line = usage()
    assert all(name in line for name in KNOWN)
    assert "\n" not in line
