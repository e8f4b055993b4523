"""`sdns-monitor run`, whose options are generated from the settings models.

`run` declares only `--config`; `settings_options` gives it one option per setting that has
one (settings.CLI_SETTINGS: every RunSettings field and flat KafkaSecurity field but the
passwords and `routes`), built from the field: its name, its type (choices included), its
description as help and its default as the default shown. Every generated option defaults to
None, "not given", so that load_settings lets the environment and the config file fill it in:
command line > environment > config file > defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic.fields import FieldInfo

from sdns_monitor import settings
from sdns_monitor.cli.options import setting_help

# What the command line takes where the field's type says less: a port, or `off`.
_CLI_TYPES: dict[str, Any] = {"metrics_port": str}

ConfigOpt = Annotated[
    Path | None, typer.Option(envvar="SDNS_CONFIG", help="TOML or JSON file of settings")
]

F = TypeVar("F", bound=Callable[..., Any])


def _shown_default(field: FieldInfo) -> str | bool:
    """The default `--help` shows: the model's (the option's own is None, "not given")."""
    if field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or isinstance(default, bool):  # a flag is off
        return False
    return str(default)


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    annotation: Any = _CLI_TYPES.get(name, field.annotation)
    # A flag has no --no- form: leaving it out is "not given", not "false".
    decls = [f"--{name.replace('_', '-')}"] if annotation is bool else []
    option = typer.Option(*decls, help=setting_help(field), show_default=_shown_default(field))
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[annotation | None, option],
    )


def settings_options(command: F) -> F:
    """Give `command` (`def command(*, config, **given)`) one option per setting, by setting
    its signature, which typer reads; `--config` stays after `--model`, where it always was."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    generated = [_option(name, settings.SETTINGS[name]) for name in settings.CLI_SETTINGS]
    at = settings.CLI_SETTINGS.index("model") + 1
    kept = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = [*generated[:at], *kept, *generated[at:]]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    return command


@settings_options
def run(*, config: ConfigOpt = None, **given: Any) -> None:
    """Watch Kafka topics of image frames; publish an alert for every out-of-distribution frame.

    Every option can also be set as SDNS_<OPTION> (e.g. SDNS_BOOTSTRAP_SERVERS) or in --config;
    passwords only through the environment or the config file (SDNS_SASL_PLAIN_PASSWORD).
    """
    import logging
    import os

    from sdns_monitor.stream import ClientLogThrottle, StreamMonitor
    from sdns_monitor.stream.signals import forward_signals

    loaded = settings.load_settings(given, os.environ, config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines are per connection
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loads, at INFO
    for handler in logging.getLogger().handlers:  # an outage: one line a minute per kind
        handler.addFilter(ClientLogThrottle())
    monitor = StreamMonitor(loaded)
    forward_signals(monitor)  # SIGTERM, SIGINT stop; SIGHUP reloads
    watched = loaded.topic_pattern or ", ".join(loaded.topic)
    typer.echo(
        f"watching {watched} on {loaded.bootstrap_servers} with model {monitor.detector.name} "
        f"({monitor.detector.hash[:12]})"
        + (f" and {len(loaded.routes)} routes" if loaded.routes else "")
        + "; SIGHUP reloads the models, SIGTERM stops",
        err=True,
    )
    stats = monitor.run()
    typer.echo(f"stopped: {stats.summary()}", err=True)
