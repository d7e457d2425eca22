"""docs/routing.md against the code: a setting, trigger form, command or golden output that drifts
from what the code does fails the build.

The settings tables are generated from the settings dataclasses; print them all with
`.venv/bin/python tests/test_docs_routing.py` and paste the table of whatever changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import shlex
import shutil
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from aiohttp import web
from click.testing import CliRunner

from hq_server.cli import main
from hq_server.routing.config import (
    RetryPolicy,
    RouteSection,
    load_builtin_sinks,
    parse_trigger,
)
from hq_server.sinks.base import SINK_TYPES, Delivery, Outgoing
from hq_server.sinks.webhook import WebhookSettings, WebhookSink
from hq_server.store import SQLiteHQStore
from protocol.config import documented_keys, read_toml

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "routing.md"
DOC = DOC_PATH.read_text("utf-8") if DOC_PATH.exists() else ""  # missing: every test fails
TABLE_HEADER = "| key | default | meaning |"

load_builtin_sinks()
SINK_KINDS = sorted(SINK_TYPES)


# -- the settings tables, as generated from the dataclasses


def _default(field: dataclasses.Field[Any]) -> str:
    """A setting's default as the doc writes it (TOML spelling), or "required"."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and field.name.endswith("_mode"):
        return f"`0o{value:o}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    return f"`{json.dumps(value)}`"


