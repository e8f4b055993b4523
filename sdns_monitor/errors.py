"""Errors a user can meet. Each message says what was wrong and what to do.

The CLI prints them on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


class SdnsError(Exception):
    """Base class of every error the project raises on purpose."""


class DataError(SdnsError):
    """A dataset spec, a path or a file that cannot be read."""


class FrameError(SdnsError):
    """One input frame (image bytes or array) that cannot be turned into an image."""


class BundleError(SdnsError):
    """A model bundle that is missing, incomplete, tampered with or of another format."""


class ConfigError(SdnsError):
    """An invalid option or combination of options."""


class TrainingError(SdnsError):
    """Training cannot go on (a non-finite loss, ...)."""


class UnreadableRecord(SdnsError):
    """A Kafka record the client cannot parse (a header key that is not UTF-8, a corrupt batch):
    `run` skips it and names it in a dead-letter reference record."""


class OutputError(SdnsError):
    """`run`'s alerts, scores or dead letters could not be delivered; nothing was committed."""


class ScoringUnavailable(OutputError):
    """The model failed on every frame of a batch, and on the frames before it: a fault of the
    model or its device (a GPU error), not of the frames. The batch is not committed and is
    retried, as when outputs are not delivered."""


class OutputRefused(SdnsError):
    """A record `run` produced (an alert, a score) that the broker refused for good; a
    dead-letter reference names the frame it was about."""


class BrokerUnreachable(SdnsError):
    """No Kafka broker answered when `run` started."""


class MissingExtraError(SdnsError):
    """An optional component (TensorRT, GPU FAISS, ...) was asked for but is not installed."""


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """(where, what) of a pydantic error's first problem, for a one-line message.

    Pydantic's own message spans several lines per problem; users get the first one, named by
    its field path (e.g. "score.k"), which is usually all they need to fix.
    """
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"] if not str(x).startswith("constrained-"))
    return where, str(first["msg"])
