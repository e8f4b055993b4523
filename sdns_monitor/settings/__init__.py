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

from sdns_monitor.settings.kafka import KafkaSecurity
from sdns_monitor.settings.routes import Route
from sdns_monitor.settings.run import BackendName, RunSettings, ScoreName
from sdns_monitor.settings.sources import (
    CLI_SETTINGS,
    ENV_PREFIX,
    ENV_SETTINGS,
    SETTINGS,
    load_settings,
    security_from_env,
)

__all__ = [
    "CLI_SETTINGS",
    "ENV_PREFIX",
    "ENV_SETTINGS",
    "SETTINGS",
    "BackendName",
    "KafkaSecurity",
    "Route",
    "RunSettings",
    "ScoreName",
    "load_settings",
    "security_from_env",
]
