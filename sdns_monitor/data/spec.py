"""Dataset spec strings: ``NAME[:ARG[:ARG]][@CLASSES]``.

Examples: ``mnist:test``, ``fashion-mnist:train@0-4``, ``animals@3``, ``textures:1000``,
``folder:/data/reference``, ``npz:/data/frames.npz``, ``cifar10:/data/cifar:test@0,2,5``,
``svhn:/data/svhn:extra``. Parsing validates names, splits and counts once, at the edge, and
fills in defaults, so the readers get complete arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdns_monitor.errors import DataError

# name -> usage line; the order is the order of help texts.
USAGE: dict[str, str] = {
    "mnist": "mnist[:train|val|test]",
    "fashion-mnist": "fashion-mnist[:train|test]",
    "animals": "animals",
    "textures": "textures[:N]",
    "photos": "photos[:N]",
    "folder": "folder:/path/to/images",
    "npz": "npz:/path/to/file.npz",
    "cifar10": "cifar10:/root[:train|test]",
    "cifar100": "cifar100:/root[:train|test]",
    "svhn": "svhn:/root[:train|test|extra]",
}
KNOWN: tuple[str, ...] = tuple(USAGE)

SPLITS: dict[str, tuple[str, ...]] = {
    "mnist": ("train", "val", "test"),
    "fashion-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn": ("train", "test", "extra"),
}
DEFAULT_SPLIT = "train"
DEFAULT_CROPS = 5000

_ROOTED = frozenset({"cifar10", "cifar100", "svhn"})  # a root directory, then a split
_PATHED = frozenset({"folder", "npz"})  # one path, which may itself contain ':' or '@'
_COUNTED = frozenset({"textures", "photos"})  # an optional number of crops
_CLASSES_RE = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec. `args` are complete: defaults filled in, splits validated.

    mnist, fashion-mnist: (split,); animals: (); textures, photos: (count,);
    folder, npz: (path,); cifar10, cifar100, svhn: (root, split).
    `classes` is the sorted class filter, or None for all classes.
    """

    name: str
    args: tuple[str, ...]
    classes: tuple[int, ...] | None = None


def usage() -> str:
    """One line listing every spec form, for help texts and error messages."""
    return ", ".join(USAGE.values()) + "; append @3, @0-4 or @0,2,5 to keep only those classes"


def parse_spec(spec: str) -> DatasetSpec:
    """Parse and validate a spec string; raise DataError saying what is wrong.

    >>> parse_spec("fashion-mnist:test@0-2")
    DatasetSpec(name='fashion-mnist', args=('test',), classes=(0, 1, 2))
    """
    text = spec.strip()
    head = re.split(r"[:@]", text, maxsplit=1)[0].strip().lower()
    if head not in USAGE:
        raise DataError(f"unknown dataset {head!r} in spec {spec!r}; use one of: {usage()}")

    body, classes = text, None
    before, at, tail = text.rpartition("@")
    if at:
        if _CLASSES_RE.fullmatch(tail):
            body, classes = before, _parse_classes(tail, spec)
        elif head not in _PATHED | _ROOTED:  # there, '@' may belong to a path
            raise DataError(f"bad class filter {tail!r} in spec {spec!r}; write @3, @0-4 or @0,2,5")

    _, colon, rest = body.partition(":")
    arg = rest.strip() if colon else None
    return DatasetSpec(head, _parse_args(head, arg, spec), classes)


def _parse_args(name: str, arg: str | None, spec: str) -> tuple[str, ...]:
    if name in _PATHED:
        if not arg:
            raise DataError(f"spec {spec!r} needs a path: {USAGE[name]}")
        return (arg,)
    if name in _ROOTED:
        if not arg:
            raise DataError(f"spec {spec!r} needs the dataset's root directory: {USAGE[name]}")
        root, colon, last = arg.rpartition(":")
        if colon and "/" not in last and "\\" not in last:
            return (root, _check_split(name, last, spec))
        return (arg, DEFAULT_SPLIT)
    if name in _COUNTED:
        if arg is None:
            return (str(DEFAULT_CROPS),)
        if not arg.isdigit() or int(arg) <= 0:
            raise DataError(f"spec {spec!r}: the number of crops must be a positive integer")
        return (str(int(arg)),)
    if name in SPLITS:
        return (_check_split(name, arg if arg is not None else DEFAULT_SPLIT, spec),)
    if arg is not None:
        raise DataError(f"spec {spec!r}: {name} takes no argument; write {USAGE[name]}")
    return ()


def _check_split(name: str, split: str, spec: str) -> str:
    split = split.strip().lower()
    if split not in SPLITS[name]:
        raise DataError(
            f"bad split {split!r} in spec {spec!r}; {name} has: {', '.join(SPLITS[name])}"
        )
    return split


def _parse_classes(text: str, spec: str) -> tuple[int, ...]:
    keep: set[int] = set()
    for item in text.split(","):
        lo, dash, hi = item.partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise DataError(f"bad class range {item.strip()!r} in spec {spec!r}; write low-high")
        keep.update(range(first, last + 1))
    return tuple(sorted(keep))
