"""agent.store.AgentStore and agent.batcher.Batcher on real SQLite files.

What is pinned here: a write lands in records and the outbox together, with contiguous origin
sequences; unchanged writes queue nothing; partial updates carry only the changed fields and the
version the writer saw; deletes are tombstones; concurrent writers share commits yet get distinct
sequences; everything (including the clock) survives a reopen; sealed batches verify, respect the
size limits and the window, and only an ack deletes them; downstream changes merge by LWW.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest
from agent_fixtures import (
    COLLECTION,
    KEY_FIELD,
    beneficiary,
    delete,
    key_of,
    open_store,
    upsert,
)

from agent.batcher import Batcher
from agent.capture.records import parse_ndjson
from agent.store import AgentStore, StoreError, Write
from protocol.change import Change, decode_changes
from protocol.envelope import Kind, open_sealed
from protocol.hlc import pack, physical_ms, system_ms
from protocol.identity import NodeIdentity

DAY_MS = 24 * 3600 * 1000


def outbox_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT seq, collection, key, op, fields, hlc, parent FROM outbox"
        ).fetchall()


def batcher(store: AgentStore, identity: NodeIdentity, **overrides: int) -> Batcher:
    settings = {"max_changes": 1000, "max_bytes": 1_048_576, "window": 4, "zstd_level": 3}
    settings.update(overrides)
    return Batcher(store, identity, **settings)


async def all_unsealed(store: AgentStore) -> list[Change]:
    return await store.unsealed_changes(100_000, 1 << 40)


# ---- writes -----------------------------------------------------------------------------------


async def test_new_records_are_readable_and_queued_with_contiguous_seqs(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        records = [beneficiary(i) for i in range(5)]
        results = await store.write([upsert(r) for r in records])

        assert [r.seq for r in results] == [1, 2, 3, 4, 5]
        assert [r.key for r in results] == [r[KEY_FIELD] for r in records]
        hlcs = [r.hlc for r in results]
        assert all(h is not None for h in hlcs) and hlcs == sorted(set(hlcs))
        for record in records:
            assert await store.get(COLLECTION, record[KEY_FIELD]) == record
        assert await store.list_records(COLLECTION) == records
        assert await store.count(COLLECTION) == 5
        backlog = await store.backlog()
        assert backlog["changes"] == 5 and backlog["batches"] == 0 and backlog["bytes"] > 0

        changes = await all_unsealed(store)
        assert [c.seq for c in changes] == [1, 2, 3, 4, 5]
        assert [c.fields for c in changes] == records
        assert all(c.op == "upsert" and c.parent == 0 and c.origin == "nlocal" for c in changes)
        assert [c.hlc for c in changes] == hlcs
    assert [row[0] for row in outbox_rows(db)] == [1, 2, 3, 4, 5]


async def test_rewriting_identical_values_is_unchanged_and_queues_nothing(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        record = beneficiary(1)
        (first,) = await store.write([upsert(record)])
        (again,) = await store.write([upsert(record)])
        subset = {KEY_FIELD: record[KEY_FIELD], "name": record["name"]}
        (partial_same,) = await store.write([upsert(subset)])

        assert first.seq == 1
        assert again.seq is None and again.hlc is None and again.key == record[KEY_FIELD]
        assert partial_same.seq is None
        assert (await store.backlog())["changes"] == 1
        assert len(await all_unsealed(store)) == 1
        assert int((await store.meta())["next_change_seq"]) == 2


async def test_partial_update_writes_only_changed_fields_with_parent(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        record = beneficiary(1)
        (created,) = await store.write([upsert(record)])
        (updated,) = await store.write(
            [upsert({KEY_FIELD: record[KEY_FIELD], "name": record["name"], "household_size": 9})]
        )
        (added,) = await store.write([upsert({KEY_FIELD: record[KEY_FIELD], "phone": None})])

        _, second, third = await all_unsealed(store)
        assert second.fields == {"household_size": 9}
        assert second.parent == created.hlc and second.hlc == updated.hlc
        assert third.fields == {"phone": None}
        assert third.parent == updated.hlc and third.hlc == added.hlc
        assert await store.get(COLLECTION, record[KEY_FIELD]) == record | {
            "household_size": 9,
            "phone": None,
        }


async def test_delete_is_a_queued_tombstone_and_missing_deletes_are_unchanged(
    tmp_path: Path,
) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        record = beneficiary(1)
        created, _ = await store.write([upsert(record), upsert(beneficiary(2))])
        (deleted,) = await store.write([delete(record[KEY_FIELD])])
        (again,) = await store.write([delete(record[KEY_FIELD])])
        (missing,) = await store.write([delete("never-written")])

        assert deleted.seq == 3 and again.seq is None and missing.seq is None
        assert await store.get(COLLECTION, record[KEY_FIELD]) is None
        assert [r[KEY_FIELD] for r in await store.list_records(COLLECTION)] == ["b00002"]
        assert await store.count(COLLECTION) == 1
        tombstone = (await all_unsealed(store))[-1]
        assert tombstone.op == "delete" and tombstone.fields == {}
        assert tombstone.parent == created.hlc and tombstone.key == record[KEY_FIELD]

        # Re-creating the record starts from the tombstone: old fields do not come back.
        (recreated,) = await store.write([upsert({KEY_FIELD: record[KEY_FIELD], "name": "New"})])
        assert recreated.seq == 4
        assert await store.get(COLLECTION, record[KEY_FIELD]) == {
            KEY_FIELD: record[KEY_FIELD],
            "name": "New",
        }
        assert (await all_unsealed(store))[-1].parent == deleted.hlc
    assert [row[0] for row in outbox_rows(db)] == [1, 2, 3, 4]


async def test_fifty_concurrent_writers_get_distinct_contiguous_seqs(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        results = await asyncio.gather(*(store.write([upsert(beneficiary(i))]) for i in range(50)))
        seqs = sorted(r.seq for (r,) in results if r.seq is not None)
        assert seqs == list(range(1, 51))
        assert len({r.hlc for (r,) in results}) == 50
        assert await store.count(COLLECTION) == 50
        assert (await store.backlog())["changes"] == 50
        # Each caller got its own result back, not a neighbour's.
        assert [r.key for (r,) in results] == [beneficiary(i)[KEY_FIELD] for i in range(50)]


async def test_several_writes_to_one_record_in_one_call(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        results = await store.write(
            [
                upsert(beneficiary(1)),
                upsert({KEY_FIELD: "b00001", "name": "Renamed"}),
                delete("b00001"),
                delete("b00001"),
            ]
        )
        assert [r.seq for r in results] == [1, 2, 3, None]
        assert await store.get(COLLECTION, "b00001") is None
        changes = await all_unsealed(store)
        assert [c.parent for c in changes] == [0, changes[0].hlc, changes[1].hlc]


async def test_everything_survives_a_reopen_and_the_clock_never_goes_back(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        # A clock far ahead (a laptop set a day into the future) issues the last stamps...
        store.clock.offset_ms = DAY_MS
        results = await store.write([upsert(beneficiary(i)) for i in range(3)])
        before = await store.meta()
        backlog = await store.backlog()
        last_hlc = results[-1].hlc
        assert last_hlc is not None and int(before["clock_last"]) == last_hlc

    async with open_store(db) as store:
        meta = await store.meta()
        assert int(meta["next_change_seq"]) == 4
        assert int(meta["clock_last"]) == last_hlc
        assert await store.backlog() == backlog
        assert [c.seq for c in await all_unsealed(store)] == [1, 2, 3]
        for i in range(3):
            assert await store.get(COLLECTION, beneficiary(i)[KEY_FIELD]) == beneficiary(i)
        # ...and after the restart (offset back to 0) new stamps are still above them.
        (new,) = await store.write([upsert(beneficiary(3))])
        assert new.seq == 4
        assert new.hlc is not None and new.hlc > last_hlc
        assert physical_ms(new.hlc) >= physical_ms(last_hlc)


async def test_a_second_store_on_the_same_file_continues_the_sequence(tmp_path: Path) -> None:
    """The CLI writes beside the daemon: both must share one sequence and one clock."""
    db = tmp_path / "agent.db"
    async with open_store(db) as daemon, open_store(db) as cli:
        (a,) = await daemon.write([upsert(beneficiary(1))])
        (b,) = await cli.write([upsert(beneficiary(2))])
        (c,) = await daemon.write([upsert(beneficiary(3))])
        assert [a.seq, b.seq, c.seq] == [1, 2, 3]
        assert a.hlc is not None and b.hlc is not None and c.hlc is not None
        assert a.hlc < b.hlc < c.hlc
    assert [row[0] for row in outbox_rows(db)] == [1, 2, 3]


# ---- reads --------------------------------------------------------------------------------------


async def test_list_filters_by_string_number_and_bool_and_pages_by_key(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        records = [beneficiary(i, active=i % 2 == 0) for i in range(20)]
        records.append({KEY_FIELD: "s1", "household_size": "5"})  # a string, not the number 5
        await store.write([upsert(r) for r in records])

        def keys(found: list[dict[str, Any]]) -> list[str]:
            return [r[KEY_FIELD] for r in found]

        five = [r[KEY_FIELD] for r in records[:20] if r["household_size"] == 5]
        assert five and keys(await store.list_records(COLLECTION, {"household_size": 5})) == five
        assert keys(await store.list_records(COLLECTION, {"household_size": "5"})) == ["s1"]
        village = [r[KEY_FIELD] for r in records[:20] if r["village"] == "Village 1"]
        assert keys(await store.list_records(COLLECTION, {"village": "Village 1"})) == village
        both = [
            r[KEY_FIELD]
            for r in records[:20]
            if r["village"] == "Village 1" and r["household_size"] == 5
        ]
        assert (
            keys(
                await store.list_records(COLLECTION, {"village": "Village 1", "household_size": 5})
            )
            == both
        )
        active = [r[KEY_FIELD] for r in records[:20] if r["active"]]
        assert keys(await store.list_records(COLLECTION, {"active": True})) == active
        assert await store.list_records(COLLECTION, {"village": "Nowhere"}) == []
        assert await store.list_records("distributions") == []

        paged: list[str] = []
        after = None
        while page := await store.list_records(COLLECTION, after=after, limit=6):
            assert len(page) <= 6
            paged += keys(page)
            after = page[-1][KEY_FIELD]
        assert paged == sorted(r[KEY_FIELD] for r in records)


@pytest.mark.parametrize("name", ["bad-name", "1st", 'x") OR 1=1 --', "", "a" * 65])
async def test_list_refuses_invalid_filter_names(tmp_path: Path, name: str) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        await store.write([upsert(beneficiary(1))])
        with pytest.raises(ValueError, match="not a valid field name"):
            await store.list_records(COLLECTION, {name: 1})


# ---- batcher and acks ---------------------------------------------------------------------------


async def test_sealed_batches_verify_respect_the_window_and_acks_release_them(
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.generate()
    db = tmp_path / "agent.db"
    async with open_store(db, identity.node_id) as store:
        await store.write([upsert(beneficiary(i)) for i in range(25)])
        expected = await all_unsealed(store)
        b = batcher(store, identity, max_changes=10, window=2)

        first = await b.seal_next()
        second = await b.seal_next()
        assert first is not None and second is not None
        assert await b.seal_next() is None  # window of 2 is full
        assert (first.seq, first.first, first.last, first.count) == (1, 1, 10, 10)
        assert (second.seq, second.first, second.last, second.count) == (2, 11, 20, 10)
        assert b.sealed.is_set()

        opened = open_sealed(first.sealed, key_of(identity))
        assert opened.kind == Kind.CHANGES
        header = opened.header
        assert (header["node"], header["seq"], header["first"], header["last"]) == (
            identity.node_id,
            1,
            1,
            10,
        )
        assert header["count"] == 10
        assert decode_changes(opened.body) == expected[:10]
        assert decode_changes(open_sealed(second.sealed, key_of(identity)).body) == expected[10:20]
        with pytest.raises(Exception, match="not enrolled"):
            open_sealed(first.sealed, key_of(NodeIdentity.generate()))

        backlog = await store.backlog()
        assert backlog["changes"] == 25 and backlog["batches"] == 2
        assert backlog["batch_bytes"] == len(first.sealed) + len(second.sealed)

        assert await store.mark_acked(1) == 10
        assert await store.mark_acked(1) == 0  # idempotent
        assert (await store.backlog())["changes"] == 15
        assert [row[0] for row in outbox_rows(db)] == list(range(11, 26))

        third = await b.seal_next()
        assert third is not None and (third.seq, third.first, third.last) == (3, 21, 25)
        assert decode_changes(open_sealed(third.sealed, key_of(identity)).body) == expected[20:]
        assert await b.seal_next() is None  # nothing left to seal

        assert await store.mark_acked(3) == 15
        assert await store.mark_acked(2) == 0
        assert await store.backlog() == {"changes": 0, "bytes": 0, "batches": 0, "batch_bytes": 0}
        meta = await store.meta()
        assert int(meta["acked_batch"]) == 3 and int(meta["acked_changes"]) == 25
        assert int(meta["sent_bytes"]) > 0
        # Acks never rewind, and new writes keep their place in the sequence.
        (later,) = await store.write([upsert(beneficiary(99))])
        assert later.seq == 26
        fourth = await b.seal_next()
        assert fourth is not None and (fourth.seq, fourth.first, fourth.last) == (4, 26, 26)


async def test_batches_respect_max_bytes_and_an_oversize_record_goes_alone(
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.generate()
    max_bytes = 2048
    async with open_store(tmp_path / "agent.db", identity.node_id) as store:
        writes = [upsert(beneficiary(i, notes="x" * 500)) for i in range(12)]
        writes.insert(5, upsert(beneficiary(100, notes="y" * 5000)))
        await store.write(writes)
        b = batcher(store, identity, max_bytes=max_bytes, window=64)

        batches = []
        while (batch := await b.seal_next()) is not None:
            batches.append(batch)
        assert len(batches) > 3
        next_first = 1
        for batch in batches:
            assert batch.first == next_first  # no gap, no overlap
            next_first = batch.last + 1
            changes = decode_changes(open_sealed(batch.sealed, key_of(identity)).body)
            size = sum(len(msgpack.packb(c.fields)) + len(c.key) + 24 for c in changes)
            if len(changes) > 1:
                assert size <= max_bytes
            else:
                assert changes[0].key == "b00100" or size <= max_bytes
        assert next_first == 14
        assert any(b.count == 1 and b.first == 6 for b in batches)


async def test_a_sealed_unacked_batch_survives_a_restart_byte_identical(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    db = tmp_path / "agent.db"
    async with open_store(db, identity.node_id) as store:
        await store.write([upsert(beneficiary(i)) for i in range(5)])
        sealed = await batcher(store, identity, max_changes=3).seal_next()
        assert sealed is not None
        # "crash": close without any ack

    async with open_store(db, identity.node_id) as store:
        (resend,) = await store.unacked_batches(10)
        assert resend == sealed
        assert (await store.backlog())["changes"] == 5
        # The restart seals what is left as the *next* batch, never a second batch 1.
        nxt = await batcher(store, identity, max_changes=3).seal_next()
        assert nxt is not None and (nxt.seq, nxt.first, nxt.last) == (2, 4, 5)
        assert [b.seq for b in await store.unacked_batches(10)] == [1, 2]
        assert (await store.unacked_batches(10))[0].sealed == sealed.sealed


# ---- downstream feed ----------------------------------------------------------------------------


def remote(key: str, fields: dict[str, Any], hlc: int, origin: str, seq: int = 1) -> Change:
    return Change(COLLECTION, key, "upsert", fields, hlc, 0, origin, seq)


async def test_apply_feed_merges_last_writer_wins_and_advances_the_cursor(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "agent.db", "nlocal") as store:
        (local,) = await store.write([upsert({KEY_FIELD: "k", "a": 1, "b": 1, "c": 1, "d": 1})])
        h = local.hlc
        assert h is not None
        changes = [
            remote("k", {"a": 2}, h + 1, "hq-other", 1),  # newer: wins
            remote("k", {"b": 2}, h - 1, "zz-other", 2),  # older: loses
            remote("k", {"c": 2}, h, "zz-other", 3),  # tie, higher origin ("zz" > "nlocal"): wins
            remote("k", {"d": 2}, h, "aa-other", 4),  # tie, lower origin: loses
            remote("new", {KEY_FIELD: "new", "x": 1}, h + 2, "hq-other", 5),  # unknown record
            remote("k", {"a": 99}, h + 50, "nlocal", 9),  # an echo of our own: skipped
        ]
        applied = await store.apply_feed(changes, cursor=17)

        assert applied == 2
        assert await store.get(COLLECTION, "k") == {KEY_FIELD: "k", "a": 2, "b": 1, "c": 2, "d": 1}
        assert await store.get(COLLECTION, "new") == {KEY_FIELD: "new", "x": 1}
        assert int((await store.meta())["feed_cursor"]) == 17
        # Remote changes are not queued back to HQ.
        assert (await store.backlog())["changes"] == 1

        # The clock moved past what it saw: a local write after the feed is newer than it.
        (after,) = await store.write([upsert({KEY_FIELD: "k", "a": 3})])
        assert after.hlc is not None and after.hlc > h + 2
        assert (await all_unsealed(store))[-1].parent == h + 1

        # A newer remote delete removes the record; an older remote write cannot revive it.
        tomb = Change(COLLECTION, "k", "delete", {}, after.hlc + 1, 0, "hq-other", 6)
        assert await store.apply_feed([tomb], cursor=18) == 1
        assert await store.get(COLLECTION, "k") is None
        await store.apply_feed([remote("k", {"a": 7}, after.hlc, "zz-other", 7)], cursor=19)
        assert await store.get(COLLECTION, "k") is None
        assert int((await store.meta())["feed_cursor"]) == 19


async def test_a_far_future_remote_stamp_merges_without_dragging_the_clock(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        future = pack(system_ms() + DAY_MS)
        await store.apply_feed([remote("f", {KEY_FIELD: "f", "v": 1}, future, "hq-other")], 1)
        assert await store.get(COLLECTION, "f") == {KEY_FIELD: "f", "v": 1}
        (mine,) = await store.write([upsert(beneficiary(1))])
        assert mine.hlc is not None and mine.hlc < future
        assert int((await store.meta())["clock_last"]) < future


async def test_a_local_write_over_a_far_future_stamp_still_wins(tmp_path: Path) -> None:
    """A record stamped by a laptop whose clock runs a day ahead: editing it here must change it
    (the caller is told it was stored), without pulling this node's clock into the future."""
    async with open_store(tmp_path / "agent.db") as store:
        future = pack(system_ms() + DAY_MS)
        await store.apply_feed([remote("f", {KEY_FIELD: "f", "v": 1}, future, "hq-other")], 1)
        (edit,) = await store.write([upsert({KEY_FIELD: "f", "v": 2})])
        assert edit.seq is not None and edit.hlc is not None and edit.hlc > future
        assert await store.get(COLLECTION, "f") == {KEY_FIELD: "f", "v": 2}
        (other,) = await store.write([upsert(beneficiary(2))])
        assert other.hlc is not None and other.hlc < future  # the clock itself stays true


