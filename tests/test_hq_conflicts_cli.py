"""`fieldsync-hq conflicts`, `node groups` and `token create --group` on a real HQ database holding
a real review conflict (two enrolled nodes changed a household's size concurrently)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from test_hq_conflicts import EXAMPLE, Node, base_record

from hq_server.admin_api import CONFLICTS_PATH
from hq_server.app import hq_store, load_hq_collections
from hq_server.cli import main
from hq_server.config import HQConfig, load_config
from hq_server.keys import load_or_create_identity
from hq_server.store import SQLiteHQStore
from protocol.hlc import pack, physical_ms, system_ms
from protocol.identity import NodeIdentity

REASON = "household visited: 5 people"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@dataclass(frozen=True)
class Setup:
    config_path: Path
    config: HQConfig
    hq: str  # HQ's node id
    a: str  # node "kakuma-1": wrote household_size 5 (side 2)
    b: str  # node "kakuma-2": wrote household_size 6 (side 1, higher stamp)
    v: int  # the version both started from
    conflict: int

    def run(self, *args: str) -> Result:
        return cli(*args[:2], "--config", str(self.config_path), *args[2:])

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.config.hq.db_path) as conn:
            return conn.execute(sql).fetchall()

    def state(self) -> tuple[list[tuple[object, ...]], ...]:
        """Everything a refused command must leave as it was."""
        return (
            self.rows("SELECT * FROM conflicts ORDER BY id"),
            self.rows("SELECT * FROM changelog ORDER BY seq"),
            self.rows("SELECT * FROM records ORDER BY collection, key"),
            self.rows("SELECT id FROM audit ORDER BY id"),
        )


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "hq.toml"
    path.write_text(
        f'[hq]\ndata_dir = "data"\nlisten = "127.0.0.1:0"\ncollections_file = "{EXAMPLE}"\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """HQ's key and database as after a first start, and one open review conflict."""
    path = write_config(tmp_path)
    config = load_config(path)
    identity = load_or_create_identity(config.hq.key_path)

    async def run() -> Setup:
        async with hq_store(config.hq, identity, load_hq_collections(config.hq)) as store:
            a = await Node.enrol(store, "kakuma-1", groups=("field-registration",))
            b = await Node.enrol(store, "kakuma-2")
            v = await base_record(store, a, pack(system_ms()))
            await a.send(a.change("B1", {"household_size": 5}, v + 10, v))
            await b.send(b.change("B1", {"household_size": 6}, v + 20, v))
            (entry,) = await store.list_conflicts()
            return Setup(path, config, identity.node_id, a.id, b.id, v, entry.id)

    return asyncio.run(run())


