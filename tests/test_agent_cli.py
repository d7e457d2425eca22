"""`fieldsync-agent` (agent.cli): init, put, get, status, generate and enroll on a temp data folder.

Every failure is one line on stderr naming what to fix, exit code 1 (2 for a bad config file),
never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import KEY_FIELD, beneficiary, read_ndjson
from click.testing import CliRunner, Result

from agent.cli import main
from agent.config import load_agent_config
from agent.service import open_agent
from protocol.identity import NodeIdentity

CONFIG = """\
[agent]
data_dir = "{data_dir}"

[collections.beneficiaries]
key = "beneficiary_id"

[collections.distributions]
key = "distribution_id"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(data_dir=tmp_path / "data"))
    return path


def cli(config: Path | None, *args: str) -> Result:
    argv = [args[0]] + (["--config", str(config)] if config is not None else []) + list(args[1:])
    result = CliRunner().invoke(main, argv)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def ok(config: Path | None, *args: str) -> str:
    result = cli(config, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(config: Path | None, *args: str, code: int = 1) -> str:
    """Run a command that must fail; return its single stderr line."""
    result = cli(config, *args)
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fieldsync-agent: ")
    return lines[0]


@pytest.fixture
def initialised(config: Path) -> Path:
    ok(config, "init")
    return config


def test_init_creates_a_private_key_and_the_database(config: Path, tmp_path: Path) -> None:
    out = ok(config, "init")
    key = tmp_path / "data" / "node.key"
    identity = NodeIdentity.load(key)
    token = tmp_path / "data" / "api-token"
    assert out.splitlines() == [
        f"initialised node {identity.node_id} in {tmp_path / 'data'}",
        f"local API token (apps send it as a bearer token): {token}",
    ]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text().startswith("fsl_") and token.read_text() not in out
    assert (tmp_path / "data" / "agent.db").exists()
    pem = key.read_bytes()
    secret = token.read_bytes()

    again = ok(config, "init")
    assert again.strip() == f"already initialised: node {identity.node_id} ({tmp_path / 'data'})"
    assert key.read_bytes() == pem
    assert token.read_bytes() == secret

    token.unlink()  # an agent initialised before tokens existed gets one from `init` or `run`
    assert f"created the local API token: {token}" in ok(config, "init")
    assert token.read_text().startswith("fsl_") and token.read_bytes() != secret


def test_put_and_get_one_record(initialised: Path) -> None:
    record = beneficiary(1, tags=["ü", 3])
    out = ok(initialised, "put", "beneficiaries", json.dumps(record))
    assert out.strip() == "stored 1 records (1 changed, 0 unchanged)"
    assert json.loads(ok(initialised, "get", "beneficiaries", "b00001")) == record
    again = ok(initialised, "put", "beneficiaries", json.dumps(record))
    assert again.strip() == "stored 1 records (0 changed, 1 unchanged)"
    ok(initialised, "put", "beneficiaries", json.dumps({KEY_FIELD: "b00001", "_op": "delete"}))
    fails(initialised, "get", "beneficiaries", "b00001")


def test_generate_then_put_a_file(initialised: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "gen.ndjson"
    out = ok(
        None, "generate", "beneficiaries", "--count", "25", "--seed", "7", "--out", str(out_file)
    )
    assert out.strip() == f"wrote 25 beneficiaries to {out_file}"
    records = read_ndjson(out_file)
    assert len(records) == 25 and len({r[KEY_FIELD] for r in records}) == 25

    stored = ok(initialised, "put", "beneficiaries", "--file", str(out_file))
    assert stored.strip() == "stored 25 records (25 changed, 0 unchanged)"
    for record in (records[0], records[-1]):
        assert json.loads(ok(initialised, "get", "beneficiaries", record[KEY_FIELD])) == record
    status = json.loads(ok(initialised, "status", "--json"))
    assert status["backlog_changes"] == 25


def test_get_a_missing_record_is_one_line(initialised: Path) -> None:
    line = fails(initialised, "get", "beneficiaries", "nobody")
    assert line == "fieldsync-agent: no record 'nobody' in beneficiaries"


@pytest.mark.parametrize(
    ("record", "needles"),
    [
        ({KEY_FIELD: "b1", "bad-name": 1}, ["'bad-name'", "[field_name]", "'b1'"]),
        ({"name": "keyless"}, [f"'{KEY_FIELD}'", "[key_required]"]),
        ({KEY_FIELD: "b1", "_op": "merge"}, ["'_op'", "[op_valid]"]),
        ('{"beneficiary_id": "b1", "v": NaN}', ["not valid JSON"]),
        ('{"beneficiary_id": "b1", "v": 36893488147419103232}', ["not valid JSON", "64-bit"]),
        ("{nope", ["not valid JSON"]),
    ],
)
def test_a_bad_record_is_refused_naming_field_and_rule(
    initialised: Path, record: Any, needles: list[str]
) -> None:
    text = record if isinstance(record, str) else json.dumps(record)
    line = fails(initialised, "put", "beneficiaries", text)
    for needle in needles:
        assert needle in line
    status = json.loads(ok(initialised, "status", "--json"))
    assert status["backlog_changes"] == 0


def test_a_file_with_one_bad_line_stores_nothing(initialised: Path, tmp_path: Path) -> None:
    path = tmp_path / "mixed.ndjson"
    lines = [json.dumps(beneficiary(i)) for i in range(5)]
    lines[3] = json.dumps({KEY_FIELD: "b00003", "9lives": True})
    path.write_text("\n".join(lines) + "\n")
    line = fails(initialised, "put", "beneficiaries", "--file", str(path))
    assert str(path) in line and "line 4" in line and "[field_name]" in line
    fails(initialised, "get", "beneficiaries", "b00000")
    assert json.loads(ok(initialised, "status", "--json"))["backlog_changes"] == 0


def test_usage_errors_are_one_line(initialised: Path) -> None:
    assert "not configured" in fails(initialised, "put", "patients", "{}")
    assert "give a RECORD or --file" in fails(initialised, "put", "beneficiaries")


def test_commands_before_init_say_to_run_init(config: Path) -> None:
    for args in (("get", "beneficiaries", "x"), ("status",), ("enroll", "https://h", "t")):
        assert "fieldsync-agent init" in fails(config, *args)


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[sync]\nbogus = 1\n", ["sync.bogus", "unknown setting"]),
        ('[sync]\nwindow = "four"\n', ["sync.window", "must be an integer", "'four'"]),
        ("[sync]\nwindow = 0\n", ["sync.window", "between 1 and 64"]),
        ('[hq]\nurl = "http://hq.example.org"\n', ["hq.url", "https://"]),
        ("[collections.beneficiaries]\nkey = 5\n", ["collections.beneficiaries.key", "string"]),
        ("[agent\n", ["not valid TOML"]),
    ],
)
def test_a_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, toml: str, needles: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[agent]\ndata_dir = "{tmp_path}"\n' + toml if "[agent" not in toml else toml)
    for command in (("status",), ("init",), ("get", "beneficiaries", "x")):
        line = fails(path, *command, code=2)
        assert str(path) in line
        for needle in needles:
            assert needle in line


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    line = fails(tmp_path / "absent.toml", "status", code=2)
    assert "absent.toml" in line and "file not found" in line


