"""`RunSettings`: every setting of `sdns-monitor run`, one field each; the field's description
is its option's help and its row in docs/configuration.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sdns_monitor.settings.kafka import KafkaSecurity
from sdns_monitor.settings.routes import Route

_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# The choices of Detector's `score` and of sdns_monitor.backends, spelled here so that settings
# (and the command line) load without torch.
ScoreName = Literal["auto", "sdns", "combined"]
BackendName = Literal["auto", "eager", "compile", "tensorrt"]


class RunSettings(BaseModel):
    """Everything `run` needs; field names are the option names with '-' as '_'.

    Each description is the help of the field's option and its entry in
    docs/configuration.md (docs/gen_config.py); the field order is the order of `run --help`.
    Names of other settings are written as config keys, in backticks.
    """

    model_config = ConfigDict(extra="forbid")

    topic: list[str] = Field(
        default_factory=list,
        description="Topics of frames to watch. Give `topic` or `topic_pattern`, not both.",
    )
    topic_pattern: str | None = Field(
        default=None,
        description="A regular expression: every topic whose name matches is watched, "
        "including topics created later. It must not match the output topics (`alert_topic`, "
        "`dlq_topic`, `scores_topic`; matched as the Kafka client does, from the start of the "
        "name): that is refused at start-up, since a monitor reading its own dead letters would "
        "turn each into a new one without end. Anchor it: `^camera-.*`.",
    )
    model: Path = Field(
        description="The bundle directory, or a symlink to one. Its path is watched for "
        "changes (hot reload)."
    )
    bootstrap_servers: str = Field(
        default="localhost:9092", description="Brokers to connect to, `host:port[,host:port...]`."
    )
    group_id: str = Field(
        default="sdns-monitor",
        description="Kafka consumer group. Every replica of one monitor uses the same group; "
        "Kafka splits the partitions between them. A second group on the same topics is a "
        "second, independent monitor.",
    )
    alert_topic: str = Field(
        default="sdns-alerts", description="Where the alert and incident-closed records go."
    )
    dlq_topic: str = Field(
        default="sdns-dead-letters",
        description="Where messages that could not be decoded or scored go, unchanged, with "
        "`sdns-*` headers saying why.",
    )
    scores_topic: str | None = Field(
        default=None, description="When set, one score record per frame goes here, flagged or not."
    )
    batch_size: int = Field(default=64, ge=1, le=8192, description="Messages per micro-batch.")
    max_wait_ms: int = Field(
        default=100,
        ge=0,
        le=60_000,
        description="The longest a micro-batch waits to fill after its first message: the "
        "latency added on a quiet stream.",
    )
    decode_workers: int = Field(
        default=2, ge=1, le=64, description="Threads that decode and resize frames."
    )
    queue_batches: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Micro-batches between the consumer and the commit (decoding, scoring, "
        "awaiting acks); beyond that the consumer pauses instead of buffering. 1 makes the "
        "loop sequential.",
    )
    alarm_rate: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Flag a frame when its p-value is below this. Unset: the bundle's default "
        "alarm rate (`sdns-monitor info` shows it).",
    )
    threshold: float | None = Field(
        default=None,
        description="Flag a frame when its raw anomaly score is above this, instead of "
        "`alarm_rate` (the two are mutually exclusive).",
    )
    from_beginning: bool = Field(
        default=False,
        description="Where a consumer group with no committed offsets starts: the earliest "
        "offsets instead of the latest (frames published from now on). A group that has "
        "committed offsets always resumes from them.",
    )
    max_frame_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="Larger messages go to the dead-letter topic (without their value). Also "
        "sizes the consumer's fetches and the producer's request limit.",
    )
    max_pixels: int = Field(
        default=3840 * 2160,
        ge=1,
        description="Largest frame a message may hold, in pixels (width x height, summed over "
        "the frames of an `.npy` batch); the default is a 4K camera frame. Checked from the "
        "image header before any pixel is decoded (a JPEG at the reduced size it decodes at), "
        "so a small file claiming a huge image never allocates; larger ones are dead letters.",
    )
    max_frames_per_message: int = Field(
        default=256,
        ge=1,
        description="Most frames one `.npy` message may hold; more is a dead letter, refused "
        "from the array's header before its data is read.",
    )
    max_inflight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Message bytes consumed but not committed; beyond that the consumer pauses, "
        "as it does beyond `queue_batches`.",
    )
    max_inflight_frames: int = Field(
        default=4096,
        ge=1,
        description="Decoded frames consumed but not committed; beyond that the consumer "
        "pauses, as it does beyond `queue_batches`.",
    )
    full_jpeg_decode: bool = Field(
        default=False,
        description="Decode every JPEG at full size. Off, a JPEG is decoded at the smallest of "
        "its DCT scales (1/2, 1/4, 1/8) that keeps both sides at least twice the model's "
        "input size: a 1080p frame for a 64 px model decodes at 1/8, about 4x faster, within "
        "half a grey level of a full decode once resized.",
    )
    device: str = Field(  # checked when the model loads
        "auto",
        description="Where the encoder runs: `auto` (the first CUDA GPU if one is visible, "
        "else the CPU), `cpu`, `cuda` or `cuda:N`.",
    )
    score: ScoreName = Field(
        default="auto",
        description="The anomaly score: `sdns` (the paper's), `combined` (with the low-level "
        "score; the bundle must have it) or `auto` (the bundle's choice).",
    )
    backend: BackendName = Field(
        default="auto",
        description="Encoder backend: `auto` (the fastest available), `eager`, `compile` or "
        "`tensorrt`.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where TensorRT engines are cached; unset: `$XDG_CACHE_HOME/sdns-monitor`, "
        "else `~/.cache/sdns-monitor`. Must be writable when `backend` is `tensorrt` (or "
        "`auto` on a GPU with torch-tensorrt), and private to the service's user (no group or "
        "other write bit; created owner-only when missing): a cached engine is unpickled.",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address of `/metrics`, `/healthz` and `/readyz`. Loopback by default: set "
        "`0.0.0.0` (as the container image does) only where a scraper or a kubelet outside the "
        "host must reach it.",
    )
    metrics_port: int | None = Field(
        default=9108,
        ge=0,
        le=65535,
        description="Port of `/metrics`, `/healthz` and `/readyz`; `0` picks a free one (logged "
        "at start), `off` serves nothing.",
    )
    alerts: Literal["cameras", "frames"] = Field(
        default="cameras",
        description="What raises an alert. `cameras`: a camera's alarm, a sequential test over "
        "its frames' p-values that opens when they stop looking like healthy ones, with "
        "`camera_ert_frames` healthy frames between false alarms; a reminder per "
        "`incident_cooldown_s` while it is open, a `camera-cleared` record when it clears. "
        "`frames`: an incident per key from any flagged frame (before 0.2).",
    )
    camera_ert_frames: float = Field(
        default=63_115_200.0,
        gt=1,
        description="Expected run between false camera alarms, in healthy frames of one camera "
        "(the default is a year of a camera at 2 frames/s); a guaranteed lower bound for "
        "independent healthy frames within `camera_margin` of the calibration.",
    )
    camera_margin: float | None = Field(
        default=None,
        ge=1,
        description="How much more often than the alarm rate a healthy camera's frames may be "
        "flagged with the false-alarm bound still holding (the reference images and a camera's "
        "own frames differ a little). Larger is safer and slower to alarm. Not set: per model, "
        "the larger of 1.5 and the flag rate ratio `fit` measured on held-out reference images "
        "(logged at start).",
    )
    silent_after_s: float = Field(
        default=300.0,
        ge=0,
        description="A camera that sent frames and then none for this many seconds of the "
        "monitor's clock gets one `camera-silent` alert (0: never).",
    )
    event_time: Literal["message", "arrival"] = Field(
        default="message",
        description="The clock of cooldowns and windows: the message timestamp (a replayed "
        "backlog then behaves as the live stream did) or the time `run` consumed it.",
    )
    max_clock_skew_s: float = Field(
        default=300.0,
        gt=0,
        description="Message timestamps more than this far ahead of the monitor's clock, or "
        "behind the camera's latest, are clamped (and counted): a broken producer's clock "
        "cannot close or freeze every incident.",
    )
    state_topic: str | None = Field(
        default=None,
        description="Compacted topic where each camera's alarm state is kept, with at least as "
        "many partitions as the input: restarts and rebalances then continue an open alarm "
        "under the same id and count no frame twice (with `alerts = cameras`; `run` refuses "
        "to start if it is missing or narrower). Unset: state lives in memory only.",
    )
    state_flush_s: float = Field(
        default=1.0,
        ge=0,
        description="How often the cameras changed since the last write go to `state_topic` "
        "(one record per camera, however many of its frames came meanwhile). Offsets are "
        "committed only up to the last batch whose state was written, so a restart never "
        "skips evidence; larger: fewer state records, more frames scored again after a crash. "
        "0: after every batch.",
    )
    camera_expiry_s: float = Field(
        default=7 * 86_400.0,
        gt=0,
        description="The state of a camera not seen for this long (monitor's clock) is dropped.",
    )
    incident_window_s: float = Field(
        default=60.0,
        gt=0,
        description="With `alerts = frames`: a flagged frame within this many seconds of the "
        "key's last flagged frame belongs to the same incident; a key quiet for this long has "
        "its incident closed.",
    )
    incident_cooldown_s: float = Field(
        default=300.0,
        ge=0,
        description="At most one alert per this many seconds of event time for one open camera "
        "alarm (reminders) or frame incident (0: an alert for every flagged frame).",
    )
    reload_check_s: float = Field(
        default=10.0,
        ge=0,
        description="How often to look for a changed bundle at `model` (and at each route's "
        "`model`); 0: never (SIGHUP still reloads).",
    )
    public_key: Path | None = Field(
        default=None,
        description="Ed25519 public key (the `.pub` file of `sdns-monitor keygen`). With it, "
        "every bundle must be signed with the matching private key; an unsigned one is "
        "refused, at start and on reload.",
    )
    require_signed: bool = Field(
        default=False,
        description="Refuse unsigned bundles: implied by `public_key`, so this only says so "
        "explicitly. Needs `public_key`.",
    )
    session_timeout_ms: int = Field(
        default=45_000,
        ge=1000,
        description="Consumer group session timeout (Kafka's default). Against the development "
        "broker (Tansu) use `6000`: it holds a new group's join for half of it.",
    )
    heartbeat_interval_ms: int = Field(
        default=3_000,
        ge=100,
        description="Consumer heartbeat interval; must be below `session_timeout_ms`. Against "
        "Tansu use `1000`.",
    )
    security: KafkaSecurity = Field(
        default_factory=KafkaSecurity,
        description="Kafka client security: a `[security]` table, or its keys at the top level.",
    )
    routes: list[Route] = Field(
        default_factory=list,
        description="Config file only: a list of `[[routes]]` tables, each `model` plus `keys` "
        "(exact message keys) and/or `key_pattern` (a regex the whole key must match). The "
        "first route that matches a frame's key scores it; keys no route matches (and keys "
        "that are not UTF-8) use `model`. Each bundle is loaded once and watched for changes "
        "like `model`.",
    )

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _port_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() in ("off", "none", "") else value

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        if not self.topic and not self.topic_pattern:
            raise ValueError("give at least one --topic or a --topic-pattern")
        if self.topic and self.topic_pattern:
            raise ValueError("--topic and --topic-pattern are mutually exclusive")
        if self.alarm_rate is not None and self.threshold is not None:
            raise ValueError("--alarm-rate and --threshold are mutually exclusive; give one")
        if self.require_signed and self.public_key is None:
            raise ValueError("--require-signed needs --public-key: the key to check against")
        if self.public_key is not None and not self.public_key.is_file():
            raise ValueError(f"--public-key {self.public_key} is not a readable file")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        outputs = {self.alert_topic, self.dlq_topic} | (
            {self.scores_topic, self.state_topic} - {None}
        )
        for name in [*self.topic, *sorted(t for t in outputs if t is not None)]:
            if not _TOPIC.fullmatch(name) or name in (".", ".."):
                raise ValueError(
                    f"topic name {name!r} is not legal in Kafka: use 1-249 of the characters "
                    "a-z A-Z 0-9 . _ -"
                )
        if self.topic_pattern is not None:
            try:
                re.compile(self.topic_pattern)
            except re.error as exc:
                raise ValueError(f"--topic-pattern is not a valid regex: {exc}") from None
        if set(self.topic) & outputs:
            raise ValueError(
                "an input topic is also an output topic; the monitor would read its own alerts"
            )
        if self.topic_pattern is not None:
            # As the Kafka client matches a pattern (re.match: a prefix match suffices).
            own = sorted(t for t in outputs if t is not None and re.match(self.topic_pattern, t))
            if own:
                raise ValueError(
                    f"--topic-pattern {self.topic_pattern!r} matches the output topic {own[0]}; "
                    "the monitor would read its own outputs (dead letters would loop): "
                    "narrow the pattern or rename the output topics"
                )
        return self
