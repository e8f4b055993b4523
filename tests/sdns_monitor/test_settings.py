"""Settings of `run`: precedence of command line, environment and config file; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdns_monitor.errors import ConfigError
from sdns_monitor.settings import load_settings

BASE = {"topic": ["frames"], "model": "m.sdns"}


def test_defaults_are_kafkas_and_loopback() -> None:
    s = load_settings(BASE, {})
    assert s.topic == ["frames"] and s.model == Path("m.sdns")
    assert (s.bootstrap_servers, s.group_id) == ("localhost:9092", "sdns-monitor")
    assert (s.alert_topic, s.dlq_topic, s.scores_topic) == (
        "sdns-alerts",
        "sdns-dead-letters",
        None,
    )
    assert (s.session_timeout_ms, s.heartbeat_interval_ms) == (45_000, 3_000)
    assert s.metrics_host == "127.0.0.1"
    assert s.security.client_options() == {"security_protocol": "PLAINTEXT"}


def test_metrics_port_can_be_turned_off_or_left_to_the_system() -> None:
    assert load_settings(BASE, {"SDNS_METRICS_PORT": "off"}).metrics_port is None
    assert load_settings({**BASE, "metrics_port": "0"}, {}).metrics_port == 0
    assert load_settings(BASE, {}).metrics_port == 9108


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'topic = ["from-file"]\nmodel = "file.sdns"\nbatch-size = 8\ngroup_id = "file-group"\n'
        "max_wait_ms = 7\n"
    )
    env = {"SDNS_BATCH_SIZE": "16", "SDNS_GROUP_ID": "env-group", "SDNS_TOPIC": "a, b"}
    s = load_settings({"batch_size": 32, "topic": None, "model": None}, env, config)
    assert s.batch_size == 32  # command line
    assert s.group_id == "env-group" and s.topic == ["a", "b"]  # environment
    assert s.max_wait_ms == 7 and s.model == Path("file.sdns")  # file


def test_json_config_and_boolean_environment(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text('{"topic": ["x"], "model": "m.sdns", "from_beginning": false}')
    assert load_settings({}, {"SDNS_FROM_BEGINNING": "yes"}, config).from_beginning is True
    with pytest.raises(ConfigError, match="SDNS_FROM_BEGINNING='maybe' is not a boolean"):
        load_settings({}, {"SDNS_FROM_BEGINNING": "maybe"}, config)


def test_sasl_settings_are_validated_and_secrets_hidden() -> None:
    cli = {**BASE, "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}
    with pytest.raises(ConfigError, match="needs sasl_plain_username and sasl_plain_password"):
        load_settings(cli, {})
    env = {"SDNS_SASL_PLAIN_USERNAME": "svc", "SDNS_SASL_PLAIN_PASSWORD": "hunter2"}
    s = load_settings(cli, env)
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()
    assert s.security.client_options() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "hunter2",
    }


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"model": "m.sdns"}, "give at least one --topic"),
        ({**BASE, "topic_pattern": "cam-.*"}, "mutually exclusive"),
        ({**BASE, "alarm_rate": 0.01, "threshold": 3.0}, "mutually exclusive"),
        ({**BASE, "alarm_rate": 2.0}, "alarm_rate"),
        ({**BASE, "batch_size": 0}, "batch_size"),
        ({**BASE, "alert_topic": "frames"}, "read its own alerts"),
        ({**BASE, "session_timeout_ms": 6000, "heartbeat_interval_ms": 6000}, "heartbeat"),
        ({**BASE, "sasl_mechanism": "PLAIN"}, "not SASL_PLAINTEXT or SASL_SSL"),
        ({**BASE, "ssl_cafile": "/nonexistent/ca.pem"}, "is not a readable file"),
        ({**BASE, "batch_sise": 3}, "batch_sise"),
        ({"topic": ["x"]}, "model"),
        ({**BASE, "alert_topic": "bad topic!"}, "not legal in Kafka"),
        ({"model": "m.sdns", "topic_pattern": "cam-("}, "not a valid regex"),
        ({**BASE, "metrics_port": 70000}, "metrics_port"),
        ({**BASE, "reload_check_s": -1}, "reload_check_s"),
    ],
)
def test_invalid_settings_are_one_line_config_errors(cli: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        load_settings(cli, {})
    assert "\n" not in str(exc.value)


def test_unreadable_or_invalid_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(BASE, {}, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("topic = [")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(BASE, {}, bad)


def test_tables_are_config_file_only() -> None:
    """`routes` and `security` hold tables: no SDNS_ variable sets them (the security fields
    have their own variables)."""
    env = {"SDNS_ROUTES": "lobby", "SDNS_SECURITY": "SSL", "SDNS_SECURITY_PROTOCOL": "SSL"}
    s = load_settings(BASE, env)
    assert s.routes == [] and s.security.security_protocol == "SSL"
