"""The HQStore contract, exercised on SQLiteHQStore (a PostgreSQL store must pass the same tests)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from hq_fixtures import DAY_MS, FakeWall, make_changes

from hq_server.store import (
    AmbiguousNode,
    EnrollmentRefused,
    IngestStatus,
    NodeNotFound,
    NodeRevoked,
    SQLiteHQStore,
    StoreError,
    token_hash,
)
from protocol.change import Change
from protocol.identity import NodeIdentity
from protocol.merge import RecordState, apply_change


@asynccontextmanager
async def opened(tmp_path: Path, wall: FakeWall | None = None) -> AsyncIterator[SQLiteHQStore]:
    store = SQLiteHQStore(tmp_path / "hq.db", wall=wall or FakeWall())
    async with store:
        yield store


async def enrolled(store: SQLiteHQStore, name: str = "n") -> NodeIdentity:
    identity = NodeIdentity.generate()
    issued = await store.create_token(name, DAY_MS, actor="test")
    await store.enroll(issued.token, identity.public_key)
    return identity


async def test_ingest_is_exactly_once_and_matches_the_merge_rules(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        changes = make_changes(node, 1, 5)
        update = Change(
            "beneficiaries", "b1", "upsert", {"name": "X"}, changes[-1].hlc + 1, 0, node.node_id, 6
        )
        first = await store.ingest(node.node_id, 1, changes)
        second = await store.ingest(node.node_id, 2, [update])
        assert (first.status, second.status) == (IngestStatus.APPLIED, IngestStatus.APPLIED)
        again = await store.ingest(node.node_id, 2, [update])
        assert again.status is IngestStatus.DUPLICATE
        # The stored state is exactly what protocol.merge computes from the same changes.
        expected = RecordState()
        apply_change(expected, changes[1])
        apply_change(expected, update)
        record = await store.get_record("beneficiaries", "b1")
        assert record is not None
        assert record.state == expected
        assert record.version == expected.version
        assert record.updated_seq == 6
        assert await store.changelog_count() == 6


async def test_a_known_batch_number_with_other_bytes_is_refused_as_diverged(
    tmp_path: Path,
) -> None:
    """A resend is byte-identical; other bytes under a known number mean the node's database went
    back in time (a restored backup) -- taking it for a duplicate would ack, and so delete, new
    writes HQ never stored."""
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        changes = make_changes(node, 1, 3)
        assert (await store.ingest(node.node_id, 1, changes, digest=b"A" * 32)).status is (
            IngestStatus.APPLIED
        )
        again = await store.ingest(node.node_id, 1, changes, digest=b"A" * 32)
        assert again.status is IngestStatus.DUPLICATE
        other = await store.ingest(node.node_id, 1, make_changes(node, 1, 3), digest=b"B" * 32)
        assert (other.status, other.acked_through) == (IngestStatus.DIVERGED, 1)
        assert await store.changelog_count() == 3


async def test_ingest_refuses_unknown_and_revoked_nodes(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        with pytest.raises(NodeNotFound):
            await store.ingest("nnope", 1, [])
        await store.revoke_node(node.node_id, actor="test")
        with pytest.raises(NodeRevoked):
            await store.ingest(node.node_id, 1, make_changes(node, 1, 1))
        assert await store.changelog_count() == 0


async def test_duplicate_and_gap_record_contact_and_flags_but_no_data(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        node = await enrolled(store)
        await store.ingest(node.node_id, 1, make_changes(node, 1, 2))
        wall.advance(1000)
        gap = await store.ingest(node.node_id, 5, make_changes(node, 3, 2), flag="clock ahead")
        assert (gap.status, gap.expected) == (IngestStatus.GAP, 2)
        stored = await store.get_node(node.node_id)
        assert stored is not None
        assert (stored.acked_through, stored.last_contact) == (1, wall.now)
        assert stored.flagged_reason == "clock ahead"
        assert await store.changelog_count() == 2


async def test_failed_ingest_rolls_back_everything(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        good = make_changes(node, 1, 3)
        bad = replace(good[2], fields={"x": b"bytes are not JSON"})
        with pytest.raises(StoreError):
            await store.ingest(node.node_id, 1, [good[0], good[1], bad])
        stored = await store.get_node(node.node_id)
        assert stored is not None
        assert stored.acked_through == 0
        assert await store.changelog_count() == 0
        assert await store.count_records("beneficiaries") == 0
        # The writer connection is usable again.
        assert (await store.ingest(node.node_id, 1, good)).status is IngestStatus.APPLIED


async def test_feed_cursor_skips_own_entries_and_honours_byte_budget(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        a = await enrolled(store, "a")
        b = await enrolled(store, "b")
        await store.ingest(b.node_id, 1, make_changes(b, 1, 3, key_prefix="b"))  # 1..3
        await store.ingest(a.node_id, 1, make_changes(a, 1, 3, key_prefix="a"))  # 4..6

        page = await store.feed(a.node_id, 0, 10, max_bytes=10**9)
        assert [c.key for c in page.changes] == ["b0", "b1", "b2"]
        assert (page.cursor, page.more) == (6, False)

        page = await store.feed(a.node_id, 0, 2, max_bytes=10**9)
        assert (len(page.changes), page.cursor, page.more) == (2, 2, True)

        page = await store.feed(a.node_id, 0, 10, max_bytes=1)  # always at least one change
        assert (len(page.changes), page.cursor, page.more) == (1, 1, True)

        page = await store.feed(b.node_id, 6, 10, max_bytes=10**9)
        assert (page.changes, page.cursor, page.more) == ([], 6, False)
        empty = await store.feed(a.node_id, 100, 10, max_bytes=10**9)
        assert (empty.changes, empty.cursor) == ([], 100)


async def test_tokens_are_hashed_one_time_and_expire(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        issued = await store.create_token("field-1", 1000, actor="test")
        assert issued.expires_at == wall.now + 1000
        with sqlite3.connect(store.path) as conn:
            rows = conn.execute("SELECT token_hash FROM tokens").fetchall()
        assert rows == [(token_hash(issued.token),)]
        key = NodeIdentity.generate().public_key
        wall.advance(1000)
        with pytest.raises(EnrollmentRefused) as info:
            await store.enroll(issued.token, key)
        assert info.value.code == "token_expired"
        fresh = await store.create_token("field-1", 1000, actor="test")
        node = await store.enroll(fresh.token, key)
        assert node.name == "field-1"
        with pytest.raises(EnrollmentRefused) as info:
            await store.enroll(fresh.token, NodeIdentity.generate().public_key)
        assert info.value.code == "token_used"
        with pytest.raises(StoreError):
            await store.create_token("", 1000, actor="test")
        with pytest.raises(StoreError):
            await store.create_token("x", 0, actor="test")


async def test_find_and_revoke_nodes(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        a = await enrolled(store, "same")
        b = await enrolled(store, "same")
        c = await enrolled(store, "unique")
        assert (await store.find_node("unique")).node_id == c.node_id
        assert (await store.find_node(a.node_id)).node_id == a.node_id
        with pytest.raises(AmbiguousNode):
            await store.find_node("same")
        with pytest.raises(NodeNotFound):
            await store.find_node("nobody")
        node, changed = await store.revoke_node(a.node_id, actor="cli:ops")
        assert changed
        assert node.revoked_at is not None
        node, changed = await store.revoke_node(a.node_id, actor="cli:ops")
        assert not changed
        # Only one active node keeps the name now.
        assert (await store.find_node("same")).node_id == b.node_id
        with pytest.raises(NodeNotFound):
            await store.revoke_node("nnope", actor="cli:ops")
        revokes = [e for e in await store.audit_log() if e.action == "node.revoke"]
        assert [(e.actor, e.detail["node_id"]) for e in revokes] == [("cli:ops", a.node_id)]


async def test_audit_log_is_hash_chained_and_append_only(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await enrolled(store)
        assert await store.verify_audit() is None
        with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.DatabaseError):
            conn.execute("UPDATE audit SET actor = 'someone else'")
        with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.DatabaseError):
            conn.execute("DELETE FROM audit")
        with sqlite3.connect(store.path) as conn:
            conn.execute("DROP TRIGGER audit_no_update")
            conn.execute("UPDATE audit SET actor = 'someone else' WHERE id = 1")
        assert await store.verify_audit() == 1


async def test_records_listing_paging_and_counts(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        changes = make_changes(node, 1, 5)
        delete = Change(
            "beneficiaries", "b0", "delete", {}, changes[-1].hlc + 1, 0, node.node_id, 6
        )
        await store.ingest(node.node_id, 1, [*changes, delete])
        assert await store.count_records("beneficiaries") == 4
        assert await store.count_records("beneficiaries", deleted=True) == 5
        page = await store.list_records("beneficiaries", limit=2)
        assert [r.key for r in page] == ["b1", "b2"]
        page = await store.list_records("beneficiaries", after_key="b2", limit=10)
        assert [r.key for r in page] == ["b3", "b4"]
        everything = await store.list_records("beneficiaries", deleted=True)
        assert (everything[0].key, everything[0].deleted) == ("b0", True)
        assert await store.get_record("beneficiaries", "missing") is None
        assert await store.count_records("nothing") == 0


async def test_open_refuses_a_missing_database_when_asked_not_to_create(tmp_path: Path) -> None:
    store = SQLiteHQStore(tmp_path / "nowhere" / "hq.db", create=False)
    with pytest.raises(StoreError, match="no HQ database"):
        await store.open()
    assert not (tmp_path / "nowhere").exists()


async def test_database_is_private_and_reopens(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await enrolled(store)
        await store.set_meta("k", "v")
    assert (tmp_path / "hq.db").stat().st_mode & 0o077 == 0
    async with opened(tmp_path) as store:
        assert await store.get_meta("k") == "v"
        assert len(await store.list_nodes()) == 1
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    async with opened(tmp_path):
        pass
    with sqlite3.connect(tmp_path / "hq.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        async with opened(tmp_path):
            pass


async def test_cancelled_writes_leave_the_store_usable(tmp_path: Path) -> None:
    """aiosqlite finishes a call whose awaiter was cancelled; the store must not stay mid-txn."""
    async with opened(tmp_path) as store:
        node = await enrolled(store)
        for delay_steps in range(12):
            task = asyncio.ensure_future(store.ingest(node.node_id, 1, make_changes(node, 1, 50)))
            for _ in range(delay_steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stored = await store.get_node(node.node_id)
            assert stored is not None
            if stored.acked_through == 1:  # the commit won the race: all of it, exactly once
                assert await store.changelog_count() == 50
                break
            assert await store.changelog_count() == 0
        result = await store.ingest(node.node_id, 1, make_changes(node, 1, 50))
        assert result.acked_through == 1
        assert await store.changelog_count() == 50
