"""The user documentation (README.md, docs/) against the code it documents: the command
reference and the settings tables are regenerated and compared, every setting of `run` must be documented with its real
option, environment variable and default, record examples must validate against the real
pydantic models, and every command, option, metric, link and quoted error message the pages
name must exist. Names come from the code, never from a list kept here. No broker, no network."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

import sdns_monitor
import sdns_monitor.bundle as bundle
import sdns_monitor.records as records
from sdns_monitor.cli import app
from sdns_monitor.data.spec import USAGE
from sdns_monitor.errors import ConfigError
from sdns_monitor.settings import KafkaSecurity, RunSettings, load_settings
from sdns_monitor.stream.prometheus import Metrics
from tests.settings_probe import env_read_by_the_loader

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CLI_MD = DOCS / "cli.md"
CONFIGURATION = DOCS / "configuration.md"
FORMATS = DOCS / "formats.md"
OPERATIONS = DOCS / "operations.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
NONE = "—"  # what the configuration tables write for "no such option / variable"


# ---------------------------------------------------------------------------- helpers
def _generator(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gen_cli() -> types.ModuleType:
    return _generator("gen_cli")


def _commands() -> dict[str, set[str]]:
    """Every command of the real app and its option strings."""
    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        opts = {"--help"}
        for param in command.params:
            opts |= {o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")}
        out[name] = opts
    return out


def _outside_code(text: str) -> str:
    """The text with fenced code blocks removed."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def _code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    for match in re.finditer(r"(?ms)^```(\w*)\n(.*?)^```", text):
        yield match.group(1), match.group(2)


def _table_rows(text: str) -> Iterator[list[str]]:
    """The cells of every Markdown table row outside code blocks (header rows included)."""
    for line in _outside_code(text).splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-|\s]*", line):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            yield [c.strip() for c in cells]