def test_status_json_and_human(initialised: Path) -> None:
    ok(initialised, "put", "beneficiaries", json.dumps(beneficiary(1)))
    status = json.loads(ok(initialised, "status", "--json"))
    assert status["backlog_changes"] == 1 and status["backlog_bytes"] > 0
    assert status["sealed_batches_waiting"] == 0 and status["acked_changes"] == 0
    assert status["last_contact"] is None and status["last_error"] is None
    assert status["node_id"].startswith("n")
    human = ok(initialised, "status")
    assert "changes waiting: 1" in human and f"node: {status['node_id']}" in human


def test_enroll_with_an_unreachable_hq_is_a_clear_error(initialised: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nothing listens there
    line = fails(initialised, "enroll", f"http://127.0.0.1:{port}", "token123")
    assert f"cannot reach http://127.0.0.1:{port}" in line
    assert not (initialised.parent / "data" / "hq.json").exists()


def test_a_key_readable_by_others_is_refused_with_the_fix(initialised: Path) -> None:
    key = initialised.parent / "data" / "node.key"
    key.chmod(0o644)
    line = fails(initialised, "status")
    assert "readable by others" in line and f"chmod 600 {key}" in line


def test_a_pathological_line_is_a_clear_error_not_a_traceback(
    initialised: Path, tmp_path: Path
) -> None:
    path = tmp_path / "deep.ndjson"
    path.write_bytes(b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000 + b"\n")
    line = fails(initialised, "put", "beneficiaries", "--file", str(path))
    assert "line 1" in line


# ---- rough edges (issue 9, defect 10) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        ("http://hq.example.org:8443", ["https://", "plain http"]),
        ("http://127.0.0.1.evil.example", ["https://"]),
        ("hq.example.org:8443", ["has no scheme", "https://hq.example.org:8443"]),
        ("hq.example.org", ["has no scheme", "write it as https://hq.example.org"]),
    ],
)
def test_enroll_refuses_plaintext_to_a_remote_host_and_a_url_without_scheme(
    initialised: Path, url: str, needles: list[str]
) -> None:
    line = fails(initialised, "enroll", url, "token123", code=2)
    assert line.startswith(f"fieldsync-agent: URL {url!r} ")
    for needle in needles:
        assert needle in line
    assert not (initialised.parent / "data" / "hq.json").exists()


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fieldsync-agent, version {version('fieldsync')}"


