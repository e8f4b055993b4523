"""The typer app and the console entry point.

Every error a user can meet is printed on one line, without a traceback: exit code 2 for an
invalid option or combination, 1 for anything else (bad data, bad bundle, ...).
"""

from __future__ import annotations

import sys

import typer

from sdns_monitor.errors import ConfigError, SdnsError

app = typer.Typer(
    name="sdns-monitor",
    help="Out-of-distribution monitoring of image streams (SDNS: self-distillation with negative sampling).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def main() -> None:
    """Console entry point: run the app, turning project errors into one-line messages."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # a bad option value, a missing option, a bad command
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "sdns-monitor"
        message = str(exc.format_message()).replace("Value error, ", "").rstrip(".")  # type: ignore[attr-defined]
        if message:  # empty after no_args_is_help printed the help
            _err(f"{message}; see `{where} --help`")
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    except ConfigError as exc:
        _err(str(exc))
        sys.exit(2)
    except SdnsError as exc:
        _err(str(exc))
        sys.exit(1)
    except OSError as exc:  # unwritable --out or --report, full disk, ...
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"{exc.strerror or exc}{where}; check the path and its permissions")
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(n) and --help come back as a number
        sys.exit(code)
