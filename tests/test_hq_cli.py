"""`fieldsync-hq` commands: output formats, exit codes, audit; `serve` as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hq_fixtures import make_changes

from hq_server.cli import READY_PREFIX, main
from hq_server.store import EnrollmentRefused, SQLiteHQStore
from protocol.identity import NodeIdentity

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "hq.toml"
    path.write_text(f'[hq]\ndata_dir = "data"\nlisten = "127.0.0.1:0"\n{extra}', encoding="utf-8")
    return path


def create_db(tmp_path: Path) -> Path:
    db = tmp_path / "data" / "hq.db"

    async def run() -> None:
        async with SQLiteHQStore(db):
            pass

    asyncio.run(run())
    return db


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def enrol_with_cli_token(tmp_path: Path, config: Path, name: str) -> NodeIdentity:
    result = cli("token", "create", "--config", str(config), "--node", name)
    assert result.exit_code == 0, result.stderr
    token = result.stdout.strip()
    identity = NodeIdentity.generate()

    async def run() -> None:
        async with SQLiteHQStore(tmp_path / "data" / "hq.db") as store:
            await store.enroll(token, identity.public_key)
            await store.ingest(identity.node_id, 1, make_changes(identity, 1, 3))

    asyncio.run(run())
    return identity


def test_token_create_prints_only_the_token_and_is_audited(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    create_db(tmp_path)
    result = cli(
        "token", "create", "--config", str(config), "--node", "field-1", "--ttl-hours", "2"
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert len(lines[0]) >= 40
    assert " " not in lines[0]
    audit = cli("audit", "--config", str(config))
    entries = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [e["action"] for e in entries] == ["token.create"]
    assert entries[0]["actor"].startswith("cli:")
    assert lines[0] not in audit.stdout
    assert cli("audit", "--config", str(config), "--verify").stdout.strip() == "audit log ok"


def test_nodes_table_and_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    create_db(tmp_path)
    empty = cli("nodes", "--config", str(config))
    assert empty.stdout.split() == [
        "NAME", "NODE", "ID", "GROUPS", "ENROLLED", "LAST", "CONTACT", "ACKED", "REVOKED",
        "FLAGGED",
    ]  # fmt: skip
    node = enrol_with_cli_token(tmp_path, config, "field-1")
    table = cli("nodes", "--config", str(config)).stdout.splitlines()
    assert len(table) == 2
    assert table[1].startswith("field-1")
    assert node.node_id in table[1]
    assert table[1].split()[2] == "-"  # no groups
    assert table[1].split()[-3:] == ["1", "-", "-"]  # acked, revoked, flagged
    nodes = json.loads(cli("nodes", "--config", str(config), "--json").stdout)
    assert nodes[0]["node_id"] == node.node_id
    assert nodes[0]["acked_through"] == 1
    assert nodes[0]["revoked_at"] is None
    assert nodes[0]["enrolled_at"].endswith("Z")
    assert nodes[0]["groups"] == []
    assert nodes[0]["flagged_reason"] is None

    async def flag() -> None:
        async with SQLiteHQStore(tmp_path / "data" / "hq.db") as store:
            await store.flag_node(node.node_id, "clock ahead: 900 s ahead of HQ (limit 300 s)")

    asyncio.run(flag())
    flagged = cli("nodes", "--config", str(config)).stdout.splitlines()[1]
    # revoked, flagged: the whole reason
    assert re.split(r"\s{2,}", flagged)[-2:] == [
        "-",
        "clock ahead: 900 s ahead of HQ (limit 300 s)",
    ]


def test_node_revoke_by_name_and_id(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    create_db(tmp_path)
    node = enrol_with_cli_token(tmp_path, config, "field-1")
    result = cli("node", "revoke", "--config", str(config), "field-1")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"revoked field-1 ({node.node_id})"
    again = cli("node", "revoke", "--config", str(config), node.node_id)
    assert again.exit_code == 0
    assert again.stdout.startswith("already revoked field-1")
    missing = cli("node", "revoke", "--config", str(config), "nobody")
    assert missing.exit_code == 1
    assert "nobody" in missing.stderr
    actions = [
        json.loads(x)["action"]
        for x in cli("audit", "--config", str(config)).stdout.split("\n")
        if x
    ]
    assert actions.count("node.revoke") == 1
    nodes = json.loads(cli("nodes", "--config", str(config), "--json").stdout)
    assert nodes[0]["revoked_at"] is not None


def test_records_and_count(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    create_db(tmp_path)
    enrol_with_cli_token(tmp_path, config, "field-1")
    count = cli("records", "--config", str(config), "beneficiaries", "--count")
    assert count.stdout.strip() == "3"
    lines = [
        json.loads(x)
        for x in cli("records", "--config", str(config), "beneficiaries").stdout.splitlines()
    ]
    assert [r["key"] for r in lines] == ["b0", "b1", "b2"]
    assert lines[0]["data"]["name"] == "Person 0"
    assert lines[0]["deleted"] is False
    assert cli("records", "--config", str(config), "other", "--count").stdout.strip() == "0"


@pytest.mark.parametrize(
    "args",
    [
        ["nodes"],
        ["token", "create", "--node", "x"],
        ["node", "revoke", "x"],
        ["records", "c"],
        ["serve"],
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[hq]\nlisten = 8443\n", encoding="utf-8")
    command = [*args[:2], "--config", str(bad), *args[2:]] if args[0] in ("token", "node") else [
        args[0], "--config", str(bad), *args[1:]
    ]  # fmt: skip
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0]
    assert "hq.listen" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_database_is_exit_1_not_a_new_database(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = CliRunner().invoke(main, ["nodes", "--config", str(config)])
    assert result.exit_code == 1
    assert "no HQ database" in result.stderr
    assert not (tmp_path / "data" / "hq.db").exists()


def _read_line(stream: object, out: list[str], done: threading.Event) -> None:
    out.append(stream.readline())  # type: ignore[attr-defined]
    done.set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_url_with_real_port_and_stops_on_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "hq_server.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line: list[str] = []
        done = threading.Event()
        threading.Thread(target=_read_line, args=(process.stdout, line, done), daemon=True).start()
        assert done.wait(30), "server did not print its URL"
        assert line[0].startswith(READY_PREFIX), line
        url = line[0][len(READY_PREFIX) :].strip()
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        with urllib.request.urlopen(url + "/v1/health", timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True}
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read() if process.stderr else ""
        assert "Traceback" not in stderr
        events = [json.loads(x)["msg"] for x in stderr.splitlines() if x.startswith("{")]
        assert "listening" in events
        assert "stopped" in events
        assert (tmp_path / "data" / "hq.key").stat().st_mode & 0o077 == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_token_create_reenroll_is_bound_to_an_enrolled_node(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    create_db(tmp_path)
    node = enrol_with_cli_token(tmp_path, config, "field-1")
    plain = cli("token", "create", "--config", str(config), "--node", "field-1")
    assert plain.exit_code == 0, plain.stderr
    assert node.node_id in plain.stderr and "--reenroll" in plain.stderr  # a namesake
    assert len(plain.stdout.splitlines()) == 1
    again = cli("token", "create", "--config", str(config), "--node", "field-1", "--reenroll")
    assert again.exit_code == 0, again.stderr
    assert again.stderr == ""
    missing = cli("token", "create", "--config", str(config), "--node", "nobody", "--reenroll")
    assert missing.exit_code == 1
    assert "no node" in missing.stderr and "Traceback" not in missing.stderr
    no_node = cli("token", "create", "--config", str(config))
    assert no_node.exit_code == 2 and "--node" in no_node.stderr

    async def enrol(token: str) -> str:
        async with SQLiteHQStore(tmp_path / "data" / "hq.db") as store:
            try:
                await store.enroll(token, node.public_key)
            except EnrollmentRefused as e:
                return e.code
            return "enrolled"

    assert asyncio.run(enrol(plain.stdout.strip())) == "already_enrolled"
    assert asyncio.run(enrol(again.stdout.strip())) == "enrolled"
    audit = cli("audit", "--config", str(config))
    entries = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [e["action"] for e in entries if e["action"].startswith("node.")] == [
        "node.enroll",
        "node.enroll_refused",
        "node.enroll",
    ]
    assert [e["detail"]["reenroll_node"] for e in entries if e["action"] == "token.create"] == [
        None,
        None,
        node.node_id,
    ]
