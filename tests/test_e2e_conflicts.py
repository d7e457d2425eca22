"""End to end with real processes: two agents edit the same households offline; HQ applies the
policies; the review conflicts show up in HQ's queue and on both agents; one is resolved on an agent
while it is offline, one at HQ; after sync HQ and both agents hold identical records.

Policies come from config/collections.example.toml: names lww, household_size review (reviewed
offline by group:field-registration), registration_status owned by hq:case-management.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import fieldgen
from agent.capture.guard import client_headers
from agent.demo import LocalDeployment, _bin, _free_port

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "config" / "collections.example.toml"
KEYS = ["B1", "B2", "B3"]
SYNC = {"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "pull_interval_s": 0.2}


class Agent:
    """One agent process: config, enrolment, local API."""

    def __init__(self, d: LocalDeployment, name: str, group: str | None) -> None:
        self.d, self.name, self.port = d, name, _free_port()
        self.config = d.root / f"{name}.toml"
        sync = "".join(f"{k} = {json.dumps(v)}\n" for k, v in SYNC.items())
        self.config.write_text(
            f'[agent]\ndata_dir = "{(d.root / name).resolve()}"\nname = "{name}"\n'
            f'listen = "127.0.0.1:{self.port}"\nlog_level = "error"\n'
            f'collections_file = "{COLLECTIONS}"\n\n[sync]\n{sync}\n'
            '[collections.beneficiaries]\nkey = "beneficiary_id"\n\n'
            '[collections.distributions]\nkey = "distribution_id"\n'
        )
        token_args = ["token", "create", "--config", str(d.hq_config), "--node", name]
        if group:
            token_args += ["--group", group]
        token = d.run_cli(_bin("fieldsync-hq"), *token_args)
        self.cli("init")
        self.cli("enroll", d.hq_url, token)
        self.proc: subprocess.Popen[str] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], args[1:]
        sub = command.split()
        done = subprocess.run(
            [_bin("fieldsync-agent"), *sub, "--config", str(self.config), *rest],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"fieldsync-agent {' '.join(args)}: {done.stderr}")
        return done

    def start(self) -> None:
        self.proc = self.d.start(
            [_bin("fieldsync-agent"), "run", "--config", str(self.config)], "listening on"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.d.stop(self.proc)
            self.proc = None

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers=client_headers(self.d.root / self.name, path),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def record(self, key: str) -> dict[str, Any] | None:
        status, body = self.api("GET", f"/v1/collections/beneficiaries/records/{key}")
        return body if status == 200 else None

    def patch(self, key: str, fields: dict[str, Any]) -> None:
        status, body = self.api("PATCH", f"/v1/collections/beneficiaries/records/{key}", fields)
        assert status == 200, body

    def drained(self) -> bool:
        return bool(self.api("GET", "/v1/status")[1]["backlog_changes"] == 0)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    d = LocalDeployment(tmp_path, sync=SYNC, hq_settings={"collections_file": str(COLLECTIONS)})
    try:
        yield d
    finally:
        d.shutdown()


def hq_records(d: LocalDeployment) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(d.root / "hq" / "hq.db") as db:
        rows = db.execute(
            "SELECT key, data FROM records WHERE collection = 'beneficiaries'"
        ).fetchall()
    return {key: json.loads(data) for key, data in rows}


def hq_conflicts(d: LocalDeployment, *args: str) -> Any:
    out = d.run_cli(
        _bin("fieldsync-hq"), "conflicts", "list", "--config", str(d.hq_config), "--json", *args
    )
    return json.loads(out)


def wait_until(what: str, check: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def households() -> list[dict[str, Any]]:
    records = list(fieldgen.records("beneficiaries", 3, seed=11))
    for key, record in zip(KEYS, records, strict=True):
        record["beneficiary_id"] = key.replace("B", "BEN-1-")
    return records


def resize(record: dict[str, Any], size: int) -> dict[str, Any]:
    """household_size and members together (a rule keeps them equal)."""
    members = list(record["members"])
    while len(members) < size:
        members.append({**members[-1], "name": f"Member {len(members) + 1}", "relation": "child"})
    return {"household_size": size, "members": members[:size]}


def test_two_agents_offline_review_at_hq_and_in_the_field(deployment: LocalDeployment) -> None:
    d = deployment
    d.start_hq()
    a = Agent(d, "office-a", "field-registration")
    b = Agent(d, "office-b", None)
    a.start()
    b.start()
    records = households()
    ids = [r["beneficiary_id"] for r in records]
    for record in records:
        status, body = a.api(
            "PUT", f"/v1/collections/beneficiaries/records/{record['beneficiary_id']}", record
        )
        assert status == 200, body
    wait_until("b has the households", lambda: all(b.record(k) for k in ids))

    # HQ goes away; both offices edit the same households.
    d.stop(d.hq_proc)  # type: ignore[arg-type]
    first, second, third = records
    a.patch(ids[0], {"given_name": "Amina (a)", **resize(first, first["household_size"] + 1)})
    a.patch(ids[1], resize(second, second["household_size"] + 1))
    b.patch(ids[0], {"given_name": "Amina (b)", **resize(first, first["household_size"] + 2)})
    b.patch(ids[1], resize(second, second["household_size"] + 2))
    b.patch(ids[2], {"family_name": "Only-b"})  # no conflict: one side only
    # registration_status belongs to HQ's case management: refused at the edge, nothing stored.
    status, body = b.api(
        "PATCH",
        f"/v1/collections/beneficiaries/records/{ids[2]}",
        {"registration_status": "suspended"},
    )
    assert status in (403, 422), body
    assert "registration_status" in json.dumps(body)

    d.start_hq()
    wait_until("both agents drained", lambda: a.drained() and b.drained())
    wait_until("HQ queued two review conflicts", lambda: len(hq_conflicts(d)) == 2)
    queued = {c["key"]: c for c in hq_conflicts(d)}
    assert set(queued) == {ids[0], ids[1]}
    assert all(c["field"] == "household_size" for c in queued.values())
    assert {s["value"] for s in queued[ids[0]]["sides"]} == {
        first["household_size"] + 1,
        first["household_size"] + 2,
    }
    # Both agents see the same two conflicts once they pulled everything.
    for agent in (a, b):
        wait_until(
            f"{agent.name} sees both conflicts",
            lambda agent=agent: len(agent.api("GET", "/v1/conflicts")[1]["conflicts"]) == 2,
        )
    # Only the reviewing group may resolve in the field.
    status, body = b.api(
        "POST", f"/v1/conflicts/beneficiaries/{ids[0]}/household_size/resolve", {"take": 1}
    )
    assert status == 403, body

    # Office A resolves household 1 while offline; HQ resolves household 2.
    d.stop(d.hq_proc)  # type: ignore[arg-type]
    a.stop()
    done = a.cli("conflicts resolve", "beneficiaries", ids[0], "household_size", "--take", "2")
    assert "resolved" in done.stdout
    assert len(json.loads(a.cli("conflicts list", "--json").stdout)) == 1
    d.run_cli(
        _bin("fieldsync-hq"),
        "conflicts",
        "resolve",
        "--config",
        str(d.hq_config),
        str(queued[ids[1]]["id"]),
        "--take",
        "1",
    )
    d.start_hq()
    a.start()
    wait_until("a drained", a.drained)
    wait_until("HQ's queue is empty", lambda: hq_conflicts(d) == [])

    def identical() -> bool:
        at_hq = hq_records(d)
        return all(a.record(k) == at_hq[k] == b.record(k) for k in ids)

    wait_until("HQ and both agents hold identical records", identical)
    at_hq = hq_records(d)
    assert at_hq[ids[2]]["family_name"] == "Only-b"
    assert at_hq[ids[2]]["registration_status"] == third["registration_status"]
    for agent in (a, b):
        assert agent.api("GET", "/v1/conflicts")[1]["conflicts"] == []
    resolved = hq_conflicts(d, "--status", "resolved")
    assert {c["key"] for c in resolved} == {ids[0], ids[1]}