def _code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _outside_code(path.read_text())
    return {_slug(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a field annotation (`X`, `X | None`), if any."""
    candidates = typing.get_args(annotation) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _is_literal(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Literal


def _toml(value: Any) -> str:
    """A default as the configuration tables write it."""
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    return f"`{value!r}`"


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


# ---------------------------------------------------------------------------- cli.md
def test_command_reference_is_generated_from_the_current_cli() -> None:
    expected = _gen_cli().render()
    assert "## sdns-monitor run" in expected and "`--bootstrap-servers`" in expected
    assert CLI_MD.read_text() == expected, "docs/cli.md is out of date: run python docs/gen_cli.py"


def test_command_reference_names_every_command_and_option() -> None:
    text = CLI_MD.read_text()
    for command, options in _commands().items():
        assert f"## sdns-monitor {command}\n" in text
        section = text.split(f"## sdns-monitor {command}\n", 1)[1].split("\n## ", 1)[0]
        for option in options - {"--help"}:
            assert f"`{option}`" in section, f"{command} {option}"


# ---------------------------------------------------------------------------- configuration.md
def test_configuration_tables_are_generated_from_the_settings() -> None:
    page = CONFIGURATION.read_text()
    expected = _generator("gen_config").render(page)
    assert "<!-- settings: topic " in page and "| `bootstrap_servers` |" in expected
    assert page == expected, "docs/configuration.md is out of date: run python docs/gen_config.py"


def _settings_rows() -> dict[str, list[str]]:
    """key -> [option, environment, default, meaning] of the configuration tables."""
    rows = {}
    for cells in _table_rows(CONFIGURATION.read_text()):
        if len(cells) == 5 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            key = cells[0].strip("`")
            assert key not in rows, f"{key} is documented twice"
            rows[key] = cells[1:]
    return rows


def _fields() -> dict[str, Any]:
    fields = {k: f for k, f in RunSettings.model_fields.items() if k != "security"}
    return {**fields, **KafkaSecurity.model_fields}


def test_every_run_setting_is_documented_with_its_default() -> None:
    rows, fields = _settings_rows(), _fields()
    assert set(rows) - set(fields) == set(), "docs/configuration.md documents unknown settings"
    assert set(fields) - set(rows) == set(), "settings missing from docs/configuration.md"
    for key, field in fields.items():
        documented = rows[key][2]
        assert documented == _toml(_default(field)), f"{key}: default {documented}"
    text = CONFIGURATION.read_text()
    assert "[security]" in text and "SDNS_CONFIG" in text and "--config" in text


def _run_params() -> list[Any]:
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    return list(run.params)


def test_every_run_setting_has_exactly_one_option_and_one_documented_entry() -> None:
    """Each setting with one plain value has one `run` option, generated from its field: the
    field's name, its description as help, its choices, and None as the option's own default
    (so that the environment and the config file still apply). Secrets and tables (`routes`)
    have none. Each setting, with or without an option, has one row in configuration.md."""
    params = _run_params()
    rows = [c for c in _table_rows(CONFIGURATION.read_text()) if len(c) == 5]
    documented = [c[0].strip("`") for c in rows if re.fullmatch(r"`[a-z_]+`", c[0])]
    with_option = set()
    for key, field in _fields().items():
        assert documented.count(key) == 1, f"{key} is documented {documented.count(key)} times"
        annotation = field.annotation
        table = _model_of((typing.get_args(annotation) or (annotation,))[0]) is not None
        secret = SecretStr in (typing.get_args(annotation) or (annotation,))
        mine = [p for p in params if p.name == key]
        if table or secret:
            assert mine == [], f"{key} must not be a command-line option"
            continue
        assert len(mine) == 1, f"{key} has {len(mine)} options"
        (param,) = mine
        with_option.add(key)
        assert param.opts == [f"--{key.replace('_', '-')}"] and param.secondary_opts == []
        assert param.default is None, f"--{key} would hide SDNS_{key.upper()} and the file"
        assert field.description and field.description in param.help, key
        literals = [a for a in (annotation, *typing.get_args(annotation)) if _is_literal(a)]
        if literals:
            shown = {getattr(c, "value", c) for c in param.type_descriptor.choices}
            assert shown == set(typing.get_args(literals[0])), f"{key}: choices {shown}"
    assert {p.name for p in params} == with_option | {"config"}, "run has stray options"
    assert set(documented) == set(_fields())


def test_every_documented_option_and_variable_is_the_real_one() -> None:
    run_options = _commands()["run"]
    env_names = env_read_by_the_loader()
    for key, (option, env, _, meaning) in _settings_rows().items():
        real = f"--{key.replace('_', '-')}"
        if real in run_options:
            assert option.startswith(f"`{real}`"), f"{key}: option {option}, the CLI has {real}"
        else:
            assert option == NONE, f"{key}: {option} is not an option of run"
        if env == NONE:
            annotation = _fields()[key].annotation
            element = (typing.get_args(annotation) or (None,))[0]
            assert _model_of(element) is not None, f"{key}: SDNS_{key.upper()} exists"
        else:
            assert env == f"`SDNS_{key.upper()}`" and env.strip("`") in env_names, key
        assert meaning, f"{key} has no explanation"


# ---------------------------------------------------------------------------- formats.md
def _examples() -> dict[str, Any]:
    text = FORMATS.read_text()
    found = re.findall(r"<!-- example: (\w+) -->\n```json\n(.*?)```", text, re.DOTALL)
    return {name: json.loads(body) for name, body in found}


def _assert_complete(model: type[BaseModel], example: dict[str, Any], where: str) -> None:
    """The example sets every field of the model, nested models included."""
    assert set(example) == set(model.model_fields), f"{where}: fields differ from {model.__name__}"
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None and isinstance(example[name], dict):
            _assert_complete(nested, example[name], f"{where}.{name}")


def test_record_examples_validate_against_the_real_models() -> None:
    examples = _examples()
    assert set(examples) >= {
        "Alert",
        "ScoreRecord",
        "IncidentClosed",
        "CameraAlert",
        "CameraCleared",
        "CameraSilent",
    }
    for name, example in examples.items():
        model = getattr(records, name)
        model.model_validate(example)
        _assert_complete(model, example, name)
        assert example["schema_version"] == records.SCHEMA_VERSION


def test_record_fields_dead_letter_headers_and_specs_are_documented() -> None:
    text = FORMATS.read_text()
    for header in records.DLQ_HEADERS:
        assert f"`{header}`" in text, header
    documented = {c[0] for c in _table_rows(text) if c}
    for field in records.Alert.model_fields:
        assert any(field in cell for cell in documented), f"alert field {field}"
    for model in (
        records.IncidentClosed,
        records.CameraAlert,
        records.AlarmRef,
        records.CameraCleared,
        records.CameraSilent,
    ):
        for field in model.model_fields:
            assert any(field in cell for cell in documented), f"{model.__name__} field {field}"
    for name in USAGE:
        assert re.search(rf"`{re.escape(name)}[:\[`@/]", text), f"dataset spec {name}"


# ---------------------------------------------------------------------------- every page
def _shell_commands(body: str) -> Iterator[list[str]]:
    """The simple commands of a shell code block, backslash continuations joined."""
    text = re.sub(r"\\\n", " ", body)
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # not shell (output lines with an odd quote)
            continue
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token in (";", "&", "&&", "|", "||"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def _sdns_invocation(command: list[str]) -> list[str] | None:
    """The arguments after `sdns-monitor` (or `-m sdns_monitor.cli`), if it is one."""
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
        command = command[1:]
    if command and Path(command[0]).name == "sdns-monitor":
        return command[1:]
    if "sdns_monitor.cli" in command:
        return command[command.index("sdns_monitor.cli") + 1 :]
    return None


def test_every_command_and_option_in_the_pages_exists() -> None:
    commands = _commands()
    checked = 0
    for page in PAGES:
        if page == CLI_MD:
            continue
        for language, body in _code_blocks(page.read_text()):
            if language not in ("", "bash", "sh", "shell", "console"):
                continue
            for command in _shell_commands(body):
                args = _sdns_invocation(command)
                if not args:
                    continue
                where = f"{page.relative_to(ROOT)}: {shlex.join(command)}"
                assert args[0] in commands, f"{where}: no command {args[0]}"
                for token in args[1:]:
                    if token.startswith("--"):
                        option = token.split("=", 1)[0]
                        assert option in commands[args[0]], f"{where}: no option {option}"
                checked += 1
    assert checked >= 20, "the pages' commands were not found"


def test_every_metric_named_in_the_pages_exists() -> None:
    series = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum")}
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name, *(family.name + s for s in series.get(family.type, ()))}
    # manifest fields such as score.lowlevel.sdns_mean are not metrics
    for model in vars(bundle).values():
        if isinstance(model, type) and issubclass(model, BaseModel):
            names |= set(model.model_fields)
    for page in PAGES:
        for name in re.findall(r"\bsdns_(?!monitor\b)[a-z0-9_]+", page.read_text()):
            assert name in names, f"{page.relative_to(ROOT)}: no metric {name}"


def test_every_link_between_pages_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file), f"{page.relative_to(ROOT)}: no #{anchor}"


def _source_corpus() -> str:
    """What error messages are made of: the project's sources (string literals joined across
    lines, backticks dropped), the Kafka client's, and the settings loader's own messages."""
    import kafka

    roots = [Path(sdns_monitor.__file__).parent, ROOT / "trainer", Path(kafka.__file__).parent]
    parts = []
    for path in (p for root in roots for p in sorted(root.rglob("*.py"))):
        source = path.read_text()
        # f-strings that quote a module constant ({MANIFEST}) read as its value
        for name, value in re.findall(r'(?m)^([A-Z][A-Z0-9_]*) = "?([^"{}]*?)"?$', source):
            source = source.replace("{" + name + "}", value)
        parts.append(source)
    text = re.sub(r"\"\s*\n\s*[rbf]*\"", "", "\n".join(parts)).replace("`", "")
    base: dict[str, Any] = {"topic": ["t"], "model": "m"}
    invalid: list[dict[str, Any]] = [  # what the loader says about each (its prefixes)
        {**base, "batchsize": 1},
        {"topic": ["t"]},
        {"model": "m"},
        {**base, "topic_pattern": "t.*"},
        {**base, "alarm_rate": 0.1, "threshold": 1.0},
        {**base, "topic": ["sdns-alerts"]},
        {**base, "topic": ["a b"]},
        {**base, "heartbeat_interval_ms": 60_000},
        {**base, "security_protocol": "SASL_SSL"},
    ]
    for cli in invalid:
        with pytest.raises(ConfigError) as exc:
            load_settings(cli, {})
        text += "\n" + str(exc.value)
    return text


@pytest.mark.parametrize("page", [OPERATIONS], ids=lambda p: p.name)
def test_quoted_error_messages_are_the_real_ones(page: Path) -> None:
    """Each literal stretch of a message quoted in the troubleshooting tables (between the
    placeholders in capitals and the `...` of elided text) occurs in the code."""
    corpus = _source_corpus()
    troubleshooting = page.read_text().split("## Troubleshooting", 1)[1]
    checked = 0
    for cells in _table_rows(troubleshooting):
        for message in _code_spans(cells[0]):
            if len(message.split()) < 3:
                continue
            for piece in re.split(r"\b[A-Z][A-Z0-9_]*\b|\.\.\.|[()]|: ", message):
                piece = piece.strip(" '\"()")
                if len(piece) >= 15:
                    assert piece in corpus, f"{page.name}: {piece!r} (from {message!r})"
                    checked += 1
    assert checked >= 40, "the troubleshooting messages were not found"
