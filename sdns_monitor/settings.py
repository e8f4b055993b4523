"""Settings of `sdns-monitor run`: command-line options, `SDNS_<NAME>` environment variables and
a config file (`--config FILE`, TOML or JSON), validated once by pydantic.

Precedence: command line > environment > config file > defaults. Every problem is one
`ConfigError` line naming the setting and its source. Secrets are `SecretStr`: they never
appear in reprs or logs.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sdns_monitor.errors import ConfigError, first_problem

ENV_PREFIX = "SDNS_"
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class KafkaSecurity(BaseModel):
    """Client security, passed through to the Kafka client (kafka-python's option names)."""

    model_config = ConfigDict(extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # OAUTHBEARER is not offered: kafka-python needs a token provider object, not a setting.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None

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
    """Everything `run` needs; field names are the option names with '-' as '_'."""

    model_config = ConfigDict(extra="forbid")

    topic: list[str] = Field(default_factory=list)
    topic_pattern: str | None = None
    model: Path
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "sdns-monitor"
    alert_topic: str = "sdns-alerts"
    dlq_topic: str = "sdns-dead-letters"
    scores_topic: str | None = None
    batch_size: int = Field(64, ge=1, le=8192)
    max_wait_ms: int = Field(100, ge=0, le=60_000)
    decode_workers: int = Field(2, ge=1, le=64)  # threads that decode and resize frames
    # Micro-batches between consumer and commit (decoding, scoring, awaiting acks); beyond
    # this the consumer pauses. 1 makes the loop sequential.
    queue_batches: int = Field(4, ge=1, le=64)
    alarm_rate: float | None = Field(None, gt=0, lt=1)
    threshold: float | None = None
    from_beginning: bool = False
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1)
    cache_dir: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9108, ge=0, le=65535)  # "off" disables; 0 picks a free port
    session_timeout_ms: int = Field(45_000, ge=1000)  # Kafka's defaults; Tansu wants 6000 / 1000
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    incident_window_s: float = Field(60.0, gt=0)
    incident_cooldown_s: float = Field(300.0, ge=0)
    device: str = "auto"  # auto, cpu, cuda, cuda:N (checked when the model loads)
    score: Literal["auto", "sdns", "combined"] = "auto"  # see Detector
    backend: Literal["auto", "eager", "compile", "tensorrt"] = "auto"  # sdns_monitor.backends
    reload_check_s: float = Field(10.0, ge=0)  # how often to look for a changed bundle; 0: never
    public_key: Path | None = None  # Ed25519 key that signed bundles must verify with
    require_signed: bool = False  # refuse unsigned bundles (needs public_key)
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    # Keys (cameras) scored by other bundles than `model` (config file only; see routing.py).
    routes: list[Route] = Field(default_factory=list)

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


_LISTS = {"topic"}
_BOOLS = {"from_beginning", "require_signed"}
_SECURITY = set(KafkaSecurity.model_fields)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in set(RunSettings.model_fields) | _SECURITY:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or name == "security":
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
