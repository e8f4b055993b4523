"""Dataset spec strings: ``NAME[:ARG[:ARG]][@CLASSES]``, or a ``kafka://`` URL.

Examples: ``mnist:test``, ``fashion-mnist:train@0-4``, ``animals@3``, ``textures:1000``,
``folder:/data/reference``, ``npz:/data/frames.npz``, ``cifar10:/data/cifar:test@0,2,5``,
``svhn:/data/svhn:extra``. Parsing validates names, splits and counts once, at the edge, and
fills in defaults, so the readers get complete arguments.

Frames already on a Kafka topic (`sdns_monitor.data.kafka_topic`):

    kafka://HOST[:PORT][,HOST[:PORT]...]/TOPIC[?max=N][&timeout_s=S]

e.g. ``kafka://127.0.0.1:9092/camera-frames?max=5000&timeout_s=60``. The topic is read from
its earliest offsets up to the end offsets it has when reading starts, with no consumer group
(nothing is committed): at most ``max`` decodable frames (default: every frame on the topic),
taken round-robin over the partitions so that every camera is represented. ``timeout_s``
(default 60) bounds the whole read, connecting included. PORT defaults to 9092. Frames carry
no labels, so a ``@CLASSES`` filter is refused. TLS and SASL come from the ``SDNS_*`` variables
`run` reads (``SDNS_SECURITY_PROTOCOL``, ...; docs/configuration.md), never from the URL.
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
    "kafka": "kafka://HOST:PORT/TOPIC[?max=N&timeout_s=S]",
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
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")  # Kafka's legal topic names
_HOST_RE = re.compile(r"[a-zA-Z0-9._-]+|\[[0-9a-fA-F:.]+\]")  # a name, IPv4, or [IPv6]
KAFKA_DEFAULT_PORT = 9092
KAFKA_DEFAULT_TIMEOUT_S = 60.0
_KAFKA_PARAMS = ("max", "timeout_s")
_CLASSES_RE = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec. `args` are complete: defaults filled in, splits validated.

    mnist, fashion-mnist: (split,); animals: (); textures, photos: (count,);
    folder, npz: (path,); cifar10, cifar100, svhn: (root, split);
    kafka: (bootstrap servers "host:port[,host:port]", topic, max frames or "all", timeout_s).
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
    if head == "kafka":
        return DatasetSpec(head, _parse_kafka(text, spec))

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


def _parse_kafka(text: str, spec: str) -> tuple[str, ...]:
    """kafka://HOST[:PORT][,HOST[:PORT]...]/TOPIC[?max=N][&timeout_s=S] -> (servers, topic,
    max or "all", timeout_s)."""
    form = USAGE["kafka"]
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "kafka":
        raise DataError(f"spec {spec!r}: write {form}")
    if "@" in rest:
        raise DataError(
            f"spec {spec!r}: frames on a topic carry no labels, so they take no @class filter "
            "(nor user@host: credentials do not go in the spec)"
        )
    rest, _, query = rest.partition("?")
    netloc, slash, topic = rest.partition("/")
    if not slash or not _TOPIC_RE.fullmatch(topic):
        raise DataError(
            f"spec {spec!r}: {topic!r} is not a topic name (letters, digits, '.', '_', '-'); "
            f"write {form}"
        )
    servers = [_parse_server(s.strip(), spec, form) for s in netloc.split(",")]
    params: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        if key not in _KAFKA_PARAMS or not eq:
            raise DataError(
                f"spec {spec!r}: unknown option {item!r}; the options are max=N and timeout_s=S"
            )
        params[key] = value
    limit = params.get("max", "all")
    if limit != "all" and (not limit.isdigit() or int(limit) <= 0):
        raise DataError(f"spec {spec!r}: max must be a positive number of frames, got {limit!r}")
    timeout = params.get("timeout_s", str(KAFKA_DEFAULT_TIMEOUT_S))
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise DataError(f"spec {spec!r}: timeout_s must be a positive number, got {timeout!r}")
    limit = limit if limit == "all" else str(int(limit))
    return (",".join(servers), topic, limit, str(seconds))


def _parse_server(server: str, spec: str, form: str) -> str:
    host, colon, port = server.rpartition(":") if not server.endswith("]") else (server, "", "")
    if not colon:
        host, port = server, str(KAFKA_DEFAULT_PORT)
    if not _HOST_RE.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise DataError(f"spec {spec!r}: bad broker address {server!r}; write {form}")
    return f"{host}:{int(port)}"


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
