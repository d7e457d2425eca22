"""End to end with real processes: nothing lost, nothing duplicated, through SIGKILLs on both sides.

20,000 records are written to the agent while HQ is down; HQ starts; the agent is SIGKILLed twice
mid-sync and HQ once; at the end HQ must hold exactly the 20,000 records (every key and value
compared with what was written), the agent's backlog must be zero and HQ's change log must hold every
change id exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import fieldgen
from agent.demo import LocalDeployment

KEYS = {"beneficiaries": fieldgen.BENEFICIARY_KEY, "distributions": fieldgen.DISTRIBUTION_KEY}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    d = LocalDeployment(
        tmp_path,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "batch_max_changes": 250},
    )
    try:
        yield d
    finally:
        d.shutdown()


def _write(d: LocalDeployment, per_collection: int, chunk: int = 1000) -> dict[str, dict[str, Any]]:
    """Write generated records through the local API; returns what was written, by collection."""
    written: dict[str, dict[str, Any]] = {}
    for collection, key in KEYS.items():
        records = list(fieldgen.records(collection, per_collection, seed=7))
        for i in range(0, len(records), chunk):
            body = b"\n".join(json.dumps(r).encode() for r in records[i : i + chunk])
            answer = d.api("POST", f"/v1/collections/{collection}/bulk", body)
            assert answer["accepted"] == len(records[i : i + chunk])
        written[collection] = {r[key]: r for r in records}
    return written


def _wait_for(d: LocalDeployment, acked_at_least: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        acked = int(d.status()["acked_changes"])
        if acked >= acked_at_least:
            return acked
        time.sleep(0.01)
    raise AssertionError(f"sync made no progress past {acked_at_least} in {timeout_s} s")


def _hq_db(d: LocalDeployment) -> sqlite3.Connection:
    return sqlite3.connect(d.root / "hq" / "hq.db")


def check_hq_holds_exactly(d: LocalDeployment, written: dict[str, dict[str, Any]]) -> None:
    """The history checker: every record at HQ, value for value, and every change exactly once."""
    with _hq_db(d) as db:
        for collection, records in written.items():
            rows = db.execute(
                "SELECT key, data FROM records WHERE collection = ?", (collection,)
            ).fetchall()
            at_hq = {key: json.loads(data) for key, data in rows}
            assert set(at_hq) == set(records), f"{collection}: keys differ"
            mismatched = [k for k, r in records.items() if at_hq[k] != r]
            assert not mismatched, f"{collection}: values differ for {mismatched[:5]}"
        total = sum(len(r) for r in written.values())
        count, distinct, low, high = db.execute(
            "SELECT count(*), count(DISTINCT origin || ':' || origin_seq),"
            " min(origin_seq), max(origin_seq) FROM changelog"
        ).fetchone()
    assert count == distinct == total, "a change was applied twice or lost"
    assert (low, high) == (1, total), "change sequences are not exactly 1..N"


def test_sync_survives_agent_and_hq_kills(deployment: LocalDeployment) -> None:
    d = deployment
    d.enroll()
    d.start_agent()
    written = _write(d, 10_000)
    assert d.status()["backlog_changes"] == 20_000

    d.start_hq()
    _wait_for(d, 1_000)
    assert d.agent_proc is not None
    d.kill(d.agent_proc)  # agent killed mid-sync, first time
    d.start_agent()
    _wait_for(d, 6_000)
    assert d.hq_proc is not None
    d.kill(d.hq_proc)  # HQ killed mid-sync
    time.sleep(0.3)  # the agent fails a push or two and backs off
    d.start_hq()
    _wait_for(d, 12_000)
    assert d.agent_proc is not None
    d.kill(d.agent_proc)  # agent killed mid-sync, second time
    d.start_agent()

    state = d.wait_drained(timeout_s=120)
    assert state["backlog_changes"] == 0
    assert state["sealed_batches_waiting"] == 0
    check_hq_holds_exactly(d, written)


@pytest.mark.slow
def test_sync_survives_repeated_kills_soak(deployment: LocalDeployment) -> None:
    """Soak version: 100,000 records, the agent killed every ~8,000 acked changes, HQ every third."""
    d = deployment
    d.enroll()
    d.start_agent()
    written = _write(d, 50_000)
    d.start_hq()
    for round_number, mark in enumerate(range(8_000, 100_000, 8_000)):
        try:
            _wait_for(d, mark, timeout_s=120)
        except AssertionError:
            break
        target = d.hq_proc if round_number % 3 == 2 else d.agent_proc
        assert target is not None
        restart = d.start_hq if target is d.hq_proc else d.start_agent
        d.kill(target)
        restart()
    d.wait_drained(timeout_s=300)
    check_hq_holds_exactly(d, written)