def _settings(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """(dotted key, field) for every setting, nested sections flattened like documented_keys."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _settings(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, field


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: `|` would end the cell, `<` could start an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def table_rows(cls: type) -> dict[str, str]:
    """The doc's table row for each setting of `cls`, keyed by its dotted key."""
    docs = {key: _cell(doc) for key, doc in documented_keys(cls).items()}
    return {key: f"| `{key}` | {_default(field)} | {docs[key]} |" for key, field in _settings(cls)}


def render_table(cls: type) -> str:
    return "\n".join([TABLE_HEADER, "|---|---|---|", *table_rows(cls).values()])


# -- reading the doc


def section(heading: str) -> str:
    """The text under the first level-2 or level-3 heading matching `heading` (a regex), up to the
    next heading of level 2 or 3."""
    match = re.search(
        rf"^(#{{2,3}}) [^\n]*{heading}[^\n]*\n(.*?)(?=^#{{2,3}} |\Z)", DOC, re.M | re.S
    )
    assert match, f"docs/routing.md has no section matching {heading!r}"
    return match.group(2)


def settings_table(text: str) -> dict[str, str]:
    """The `| key | default | meaning |` table in `text`: row text by key."""
    lines = text.splitlines()
    assert TABLE_HEADER in lines, f"no {TABLE_HEADER!r} table in the section"
    start = lines.index(TABLE_HEADER) + 2
    rows: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        key = re.match(r"\| `([^`]+)` \|", line)
        assert key, f"row without a `key` cell: {line}"
        rows[key.group(1)] = line
    return rows


def code_blocks(info: str = "") -> list[str]:
    return re.findall(rf"^```{info}[^\n]*\n(.*?)^```", DOC, re.M | re.S)


def marked_block(marker: str) -> str:
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```[^\n]*\n(.*?)^```", DOC, re.M | re.S)
    assert match, f"docs/routing.md has no block marked <!-- {marker} -->"
    return match.group(1)


def console(command: str) -> list[str]:
    """Output lines shown under `$ COMMAND` in a console block (up to the next prompt)."""
    for block in code_blocks("console"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.strip() == f"$ {command}":
                rest = lines[i + 1 :]
                end = next((j for j, text in enumerate(rest) if text.startswith("$ ")), len(rest))
                return rest[:end]
    raise AssertionError(f"docs/routing.md shows no `$ {command}` in a console block")


# -- settings


@pytest.mark.parametrize("kind", SINK_KINDS)
def test_every_sink_setting_is_a_row_under_its_sink(kind: str) -> None:
    expected = table_rows(SINK_TYPES[kind].settings)
    assert set(expected) == set(documented_keys(SINK_TYPES[kind].settings))
    shown = settings_table(section(rf"`{kind}`"))
    missing = sorted(set(expected) - set(shown))
    assert not missing, f"the {kind} section lacks rows for {missing}"
    unknown = sorted(set(shown) - set(expected))
    assert not unknown, f"the {kind} section documents settings that do not exist: {unknown}"
    stale = [expected[key] for key in expected if shown[key] != expected[key]]
    assert not stale, "rows differ from the code (regenerate them):\n" + "\n".join(stale)


def test_every_route_and_retry_setting_is_a_row() -> None:
    expected = table_rows(RouteSection)
    retry = {f"retry.{key}" for key in documented_keys(RetryPolicy)}
    assert retry <= set(expected)
    shown = settings_table(section("Route settings"))
    assert set(shown) == set(expected), (
        f"missing {sorted(set(expected) - set(shown))}, unknown {sorted(set(shown) - set(expected))}"
    )
    stale = [expected[key] for key in expected if shown[key] != expected[key]]
    assert not stale, "rows differ from the code (regenerate them):\n" + "\n".join(stale)


# -- triggers

TRIGGER_KINDS = {
    "realtime": r"realtime",
    "hourly": r"hourly",
    "every N minutes": r"every \d+ minutes?",
    "every N hours": r"every \d+ hours?",
    "daily after HH:MM": r"daily after \d\d:\d\d",
}


def test_every_trigger_the_doc_shows_parses_and_every_form_is_shown() -> None:
    shown = re.findall(r'trigger = "([^"]*)"', DOC)
    for text in shown:
        parse_trigger(text)  # ValueError if the doc shows a form the code refuses
    for zone in re.findall(r'timezone = "([^"]*)"', DOC):
        parse_trigger("daily after 02:00", zone)
    for kind, pattern in TRIGGER_KINDS.items():
        assert any(re.fullmatch(pattern, text) for text in shown), f"no example of {kind}"


def test_the_refused_trigger_examples_are_refused() -> None:
    (line,) = [line for line in section("Triggers").splitlines() if line.startswith("Refused")]
    refused = re.findall(r'`"([^"`]*)"`', line)
    assert refused
    for text in refused:
        with pytest.raises(ValueError, match=r"must be|at least"):
            parse_trigger(text)


# -- the operator's commands, run for real against the example routes


@pytest.fixture(scope="module")
def hq_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HQ config whose routes file is config/routes.example.toml, with an empty database."""
    folder = tmp_path_factory.mktemp("hq")
    for name in ("routes.example.toml", "mappings.example.toml"):
        shutil.copy(ROOT / "config" / name, folder / name)
    (folder / "hq.toml").write_text('[hq]\ndata_dir = "hq"\nroutes_file = "routes.example.toml"\n')

    async def create() -> None:
        async with SQLiteHQStore(folder / "hq" / "hq.db"):
            pass

    asyncio.run(create())
    return folder / "hq.toml"


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_worked_example_shows_the_example_mapping() -> None:
    shown = tomllib.loads(marked_block("golden-mapping"))
    example = read_toml(ROOT / "config" / "mappings.example.toml")
    assert shown["mappings"]["grants_to_finance"] == example["mappings"]["grants_to_finance"]


def test_the_golden_grant_maps_as_the_doc_shows(hq_config: Path) -> None:
    sample = hq_config.parent / "grant.json"
    sample.write_text(marked_block("golden-input"))
    out = run(
        "route", "test", "grants-to-finance", "--config", str(hq_config), "--input", str(sample)
    )
    produced = [json.loads(line) for line in out.splitlines()]
    assert json.loads(marked_block("golden-output")) == produced
    shown = console("fieldsync-hq route test grants-to-finance --config hq.toml --input grant.json")
    assert [json.loads(line) for line in shown if line.strip()] == produced


def test_the_routes_inventory_shown_is_what_the_example_gives(hq_config: Path) -> None:
    out = run("routes", "--config", str(hq_config))
    shown = console("fieldsync-hq routes --config hq.toml")
    assert [line.rstrip() for line in shown if line.strip()] == out.splitlines()


def _commands() -> Iterator[list[str]]:
    """The words after each `fieldsync-hq` in the doc's inline code and code blocks."""
    snippets = re.findall(r"`([^`\n]+)`", DOC)
    for block in code_blocks():
        snippets += block.splitlines()
    for snippet in snippets:
        for match in re.finditer(r"(?:^|[\s$(])fieldsync-hq(?=\s|$)(.*)", snippet):
            words = shlex.split(match.group(1).split("#")[0], posix=True)
            yield list(itertools.takewhile(lambda w: w not in ("|", ">", "&&", ";"), words))


def test_every_command_the_doc_names_exists() -> None:
    seen = 0
    for words in _commands():
        command: click.Command = main
        for word in words:
            if isinstance(command, click.Group) and not word.startswith("-"):
                assert word in command.commands, f"no command `{word}` in fieldsync-hq {words}"
                command = command.commands[word]
            elif word.startswith("--"):
                options = {opt for param in command.params for opt in param.opts}
                assert word.split("=")[0] in options, f"fieldsync-hq {words}: no option {word}"
        seen += 1
    assert seen > 10


# -- the webhook receiver example, against the real sink


async def test_the_webhook_receiver_example_verifies_and_deduplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (block,) = [b for b in code_blocks("python") if "verify_signature" in b]
    monkeypatch.setenv("DASHBOARD_WEBHOOK_SECRET", "s3cr3t-shared-with-the-receiver")
    applied: list[dict[str, Any]] = []
    namespace: dict[str, Any] = {"apply": applied.append}
    exec(compile(block, "docs/routing.md", "exec"), namespace)
    app = web.Application()
    app.router.add_post("/hooks/fieldsync", namespace["fieldsync_hook"])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/fieldsync"
    monkeypatch.setenv("WRONG_SECRET", "not-the-shared-secret")
    good = WebhookSink(WebhookSettings(url=url, secret_env="DASHBOARD_WEBHOOK_SECRET"))
    wrong = WebhookSink(WebhookSettings(url=url, secret_env="WRONG_SECRET"))
    item = Outgoing("r:n1:1:0", "r", "beneficiaries", "BEN-1", "BEN-1", "upsert", {"a": 1}, 1)
    try:
        assert [o.status for o in await good.send([item, item])] == [Delivery.DELIVERED] * 2
        assert [a["idempotency_key"] for a in applied] == ["r:n1:1:0"]  # the repeat changed nothing
        (refused,) = await wrong.send([item])  # a bad signature: 401, the route waits
        assert refused.status is Delivery.ERRORED and refused.target_down
        assert len(applied) == 1
    finally:
        await good.close()
        await wrong.close()
        await runner.cleanup()


if __name__ == "__main__":
    print(f"## Route settings\n\n{render_table(RouteSection)}\n")
    for kind in SINK_KINDS:
        print(f"### `{kind}`\n\n{render_table(SINK_TYPES[kind].settings)}\n")
