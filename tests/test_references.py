"""Reference tables updated from HQ, with real processes: a new admin code is refused at the edge,
HQ pushes a newer admin3 table, the agent accepts the code from its next sync on -- and still does
after a restart while HQ is down."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import fieldgen
from agent.demo import LocalDeployment, _bin
from protocol.collections import ReferenceTable
from protocol.references import read_table, table_from_record, table_record

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "config" / "collections.example.toml"
ADMIN_CODES = ROOT / "config" / "admin_codes.example.csv"
NEW_CODE = "JO01-01-999"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    d = LocalDeployment(
        tmp_path,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "pull_interval_s": 0.2},
        hq_settings={"collections_file": str(COLLECTIONS)},
        agent_settings={"collections_file": str(COLLECTIONS)},
    )
    try:
        yield d
    finally:
        d.shutdown()


def put(d: LocalDeployment, record: dict[str, Any]) -> tuple[int, Any]:
    key = record["beneficiary_id"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{d.api_port}/v1/collections/beneficiaries/records/{key}",
        data=json.dumps(record).encode(),
        method="PUT",
        headers=d.api_headers(),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hq(d: LocalDeployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("fieldsync-hq"), *args[:2], "--config", str(d.hq_config), *args[2:]],
        capture_output=True,
        text=True,
        check=False,
    )


def household(key: str) -> dict[str, Any]:
    record = next(iter(fieldgen.records("beneficiaries", 1, seed=3)))
    return {
        **record,
        "beneficiary_id": key,
        "admin1": "JO01",
        "admin2": "JO01-01",
        "admin3": NEW_CODE,
    }


def test_a_newer_table_from_hq_reaches_the_agent_and_survives_restarts(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    d = deployment
    d.enroll()
    d.start_hq()
    d.start_agent()
    status, body = put(d, household("BEN-7-1"))
    assert status == 422 and "admin3_known" in json.dumps(body)

    newer = tmp_path / "admin3.csv"
    newer.write_text(ADMIN_CODES.read_text() + f"JO01,JO01-01,{NEW_CODE}\n")
    pushed = hq(d, "references", "push", "admin3", str(newer), "--column", "admin3")
    assert pushed.returncode == 0, pushed.stderr
    assert "admin3" in pushed.stdout

    deadline = time.monotonic() + 30
    while (status := put(d, household("BEN-7-1"))[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200, "the agent never took HQ's newer admin3 table"

    # Offline and restarted: the table HQ sent is in the agent's database, and still used.
    d.stop(d.hq_proc)  # type: ignore[arg-type]
    d.stop(d.agent_proc)  # type: ignore[arg-type]
    d.start_agent()
    assert put(d, household("BEN-7-2"))[0] == 200
    # The CLI's checks use it too.
    cli = subprocess.run(
        [
            _bin("fieldsync-agent"),
            "put",
            "--config",
            str(d.agent_config),
            "beneficiaries",
            json.dumps(household("BEN-7-3")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr

    listed = hq(d, "references", "list")
    assert listed.returncode == 0 and "admin3" in listed.stdout


def test_push_refuses_what_the_collections_file_does_not_define(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    d = deployment
    d.start_hq()  # creates HQ's key
    codes = tmp_path / "codes.csv"
    codes.write_text("code\nA\n")
    unknown = hq(d, "references", "push", "admin9", str(codes))
    assert unknown.returncode == 2 and "no reference table 'admin9'" in unknown.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("admin3\n")
    nothing = hq(d, "references", "push", "admin3", str(empty))
    assert nothing.returncode == 2 and "no codes" in nothing.stderr
    missing_column = hq(d, "references", "push", "admin3", str(codes), "--column", "admin3")
    assert missing_column.returncode == 2 and "admin3" in missing_column.stderr
    listed = hq(d, "references", "list")
    assert "no reference tables sent yet" in listed.stdout


def test_table_record_round_trip(tmp_path: Path) -> None:
    table = read_table("admin3", ADMIN_CODES, column="admin3")
    back = table_from_record(json.loads(json.dumps(table_record(table, pushed_by="cli:ops"))))
    assert back.codes == table.codes and back.values is None
    lookup = ReferenceTable("units", frozenset({"kg", 1}), "inline", {"kg": "kilogram", "1": "one"})
    back = table_from_record(table_record(lookup, pushed_by="x"))
    assert back.values == {"kg": "kilogram", "1": "one"} and back.codes == frozenset({"kg", 1})
    for bad in ({"name": ""}, {"name": "t", "codes": "A"}, {"name": "t", "codes": [[1]]}):
        with pytest.raises(ValueError):
            table_from_record(bad)
