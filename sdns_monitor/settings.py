"""Settings of `sdns-monitor run`: command-line options, `SDNS_<NAME>` environment variables and
a config file (`--config FILE`, TOML or JSON), validated once by pydantic.

Precedence: command line > environment > config file > defaults. Every problem is one
`ConfigError` line naming the setting and its source. Secrets are `SecretStr`: they never
appear in reprs or logs.

These models are the one source of the settings: `run`'s options (sdns_monitor/cli/run.py) and
docs/configuration.md (docs/gen_config.py) are generated from their fields, each field's
`description` being both its option's help and its documentation.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from sdns_monitor.errors import ConfigError, first_problem

ENV_PREFIX = "SDNS_"
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# The choices of Detector's `score` and of sdns_monitor.backends, spelled here so that settings
# (and the command line) load without torch.
ScoreName = Literal["auto", "sdns", "combined"]
BackendName = Literal["auto", "eager", "compile", "tensorrt"]


class KafkaSecurity(BaseModel):
    """Client security, passed through to the Kafka client (kafka-python's option names)."""

    model_config = ConfigDict(extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="`PLAINTEXT`, `SSL` (TLS), `SASL_PLAINTEXT` (SASL authentication) or "
        "`SASL_SSL` (SASL over TLS).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with the `SASL_*` "
        "protocols, refused without them. `OAUTHBEARER` is not supported (the Kafka client "
        "needs a token provider object, which a setting cannot give).",
    )
    sasl_plain_username: str | None = Field(
        default=None, description="SASL user name (PLAIN and SCRAM)."
    )
    sasl_plain_password: SecretStr | None = Field(
        default=None,
        description="SASL password: environment or config file only, never a command-line option.",
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA certificate(s) that signed the brokers' certificates (PEM)."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="Client certificate, for mutual TLS (PEM)."
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="Client private key, for mutual TLS (PEM)."
    )
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of `ssl_keyfile`: environment or config file only."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs a sasl_mechanism")
        if sasl and (not self.sasl_plain_username or self.sasl_plain_password is None):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_plain_username and "
                "sasl_plain_password"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                "sasl_mechanism is set but security_protocol is not SASL_PLAINTEXT or SASL_SSL"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        return self

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients (secrets revealed only here)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "security_protocol":
                continue
            out[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return out


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
    incident_window_s: float = Field(
        default=60.0,
        gt=0,
        description="Per key: a flagged frame within this many seconds of the key's last "
        "flagged frame belongs to the same incident; a key quiet for this long has its "
        "incident closed.",
    )
    incident_cooldown_s: float = Field(
        default=300.0,
        ge=0,
        description="Within one incident, at most one alert per this many seconds (0: an "
        "alert for every flagged frame).",
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
        outputs = {self.alert_topic, self.dlq_topic} | ({self.scores_topic} - {None})
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


def _holds_a_model(annotation: Any) -> bool:
    """`X`, `X | None` or `list[X]` for a pydantic model X: a table, not one value."""
    args = get_args(annotation) or (annotation,)
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in args)


def _is_secret(annotation: Any) -> bool:
    return SecretStr in (get_args(annotation) or (annotation,))


# Every setting by the name it has everywhere (option, SDNS_<NAME>, config key); the security
# fields are flat here, as on the command line, and nest under `security` in RunSettings.
SETTINGS: dict[str, FieldInfo] = {
    **{k: f for k, f in RunSettings.model_fields.items() if k != "security"},
    **KafkaSecurity.model_fields,
}
# One value each: SDNS_<NAME> sets them (tables such as `routes` are config-file only).
ENV_SETTINGS = tuple(k for k, f in SETTINGS.items() if not _holds_a_model(f.annotation))
# Those with a `run` option: every one but the secrets, which never show in `ps`.
CLI_SETTINGS = tuple(k for k in ENV_SETTINGS if not _is_secret(SETTINGS[k].annotation))

_LISTS = {k for k in ENV_SETTINGS if get_origin(SETTINGS[k].annotation) is list}
_BOOLS = {k for k in ENV_SETTINGS if SETTINGS[k].annotation is bool}
_SECURITY = set(KafkaSecurity.model_fields)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in ENV_SETTINGS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        value: Any = raw
        if name in _LISTS:
            value = [t.strip() for t in raw.split(",") if t.strip()]
        elif name in _BOOLS:
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean; use true or false"
                )
            value = raw.lower() in ("1", "true", "yes")
        values[name] = value
    return values


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """Security options may be given flat (as on the command line); nest them."""
    out = {k: v for k, v in values.items() if k not in _SECURITY}
    security = {**out.pop("security", {}), **{k: v for k, v in values.items() if k in _SECURITY}}
    if security:
        out["security"] = security
    return out


def _from_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(
    cli: Mapping[str, Any], env: Mapping[str, str], config_file: Path | None = None
) -> RunSettings:
    """Merge the three sources (None on the command line means "not given") and validate."""
    merged: dict[str, Any] = _nest(_from_file(config_file)) if config_file else {}
    given = {k: v for k, v in cli.items() if v is not None and v != [] and v != ()}
    for source in (_nest(_from_env(env)), _nest(given)):
        security = source.pop("security", {})
        merged.update(source)
        if security:
            merged["security"] = {**merged.get("security", {}), **security}
    try:
        return RunSettings.model_validate(merged)
    except ValidationError as exc:
        where, what = first_problem(exc)
        what = what.removeprefix("Value error, ")
        raise ConfigError(
            f"invalid setting {where}: {what}" if where else f"invalid settings: {what}"
        ) from None