def test_list_with_filters_and_a_limit(initialised: Path, tmp_path: Path) -> None:
    path = tmp_path / "people.ndjson"
    records = [beneficiary(i) for i in range(12)]  # village i % 3, household_size i % 7 + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ok(initialised, "put", "beneficiaries", "--file", str(path))

    def listed(*args: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in ok(initialised, "list", *args).splitlines()]

    assert listed("beneficiaries") == records
    village = listed("beneficiaries", "--where", "village=Village 1")
    assert village == [r for r in records if r["village"] == "Village 1"]
    # A value that is JSON matches as that JSON value (the number 3, not the text "3").
    both = listed("beneficiaries", "--where", "village=Village 2", "--where", "household_size=3")
    assert both == [r for r in records if r["village"] == "Village 2" and r["household_size"] == 3]
    assert listed("beneficiaries", "--where", 'household_size="3"') == []
    result = cli(initialised, "list", "beneficiaries", "--limit", "5")
    assert [json.loads(line) for line in result.stdout.splitlines()] == records[:5]
    assert "--after b00004" in result.stderr
    assert listed("beneficiaries", "--limit", "5", "--after", "b00004") == records[5:10]
    assert listed("beneficiaries", "--where", "village=Nowhere") == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("patients",), "not configured"),
        (("beneficiaries", "--where", "village"), "FIELD=VALUE"),
        (("beneficiaries", "--where", "bad name=1"), "not a valid field name"),
        (("beneficiaries", "--limit", "0"), "--limit"),
    ],
)
def test_list_usage_errors_are_one_line(
    initialised: Path, args: tuple[str, ...], needle: str
) -> None:
    result = cli(initialised, "list", *args)
    assert result.exit_code != 0
    assert needle in result.stderr


def test_status_shows_warnings_first_and_the_last_recovery(initialised: Path) -> None:
    """An HQ refusal (and a full disk) must be the first thing an operator reads."""

    async def refuse() -> None:
        async with open_agent(load_agent_config(initialised)) as agent:
            note = {"message": "HQ refused batch 6: diverged", "at_ms": 1_700_000_000_000}
            await agent.store.set_meta(hq_refusal=json.dumps(note))

    asyncio.run(refuse())
    human = ok(initialised, "status").splitlines()
    assert human[0].startswith("WARNING: HQ refused batch 6: diverged")
    assert any("restore recoveries: 0" in line for line in human)