async def test_feed_merge_and_cursor_survive_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        h = pack(system_ms())
        await store.apply_feed([remote("r", {KEY_FIELD: "r", "v": 1}, h, "hq-other")], 5)
    async with open_store(db) as store:
        assert await store.get(COLLECTION, "r") == {KEY_FIELD: "r", "v": 1}
        assert int((await store.meta())["feed_cursor"]) == 5
        (w,) = await store.write([upsert({KEY_FIELD: "r", "v": 2})])
        assert w.hlc is not None and w.hlc > h
        assert (await all_unsealed(store))[0].parent == h


# ---- failure isolation --------------------------------------------------------------------------


async def test_a_failed_commit_changes_nothing_and_the_store_keeps_working(
    tmp_path: Path,
) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        await store.write([upsert(beneficiary(1))])
        unstorable = Write(COLLECTION, "bad", "upsert", {KEY_FIELD: "bad", "v": {1, 2}})
        with pytest.raises(StoreError, match="commit local writes"):
            await store.write([upsert(beneficiary(2)), unstorable])
        assert await store.get(COLLECTION, beneficiary(2)[KEY_FIELD]) is None
        (ok,) = await store.write([upsert(beneficiary(3))])
        assert ok.seq == 2  # the failed commit consumed no sequence number
    assert [row[0] for row in outbox_rows(db)] == [1, 2]


