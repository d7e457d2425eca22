"""agent.db's versioned schema (agent/migrations.py): an old database is upgraded without losing
a queue, and then syncs everything exactly once to a real HQ.

tests/fixtures/agent-v1.db was made with the code of before schema versions
(tests/fixtures/make_agent_v1.py): 40 unsent changes (30 sealed in batches 1-2, 10 unsealed), an
open review conflict and an error queue entry, signed with tests/fixtures/agent-v1.node.key.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent import migrations
from agent.demo import LocalDeployment
from agent.migrations import LATEST, MIGRATIONS, Migration
from agent.store import AgentStore, StoreError, Write
from protocol.collections import load_collections
from protocol.identity import NodeIdentity
from protocol.merge import field_policies

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_DB = FIXTURES / "agent-v1.db"
V1_KEY = FIXTURES / "agent-v1.node.key"
V1_COLLECTIONS = FIXTURES / "agent-v1-collections.toml"
POLICIES = field_policies(load_collections(V1_COLLECTIONS))


def _queues(db_path: Path) -> dict[str, object]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return {
            "version": db.execute("PRAGMA user_version").fetchone()[0],
            "outbox": db.execute("SELECT count(*), min(seq), max(seq) FROM outbox").fetchone(),
            "batches": db.execute("SELECT seq, first, last FROM batches ORDER BY seq").fetchall(),
            "errors": db.execute("SELECT key, status FROM error_queue").fetchall(),
            "conflicts": db.execute("SELECT * FROM conflicts").fetchall(),
            "meta": dict(db.execute("SELECT k, v FROM meta").fetchall()),
        }


def _copy_fixture(to: Path) -> tuple[Path, NodeIdentity]:
    to.mkdir(parents=True, exist_ok=True)
    db = to / "agent.db"
    shutil.copyfile(V1_DB, db)
    key = to / "node.key"
    shutil.copyfile(V1_KEY, key)
    key.chmod(0o600)
    return db, NodeIdentity.load(key)


def test_fixture_is_the_old_unversioned_schema() -> None:
    old = _queues(V1_DB)
    assert old["version"] == 0
    assert old["outbox"] == (40, 1, 40)
    assert old["batches"] == [(1, 1, 15), (2, 16, 30)]
    assert old["errors"] == [("H999", "open")]
    assert old["conflicts"] == [("households", "H001", "size")]


async def test_old_database_is_migrated_keeping_every_queue(tmp_path: Path) -> None:
    db, identity = _copy_fixture(tmp_path)
    before = _queues(db)
    store = await AgentStore.open(db, identity.node_id, POLICIES)
    try:
        assert [c[:3] for c in await store.open_conflicts()] == [("households", "H001", "size")]
        assert [e.key for e in await store.queued_errors()] == ["H999"]
        assert (await store.backlog())["changes"] == 40
        (result,) = await store.write(
            [store_write("H100", {"household_id": "H100", "head": "New", "size": 2})]
        )
        assert result.seq == 41  # the sequence continues
    finally:
        await store.close()
    after = _queues(db)
    assert after["version"] == LATEST
    assert after["batches"] == before["batches"]
    assert after["errors"] == before["errors"]
    assert after["conflicts"] == before["conflicts"]
    old_meta, new_meta = before["meta"], after["meta"]
    assert isinstance(old_meta, dict) and isinstance(new_meta, dict)
    for name in ("next_batch_seq", "sealed_through", "acked_batch", "feed_cursor"):
        assert new_meta[name] == old_meta[name], name
    assert new_meta["next_change_seq"] == 42
    assert {"hq_refusal", "recovery_count", "last_recovery"} <= set(new_meta)


def store_write(key: str, fields: dict[str, object]) -> Write:
    return Write("households", key, "upsert", dict(fields))


async def test_fresh_database_starts_at_the_latest_version(tmp_path: Path) -> None:
    store = await AgentStore.open(tmp_path / "agent.db", "nfresh")
    await store.close()
    assert _queues(tmp_path / "agent.db")["version"] == LATEST
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1))


async def test_database_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    db, identity = _copy_fixture(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST + 5}")
        conn.commit()
    with pytest.raises(StoreError, match=r"newer than this agent knows.*upgrade fieldsync-agent"):
        await AgentStore.open(db, identity.node_id)


def _extra_step(body: Callable[[object], Awaitable[None]]) -> tuple[Migration, ...]:
    async def apply(db: object) -> None:
        await body(db)

    return (*MIGRATIONS, Migration(LATEST + 1, "test step", apply))  # type: ignore[arg-type]


async def test_a_step_that_would_drop_a_queue_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, identity = _copy_fixture(tmp_path)

    async def careless(conn: object) -> None:
        await conn.execute("DELETE FROM outbox WHERE seq > 35")  # type: ignore[attr-defined]

    steps = _extra_step(careless)
    monkeypatch.setattr(migrations, "MIGRATIONS", steps)
    monkeypatch.setattr(migrations, "LATEST", steps[-1].version)
    with pytest.raises(StoreError, match=r"migration 3 \(test step\) would drop queued rows"):
        await AgentStore.open(db, identity.node_id)
    state = _queues(db)
    assert state["version"] == LATEST  # the earlier steps committed, the bad one did not
    assert state["outbox"] == (40, 1, 40)


async def test_a_step_killed_midway_leaves_the_old_version_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, identity = _copy_fixture(tmp_path)
    calls: list[int] = []

    async def flaky(conn: object) -> None:
        calls.append(1)
        await conn.execute("CREATE TABLE extra (x)")  # type: ignore[attr-defined]
        if len(calls) == 1:
            raise OSError("killed")  # what a crash mid-step leaves: an open transaction

    steps = _extra_step(flaky)
    monkeypatch.setattr(migrations, "MIGRATIONS", steps)
    monkeypatch.setattr(migrations, "LATEST", steps[-1].version)
    with pytest.raises(OSError, match="killed"):
        await AgentStore.open(db, identity.node_id)
    assert _queues(db)["version"] == LATEST
    store = await AgentStore.open(db, identity.node_id)
    await store.close()
    assert _queues(db)["version"] == LATEST + 1 and len(calls) == 2


def test_migrated_fixture_syncs_everything_exactly_once_to_a_real_hq(tmp_path: Path) -> None:
    collections = {"collections_file": str(V1_COLLECTIONS)}
    d = LocalDeployment(
        tmp_path,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "pull_interval_s": 0.2},
        hq_settings=collections,
        agent_settings=collections,
    )
    db, identity = _copy_fixture(tmp_path / "agent")
    try:
        d.enroll()  # `init` finds the fixture's key; the node enrols with it
        d.start_hq()
        d.start_agent()
        state = d.wait_drained(timeout_s=60)
        assert state["sealed_batches_waiting"] == 0 and state["acked_changes"] == 40
    finally:
        d.shutdown()
    with contextlib.closing(sqlite3.connect(tmp_path / "hq" / "hq.db")) as hq:
        seqs = [
            s
            for (s,) in hq.execute(
                "SELECT origin_seq FROM changelog WHERE origin = ? ORDER BY origin_seq",
                (identity.node_id,),
            )
        ]
        at_hq = dict(hq.execute("SELECT key, data FROM records WHERE collection = 'households'"))
    assert seqs == list(range(1, 41)), "a change was lost or applied twice"
    with contextlib.closing(sqlite3.connect(db)) as agent:
        local = dict(agent.execute("SELECT key, data FROM records WHERE alive"))
        assert agent.execute("SELECT count(*) FROM error_queue").fetchone()[0] == 1
        assert agent.execute("SELECT count(*) FROM conflicts").fetchone()[0] == 1
    live = {k: json.loads(v) for k, v in at_hq.items() if json.loads(v)}  # H002 was deleted
    mine = {k: json.loads(v) for k, v in local.items()}
    assert set(live) == set(mine) and "H002" not in live
    # H001.size is in review here (the other node's 6 never reached HQ); the rest agrees.
    assert all(live[k] == mine[k] for k in mine if k != "H001")
    assert live["H001"]["size"] == 5
