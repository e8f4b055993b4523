"""Bad configuration: every invalid option, combination, env var or config file is one line on
stderr and exit code 2, before anything connects to Kafka; secrets never appear in it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sdns_monitor.settings as settings_module
from sdns_monitor.cli import app, main

SECRET = "hunter2-do-not-print"

# (argv after "run --model M" unless it starts with "!", env, config file text or None, message)
CASES: dict[str, tuple[list[str], dict[str, str], str | None, str]] = {
    "no-topic": ([], {}, None, "give at least one --topic"),
    "topic-and-pattern": (
        ["--topic", "a", "--topic-pattern", "a.*"],
        {},
        None,
        "mutually exclusive",
    ),
    "both-rules": (
        ["--topic", "a", "--alarm-rate", "0.1", "--threshold", "2"],
        {},
        None,
        "--alarm-rate and --threshold",
    ),
    "rate-out-of-range": (["--topic", "a", "--alarm-rate", "1.5"], {}, None, "alarm_rate"),
    "batch-size-zero": (["--topic", "a", "--batch-size", "0"], {}, None, "batch_size"),
    "batch-size-text": (["--topic", "a", "--batch-size", "abc"], {}, None, "--batch-size"),
    "decode-workers-zero": (["--topic", "a", "--decode-workers", "0"], {}, None, "decode_workers"),
    "queue-batches-zero": (["--topic", "a", "--queue-batches", "0"], {}, None, "queue_batches"),
    "negative-wait": (["--topic", "a", "--max-wait-ms", "-1"], {}, None, "max_wait_ms"),
    "incident-window-zero": (
        ["--topic", "a", "--incident-window-s", "0"],
        {},
        None,
        "incident_window_s",
    ),
    "heartbeat-over-session": (
        ["--topic", "a", "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "6000"],
        {},
        None,
        "heartbeat_interval_ms must be below",
    ),
    "illegal-topic": (["--topic", "bad topic!"], {}, None, "not legal in Kafka"),
    "illegal-output-topic": (
        ["--topic", "a", "--alert-topic", "x" * 250],
        {},
        None,
        "not legal in Kafka",
    ),
    "reads-its-own-alerts": (["--topic", "sdns-alerts"], {}, None, "read its own alerts"),
    "bad-regex": (["--topic-pattern", "(["], {}, None, "not a valid regex"),
    "pattern-reads-outputs": (["--topic-pattern", "sdns-.*"], {}, None, "matches the output topic"),
    "port-out-of-range": (["--topic", "a", "--metrics-port", "70000"], {}, None, "metrics_port"),
    "port-text": (["--topic", "a", "--metrics-port", "nine"], {}, None, "metrics_port"),
    "unknown-score": (["--topic", "a", "--score", "best"], {}, None, "--score"),
    "unknown-backend": (["--topic", "a", "--backend", "onnx"], {}, None, "--backend"),
    "unknown-option": (["--topic", "a", "--frobnicate", "1"], {}, None, "--frobnicate"),
    "require-signed-without-key": (
        ["--topic", "a", "--require-signed"],
        {},
        None,
        "needs --public-key",
    ),
    "missing-public-key": (
        ["--topic", "a", "--public-key", "{tmp}/nope.pub"],
        {},
        None,
        "not a readable file",
    ),
    "sasl-without-mechanism": (
        ["--topic", "a", "--security-protocol", "SASL_SSL"],
        {},
        None,
        "needs a sasl_mechanism",
    ),
    "sasl-without-password": (
        [
            "--topic",
            "a",
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "PLAIN",
            "--sasl-plain-username",
            "u",
        ],
        {},
        None,
        "needs sasl_plain_username and sasl_plain_password",
    ),
    "mechanism-without-sasl": (
        ["--topic", "a", "--sasl-mechanism", "PLAIN"],
        {"SDNS_SASL_PLAIN_USERNAME": "u"},
        None,
        "security_protocol is not SASL",
    ),
    "unknown-protocol": (  # the option lists its choices, as --score does
        ["--topic", "a", "--security-protocol", "TLS"],
        {},
        None,
        "'--security-protocol': 'TLS' is not one of 'PLAINTEXT', 'SSL'",
    ),
    "env-unknown-protocol": (
        ["--topic", "a"],
        {"SDNS_SECURITY_PROTOCOL": "TLS"},
        None,
        "security_protocol",
    ),
    "missing-cafile": (
        ["--topic", "a", "--security-protocol", "SSL", "--ssl-cafile", "{tmp}/ca.pem"],
        {},
        None,
        "not a readable file",
    ),
    "env-bad-bool": (["--topic", "a"], {"SDNS_FROM_BEGINNING": "maybe"}, None, "not a boolean"),
    "env-bad-number": (["--topic", "a"], {"SDNS_BATCH_SIZE": "-3"}, None, "batch_size"),
    "config-missing": (
        ["--topic", "a", "--config", "{tmp}/none.toml"],
        {},
        None,
        "cannot read config file",
    ),
    "config-not-toml": (["--topic", "a"], {}, "topic = [unclosed", "not valid TOML"),
    "config-unknown-key": (["--topic", "a"], {}, "batchsize = 3\n", "batchsize"),
    "config-wrong-type": ([], {}, "topic = ['a']\nbatch_size = 'many'\n", "batch_size"),
    "config-security-combination": (
        [],
        {},
        "topic = ['a']\n[security]\nsecurity_protocol = 'SASL_PLAINTEXT'\n"
        "sasl_mechanism = 'PLAIN'\nsasl_plain_username = 'u'\n",
        "sasl_plain_password",
    ),
    "other-command-bad-range": (["!broker", "--port", "0"], {}, None, "--port"),
    "fit-bad-index-factory": (
        ["!fit", "--data", "animals", "--out", "{tmp}/x.sdns", "--index-factory", "IVFbogus"],
        {},
        None,
        "could not parse index string IVFbogus",
    ),
    "other-command-missing-option": (["!calibrate", "--model", "m"], {}, None, "Missing option"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_configuration_is_one_line_and_exit_2(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, env, config_text, message = CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    for name in [k for k in os.environ if k.startswith("SDNS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SDNS_SSL_PASSWORD", SECRET)  # a secret: must never be echoed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config_text is not None:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        args += ["--config", str(config)]
    if args and args[0].startswith("!"):
        argv = [args[0][1:], *args[1:]]
    else:
        argv = ["run", "--model", str(tmp_path / "m.sdns"), *args]
    monkeypatch.setattr(sys, "argv", ["sdns-monitor", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    assert exc.value.code == 2, out.err
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err
    assert SECRET not in out.err + out.out
    assert "Traceback" not in out.err


def test_help_still_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["sdns-monitor", "run", "--help"])
    main()  # no SystemExit: success
    assert "--topic" in capsys.readouterr().out


def test_config_file_can_come_from_sdns_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Containers set the config file by environment, like every other setting."""
    config = tmp_path / "c.toml"
    config.write_text("topic = ['a']\nbatchsize = 3\n")
    monkeypatch.setenv("SDNS_CONFIG", str(config))
    monkeypatch.setattr(sys, "argv", ["sdns-monitor", "run", "--model", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "batchsize" in capsys.readouterr().err


def test_run_passes_only_the_options_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options left out reach the loader as None, "not given", so the environment and the
    config file still apply beneath the command line."""
    seen: dict[str, Any] = {}

    def loader(cli: dict[str, Any], env: Any, config: Path | None = None) -> Any:
        seen.update(cli=dict(cli), config=config)
        raise SystemExit(0)

    monkeypatch.setattr(settings_module, "load_settings", loader)
    config = tmp_path / "c.toml"
    args = ["run", "--topic", "a", "--topic", "b", "--batch-size", "8", "--from-beginning"]
    args += ["--score", "sdns", "--metrics-port", "off", "--config", str(config)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    given = {k: v for k, v in seen["cli"].items() if v is not None}
    assert given == {
        "topic": ["a", "b"],
        "batch_size": 8,
        "from_beginning": True,
        "score": "sdns",
        "metrics_port": "off",
    }
    assert seen["config"] == config
    assert set(seen["cli"]) >= {"model", "require_signed", "security_protocol", "ssl_keyfile"}
    assert "sasl_plain_password" not in seen["cli"] and "routes" not in seen["cli"]