async def test_a_cancelled_writer_does_not_break_the_next_commit(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    async with open_store(db) as store:
        big = [upsert(beneficiary(i)) for i in range(3000)]
        first = asyncio.create_task(store.write(big))
        # Wait until the first group's transaction is open on the writer connection.
        while not store._writer.in_transaction:
            await asyncio.sleep(0)
        first.cancel()  # e.g. an API client that went away, or shutdown
        with pytest.raises(asyncio.CancelledError):
            await first
        try:
            (other,) = await store.write([upsert(beneficiary(5000))])
        finally:
            await asyncio.sleep(0.5)  # let the shielded commit finish before closing
        assert other.seq is not None
    rows = outbox_rows(db)
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1))


async def test_one_unstorable_record_does_not_fail_its_group_neighbours(tmp_path: Path) -> None:
    deep = b'{"beneficiary_id": "deep", "v": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    async with open_store(tmp_path / "agent.db") as store:
        # parse_ndjson is the capture gate: anything it accepts must be storable.
        try:
            bad = parse_ndjson([deep], COLLECTION, KEY_FIELD)
        except Exception:
            bad = None  # refused at the edge: the intended behaviour
        # Occupy the commit lock so the next two writes are grouped into one commit.
        results = await asyncio.gather(
            store.write([upsert(beneficiary(1))]),
            store.write(bad or [upsert(beneficiary(2))]),
            store.write([upsert(beneficiary(3))]),
            return_exceptions=True,
        )
        assert not isinstance(results[0], BaseException)
        assert not isinstance(results[2], BaseException), f"a good neighbour failed: {results[2]}"
        assert bad is None, "a record the store cannot encode passed validation"
        assert not isinstance(results[1], BaseException)


async def test_a_partial_update_never_revives_a_deleted_record(tmp_path: Path) -> None:
    async with open_store(tmp_path / "agent.db") as store:
        patch = Write(COLLECTION, "p1", "upsert", {"phone": "+254700000001"}, must_exist=True)
        (missing,) = await store.write([patch])
        assert missing.missing and missing.seq is None
        await store.write([upsert(beneficiary(1) | {KEY_FIELD: "p1"})])
        (patched,) = await store.write([patch])
        assert patched.seq is not None and not patched.missing
        await store.write([delete("p1")])
        (after_delete,) = await store.write([patch])
        assert after_delete.missing
        assert await store.get(COLLECTION, "p1") is None
