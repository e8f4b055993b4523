"""Where settings come from: the command line, `SDNS_<NAME>` environment variables and a config
file, merged (command line > environment > config file > defaults) and validated once."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
)
from pydantic.fields import FieldInfo

from sdns_monitor.errors import ConfigError, first_problem
from sdns_monitor.settings.kafka import KafkaSecurity
from sdns_monitor.settings.run import RunSettings

ENV_PREFIX = "SDNS_"


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


def _from_env(env: Mapping[str, str], names: tuple[str, ...] = ENV_SETTINGS) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in names:
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


# A security field's name as a word of a validation message (not inside a path or a value).
_SECURITY_WORD = re.compile(rf"(?<![\w/.-])({'|'.join(KafkaSecurity.model_fields)})(?![\w/.-])")


def security_from_env(env: Mapping[str, str]) -> KafkaSecurity:
    """Kafka client security from the `SDNS_<NAME>` variables `run` reads
    (`SDNS_SECURITY_PROTOCOL`, `SDNS_SASL_MECHANISM`, `SDNS_SSL_CAFILE`, ...), for the clients
    other than `run` (`kafka://` data specs). Unset ones take their defaults (PLAINTEXT); other
    SDNS_ variables are not read. A bad value or combination is one ConfigError line naming the
    variables.

    >>> security_from_env({"SDNS_SECURITY_PROTOCOL": "SSL"}).client_options()
    {'security_protocol': 'SSL'}
    """
    values = _from_env(env, tuple(KafkaSecurity.model_fields))
    try:
        return KafkaSecurity.model_validate(values)
    except ValidationError as exc:
        where, what = first_problem(exc)
        what = _SECURITY_WORD.sub(
            lambda m: ENV_PREFIX + m.group(1).upper(), what.removeprefix("Value error, ")
        )
        raise ConfigError(
            f"invalid setting {ENV_PREFIX}{where.upper()}: {what}"
            if where
            else f"invalid Kafka security variables: {what}"
        ) from None


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
