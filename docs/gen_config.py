"""Write the tables of docs/configuration.md, one row per setting of `sdns-monitor run`, from the
settings models (sdns_monitor/settings/run.py) and the real `run` command, so that they cannot drift.

    python docs/gen_config.py            # rewrite the tables in docs/configuration.md
    python docs/gen_config.py --check    # exit 1 if they are not what the code says

The prose of the page is hand-written and kept as it is. Each table sits between
`<!-- settings: NAME NAME ... -->` and `<!-- end settings -->`; the marker names the settings of
the table, in order, and every setting must be named by exactly one marker. A row is the
setting's config key, its `run` option, its SDNS_<NAME> variable, the model's default, and the
field's description (which is also the option's help). tests/test_docs.py fails when the
committed page differs from what this script writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"

TABLE = re.compile(r"(?ms)^<!-- settings: ([a-z_ ]+) -->\n.*?^<!-- end settings -->\n")
NONE = "—"


def _default(field: Any) -> str:
    """The model's default as a TOML value, or what stands in for one."""
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("<", "&lt;").replace("|", "\\|")


def _table(names: list[str], options: dict[str, Any]) -> str:
    from sdns_monitor.cli.options import setting_help
    from sdns_monitor.settings import ENV_PREFIX, ENV_SETTINGS, SETTINGS

    lines = ["| key | option | environment | default | meaning |", "|---|---|---|---|---|"]
    for name in names:
        field, option = SETTINGS[name], options.get(name)
        flag = NONE
        if option is not None:
            flag = " / ".join(f"`{o}`" for o in option.opts)
            flag += " (repeatable)" if option.multiple else ""
        env = f"`{ENV_PREFIX}{name.upper()}`" if name in ENV_SETTINGS else NONE
        row = [f"`{name}`", flag, env, _default(field), _cell(setting_help(field))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render(page: str) -> str:
    """`page` (the text of docs/configuration.md) with its settings tables rewritten."""
    import typer

    from sdns_monitor.cli import app
    from sdns_monitor.settings import SETTINGS

    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    options = {p.name: p for p in run.params}
    named = [n for marker in TABLE.findall(page) for n in marker.split()]
    unknown = sorted(set(named) - set(SETTINGS))
    twice = sorted({n for n in named if named.count(n) > 1})
    missing = [n for n in SETTINGS if n not in named]
    if unknown or twice or missing:
        raise SystemExit(
            f"{OUT.name}: the settings markers name unknown settings {unknown}, name {twice} "
            f"twice, and leave out {missing}: each setting belongs to exactly one table"
        )

    def table(match: re.Match[str]) -> str:
        marker = match.group(1)
        body = _table(marker.split(), options)
        return f"<!-- settings: {marker} -->\n\n{body}\n<!-- end settings -->\n"

    return TABLE.sub(table, page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    page = OUT.read_text()
    text = render(page)
    if args.check:
        if text != page:
            print(f"{OUT} is out of date: run python docs/gen_config.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