def when(hlc: int) -> str:
    """A stamp's time as the table prints it."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(physical_ms(hlc) / 1000))


def test_list_shows_both_sides_with_node_names_and_times(setup: Setup) -> None:
    result = setup.run("conflicts", "list")
    assert result.exit_code == 0, result.stderr
    header, row, *rest = result.stdout.splitlines()
    assert rest == []
    assert header.split()[:7] == [
        "ID", "COLLECTION", "KEY", "FIELD", "POLICY", "STATUS", "REVIEWER"
    ]  # fmt: skip
    cells = re.split(r"\s{2,}", row)
    assert cells[:7] == [
        str(setup.conflict),
        "beneficiaries",
        "B1",
        "household_size",
        "review",
        "open",
        "group:field-registration",
    ]
    assert f"1: 6 (kakuma-2, {when(setup.v + 20)})" in row
    assert f"2: 5 (kakuma-1, {when(setup.v + 10)})" in row
    assert json.loads(setup.run("conflicts", "list", "--status", "auto", "--json").stdout) == []
    # Other statuses and collections do not hold it; --all does.
    assert setup.run("conflicts", "list", "--status", "resolved").stdout.count("\n") == 1
    assert setup.run("conflicts", "list", "--collection", "other").stdout.count("\n") == 1
    assert str(setup.conflict) in setup.run("conflicts", "list", "--all").stdout.splitlines()[1]


def test_list_json_is_the_show_document(setup: Setup) -> None:
    listed = setup.run("conflicts", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    (doc,) = json.loads(listed.stdout)
    shown = setup.run("conflicts", "show", str(setup.conflict), "--json")
    assert json.loads(shown.stdout) == doc
    assert doc["sides"] == [
        {
            "side": 1,
            "value": 6,
            "hlc": setup.v + 20,
            "origin": setup.b,
            "parent": setup.v,
            "node": "kakuma-2",
            "at": doc["sides"][0]["at"],
        },
        {
            "side": 2,
            "value": 5,
            "hlc": setup.v + 10,
            "origin": setup.a,
            "parent": setup.v,
            "node": "kakuma-1",
            "at": doc["sides"][1]["at"],
        },
    ]
    assert doc["sides"][0]["at"].startswith(when(setup.v + 20)[:10])
    assert doc["ancestor"]["value"] == 4 and doc["ancestor"]["node"] == "kakuma-1"
    assert (doc["status"], doc["resolution"], doc["closed_at"]) == ("open", None, None)
    assert doc["opened_at"].endswith("Z")


def test_show_prints_ancestor_sides_and_reviewer(setup: Setup) -> None:
    result = setup.run("conflicts", "show", str(setup.conflict))
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert f"conflict {setup.conflict}: beneficiaries/B1 field household_size" in text
    assert "reviewer: group:field-registration" in text
    assert f"ancestor: 4 (kakuma-1, {when(setup.v)})" in text
    assert f"side 1: 6 (kakuma-2, {when(setup.v + 20)}; node {setup.b})" in text
    assert f"side 2: 5 (kakuma-1, {when(setup.v + 10)}; node {setup.a})" in text
    assert "resolution" not in text


def test_resolve_with_a_value_writes_an_hq_change_every_node_receives(setup: Setup) -> None:
    result = setup.run(
        "conflicts", "resolve", str(setup.conflict), "--value", "5", "--note", REASON
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(
        f"resolved conflict {setup.conflict}: beneficiaries/B1 household_size = 5 (HQ change 1"
    )
    doc = json.loads(setup.run("conflicts", "show", str(setup.conflict), "--json").stdout)
    assert doc["status"] == "resolved" and doc["closed_at"] is not None
    resolution = doc["resolution"]
    assert (resolution["value"], resolution["origin"], resolution["node"]) == (5, setup.hq, "HQ")
    assert resolution["by"].startswith("cli:") and resolution["note"] == REASON
    text = setup.run("conflicts", "show", str(setup.conflict)).stdout
    assert f"resolution: 5 by {resolution['by']} ({REASON}); change 1 of HQ" in text
    record = json.loads(setup.run("records", "beneficiaries").stdout)
    assert record["data"]["household_size"] == 5
    assert setup.run("conflicts", "list").stdout.count("\n") == 1  # the queue is empty

    async def feeds() -> list[list[tuple[int, dict[str, object]]]]:
        async with SQLiteHQStore(setup.config.hq.db_path) as store:
            pages = [await store.feed(n, 0, 100, max_bytes=1 << 20) for n in (setup.a, setup.b)]
        return [[(c.parent, c.fields) for c in p.changes if c.origin == setup.hq] for p in pages]

    for hq_changes in asyncio.run(feeds()):
        ((parent, fields),) = hq_changes
        assert fields == {"household_size": 5} and parent >= setup.v + 20  # covers both sides
    entries = [json.loads(x) for x in setup.run("audit").stdout.splitlines()]
    (entry,) = [e for e in entries if e["action"] == "conflict.resolve"]
    assert entry["actor"] == resolution["by"]
    assert entry["detail"]["conflict"] == setup.conflict and entry["detail"]["note"] == REASON
    assert setup.run("audit", "--verify").exit_code == 0

    again = setup.run("conflicts", "resolve", str(setup.conflict), "--value", "6")
    assert again.exit_code == 1
    assert again.stderr == f"fieldsync-hq: conflict {setup.conflict} is resolved, not open: " + (
        "nothing to resolve\n"
    )
    taken_again = setup.run("conflicts", "resolve", str(setup.conflict), "--take", "1")
    assert taken_again.exit_code == 1 and "not open" in taken_again.stderr


def test_resolve_by_taking_a_side(setup: Setup) -> None:
    result = setup.run("conflicts", "resolve", str(setup.conflict), "--take", "1")
    assert result.exit_code == 0, result.stderr
    assert "household_size = 6" in result.stdout
    doc = json.loads(setup.run("conflicts", "show", str(setup.conflict), "--json").stdout)
    assert doc["resolution"]["value"] == 6 and doc["resolution"]["note"] == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--value", "{oops"], "--value is not JSON"),
        (["--value", "five"], "--value is not JSON"),
        (["--value", "NaN"], "--value is not JSON (NaN is not a JSON value)"),
        (["--value", "1e999"], "--value is not JSON (1e999 is out of range"),
        (["--value", '"five"'], "not a valid beneficiaries.household_size: household_size"),
        (["--value", "31"], "household_size must be at most 30"),
        (["--take", "3"], "--take 3: conflict 1 has 2 side(s): take a number from 1 to 2"),
        (["--take", "0"], "--take 0: conflict 1 has 2 side(s)"),
        (["--value", "5", "--take", "1"], "give --value JSON or --take N (exactly one)"),
        ([], "give --value JSON or --take N (exactly one)"),
    ],
)
def test_bad_input_is_exit_2_and_changes_nothing(
    setup: Setup, args: list[str], message: str
) -> None:
    before = setup.state()
    result = setup.run("conflicts", "resolve", str(setup.conflict), *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert message in line
    assert "Traceback" not in result.stderr
    assert setup.state() == before


@pytest.mark.parametrize(
    "args",
    [["conflicts", "show", "99"], ["conflicts", "resolve", "99", "--value", "1"]],
)
def test_unknown_conflict_is_one_line_exit_1(setup: Setup, args: list[str]) -> None:
    before = setup.state()
    result = setup.run(*args)
    assert result.exit_code == 1
    assert result.stderr == "fieldsync-hq: no conflict 99\n"
    assert setup.state() == before


def test_resolving_needs_hqs_key(setup: Setup) -> None:
    setup.config.hq.key_path.rename(setup.config.hq.key_path.with_suffix(".moved"))
    before = setup.state()
    result = setup.run("conflicts", "resolve", str(setup.conflict), "--take", "1")
    assert result.exit_code == 1
    assert "does not exist yet" in result.stderr and str(setup.config.hq.key_path) in result.stderr
    assert setup.state() == before
    # Reading needs no key.
    assert setup.run("conflicts", "list").exit_code == 0


def test_a_broken_collections_file_is_a_config_error(setup: Setup, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[collections.x]\nnope = 1\n", encoding="utf-8")
    text = setup.config_path.read_text(encoding="utf-8").replace(str(EXAMPLE), str(broken))
    setup.config_path.write_text(text, encoding="utf-8")
    result = setup.run("conflicts", "list")
    assert result.exit_code == 2
    assert str(broken) in result.stderr and "Traceback" not in result.stderr


# -- node groups


def test_token_groups_and_node_groups(setup: Setup) -> None:
    token = setup.run("token", "create", "--node", "dadaab-1", "--group", "dadaab", "--group", "x")
    assert token.exit_code == 0, token.stderr
    identity = NodeIdentity.generate()

    async def enrol() -> None:
        async with SQLiteHQStore(setup.config.hq.db_path) as store:
            await store.enroll(token.stdout.strip(), identity.public_key)

    asyncio.run(enrol())
    nodes = {n["name"]: n for n in json.loads(setup.run("nodes", "--json").stdout)}
    assert nodes["dadaab-1"]["groups"] == ["group:dadaab", "group:x"]
    assert nodes["kakuma-1"]["groups"] == ["group:field-registration"]
    table = setup.run("nodes").stdout
    assert re.search(r"^dadaab-1\s+\S+\s+group:dadaab,group:x\s", table, re.M)

    shown = setup.run("node", "groups", "dadaab-1")
    assert shown.stdout == f"dadaab-1 ({identity.node_id}): group:dadaab,group:x\n"
    changed = setup.run("node", "groups", identity.node_id, "--set", "b", "--set", "group:a")
    assert changed.exit_code == 0, changed.stderr
    assert changed.stdout == f"dadaab-1 ({identity.node_id}): group:a,group:b\n"
    cleared = setup.run("node", "groups", "dadaab-1", "--clear")
    assert cleared.stdout == f"dadaab-1 ({identity.node_id}): -\n"
    entries = [json.loads(x) for x in setup.run("audit").stdout.splitlines()]
    groups = [e for e in entries if e["action"] == "node.groups"]
    assert [e["detail"]["after"] for e in groups] == [["group:a", "group:b"], []]
    assert all(e["actor"].startswith("cli:") for e in groups)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["node", "groups", "kakuma-2", "--set", "bad name"], 2, "--set: node group 'bad name'"),
        (["node", "groups", "kakuma-2", "--set", "a", "--clear"], 2, "--set GROUP ... or --clear"),
        (["node", "groups", "nobody", "--set", "a"], 1, "no node with id or name 'nobody'"),
        (["token", "create", "--node", "n", "--group", "a b"], 2, "--group: node group 'a b'"),
    ],
)
def test_bad_groups_are_refused_and_change_nothing(
    setup: Setup, args: list[str], code: int, message: str
) -> None:
    before = setup.state(), setup.rows("SELECT * FROM nodes"), setup.rows("SELECT * FROM tokens")
    result = setup.run(*args)
    assert result.exit_code == code
    (line,) = result.stderr.splitlines()
    assert message in line
    after = setup.state(), setup.rows("SELECT * FROM nodes"), setup.rows("SELECT * FROM tokens")
    assert after == before


# -- the operations guide


def test_the_conflict_review_guide_names_real_commands_options_and_paths() -> None:
    """docs/operations.md, section "Conflict review": every `fieldsync-hq` command and option it
    shows exists, and it shows every admin endpoint."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text("utf-8")
    section = doc.split("## Conflict review", 1)[1].split("\n## ", 1)[0]
    seen = 0
    for match in re.finditer(r"(?:^|[\s`])fieldsync-hq ([^`\n#]*)", section, re.M):
        command: click.Command = main
        for word in shlex.split(match.group(1)):
            if isinstance(command, click.Group):
                assert word in command.commands, (
                    f"no command `{word}`: fieldsync-hq {match.group(1)}"
                )
                command = command.commands[word]
            elif word.startswith("--"):
                options = {opt for param in command.params for opt in param.opts}
                assert word in options, f"no option {word}: fieldsync-hq {match.group(1)}"
        seen += 1
    assert seen >= 10
    for path in (CONFLICTS_PATH + "?", CONFLICTS_PATH + "/ID`", CONFLICTS_PATH + "/ID/resolve`"):
        assert f"{path}" in section, path
