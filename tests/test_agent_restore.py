"""Defect 2 of issue 9, agent side: agent.db restored from a backup.

After a restore the agent reuses batch and change sequence numbers (and HLC stamps) HQ already
holds from it with other content. HQ refuses such a batch with 409 "diverged" and its marks
(hq_acked_through, hq_change_seq, hq_max_hlc); the agent keeps the changes, shows the refusal, and
recovers by itself: unsent changes renumbered and restamped above HQ's marks, in one transaction.

`RestoreAwareHQ` is a stand-in for HQ's batch endpoint written to that contract, for the unit
tests only; the end-to-end test at the bottom runs the real HQ and agent processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from agent_fixtures import COLLECTION, base_url, beneficiary, sealed_feed, serve, upsert
from aiohttp import web

from agent.backoff import Backoff
from agent.batcher import Batcher
from agent.demo import LocalDeployment
from agent.enrolment import Enrolment
from agent.forwarder import Forwarder
from agent.hqclient import HQClient
from agent.status import read_status
from agent.store import AgentStore, HQMarks
from protocol.change import Change, decode_changes
from protocol.envelope import Codec, Kind, open_sealed, seal
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity
from protocol.transport import BATCHES_PATH, CHANGES_PATH, SEALED_CONTENT_TYPE, ack_body


def _digest(change: Change) -> bytes:
    return hashlib.sha256(
        msgpack.packb([change.collection, change.key, change.op, change.fields, change.hlc])
    ).digest()


@dataclass
class RestoreAwareHQ:
    """HQ's batch contract for one node, with the 409 "diverged" answer of issue 9."""

    agent: NodeIdentity
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate)
    acked_through: int = 0
    batches: dict[int, bytes] = field(default_factory=dict)  # seq -> digest of its changes
    changes: dict[int, Change] = field(default_factory=dict)  # origin seq -> change
    refusals: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(BATCHES_PATH, self._batches)
        app.router.add_get(CHANGES_PATH, self._feed)
        return app

    def _diverged(self, seq: int, header: dict[str, Any]) -> web.Response:
        self.refusals += 1
        body = {
            "error": "diverged",
            "message": f"batch {seq} reuses sequence numbers HQ holds with other content",
            "node": self.agent.node_id,
            "batch": seq,
            "seqs": [header["first"], header["last"]],
            "hq_acked_through": self.acked_through,
            "hq_change_seq": max(self.changes, default=0),
            "hq_max_hlc": max((c.hlc for c in self.changes.values()), default=0),
        }
        return web.json_response(body, status=409)

    async def _batches(self, request: web.Request) -> web.Response:
        opened = open_sealed(await request.read(), lambda n: self.agent.public_key)
        header = opened.header
        seq = header["seq"]
        changes = decode_changes(opened.body)
        digest = hashlib.sha256(b"".join(_digest(c) for c in changes)).digest()
        if seq <= self.acked_through:
            if self.batches[seq] != digest:
                return self._diverged(seq, header)
        elif seq != self.acked_through + 1:
            return web.json_response({"error": "gap", "expected": self.acked_through + 1}, 409)
        else:
            if any(
                c.seq in self.changes and _digest(self.changes[c.seq]) != _digest(c)
                for c in changes
            ):
                return self._diverged(seq, header)
            for c in changes:
                self.changes[c.seq] = c
            self.batches[seq] = digest
            self.acked_through = seq
        ack = seal(
            self.identity,
            Kind.ACK,
            ack_body(self.agent.node_id, self.acked_through, system_ms()),
            time=pack(system_ms()),
            codec=Codec.NONE,
        )
        return web.Response(body=ack, content_type=SEALED_CONTENT_TYPE)

    async def _feed(self, request: web.Request) -> web.Response:
        feed = sealed_feed(self.identity, [], int(request.query["cursor"]))
        return web.Response(body=feed, content_type=SEALED_CONTENT_TYPE)

    def records(self) -> dict[str, dict[str, Any]]:
        """Each key's fields by last-writer-wins over the changes held (all upserts here)."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for c in self.changes.values():
            held = out.get(c.key)
            if held is None or held[0] < c.hlc:
                out[c.key] = (c.hlc, c.fields)
        return {k: v for k, (_, v) in out.items()}


def _backup(store_path: Path, to: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(store_path)) as src,
        contextlib.closing(sqlite3.connect(to)) as dst,
    ):
        src.backup(dst)


def _restore(backup: Path, store_path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(store_path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, store_path)


async def _sync(store: AgentStore, identity: NodeIdentity, hq: RestoreAwareHQ, url: str) -> None:
    batcher = Batcher(store, identity, max_changes=10, max_bytes=1 << 20, window=4, zstd_level=3)
    async with HQClient(hq_enrolment(hq, url), identity) as client:
        forwarder = Forwarder(
            store,
            client,
            batcher,
            backoff=Backoff(0.01, 0.05),
            pull_interval_s=0.05,
            feed_page_size=100,
        )
        await forwarder.sync_once()


def hq_enrolment(hq: RestoreAwareHQ, url: str) -> Enrolment:
    return Enrolment(url, hq.agent.node_id, hq.identity.node_id, hq.identity.public_key)


async def test_restored_agent_recovers_and_hq_holds_every_change_once(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    hq = RestoreAwareHQ(identity)
    db = tmp_path / "agent.db"
    async with serve(hq.app()) as server:
        url = base_url(server)
        store = await AgentStore.open(db, identity.node_id)
        await store.write([upsert(beneficiary(i)) for i in range(20)])
        await _sync(store, identity, hq, url)
        await store.write([upsert(beneficiary(i)) for i in range(20, 25)])  # queued at backup
        _backup(db, tmp_path / "backup.db")
        for round_ in range(5):  # 5 more batches reach HQ, then the disk is lost
            await store.write([upsert(beneficiary(100 + 10 * round_ + i)) for i in range(10)])
            await _sync(store, identity, hq, url)
        assert hq.acked_through >= 7
        await store.close()
        _restore(tmp_path / "backup.db", db)

        store = await AgentStore.open(db, identity.node_id)
        try:
            new = [beneficiary(1000 + i, village="after restore") for i in range(100)]
            await store.write([upsert(r) for r in new])
            await _sync(store, identity, hq, url)
            state = await read_status(store)
            assert (await store.backlog())["changes"] == 0, state
            assert hq.refusals >= 1
            assert state["restore_recoveries"] == 1
            assert "restored database detected" in state["last_recovery"]
            assert state["last_recovery_detail"]["already_at_hq"] == 5
            assert not state["warnings"]  # the refusal was settled by the recovery
        finally:
            await store.close()
    written = [beneficiary(i) for i in range(25)]
    written += [beneficiary(100 + i) for i in range(50)] + new
    at_hq = hq.records()
    assert at_hq == {r["beneficiary_id"]: r for r in written}
    seqs = sorted(hq.changes)
    assert seqs == list(range(1, len(written) + 1)), "a change was lost or applied twice"


async def test_recovery_renumbers_restamps_and_is_idempotent(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    store = await AgentStore.open(tmp_path / "agent.db", identity.node_id)
    try:
        await store.write([upsert(beneficiary(i)) for i in range(4)])  # seqs 1..4
        batcher = Batcher(store, identity, max_changes=2, max_bytes=1 << 20, window=4, zstd_level=3)
        await batcher.seal_next()  # batch 1: 1..2, never acked
        await store.write([upsert(beneficiary(1, name="edited"))])  # seq 5, parent = seq 2's hlc
        stamps = [c.hlc for c in (await _outbox(tmp_path / "agent.db"))]
        # HQ holds changes 1..50 from this node, its newest stamped before anything queued here:
        # every queued change was written after the restore (new content under reused numbers).
        marks = HQMarks(acked_through=9, change_seq=50, max_hlc=min(stamps) - 1)
        recovery = await store.recover_from_restore(marks)
        assert recovery is not None
        assert (recovery.dropped_batches, recovery.renumbered, recovery.first_seq) == (1, 5, 51)
        assert recovery.already_at_hq == 0
        assert await store.unacked_batches(10) == []
        meta = await store.meta()
        assert (meta["next_change_seq"], meta["next_batch_seq"], meta["sealed_through"]) == (
            56,
            10,
            50,
        )
        changes = await store.unsealed_changes(100, 1 << 20)
        assert [c.seq for c in changes] == list(range(51, 56))
        hlcs = [c.hlc for c in changes]
        assert hlcs == sorted(hlcs) and hlcs[0] > marks.max_hlc
        edit = changes[-1]
        first_write = next(c for c in changes if c.key == edit.key)
        assert edit.parent == first_write.hlc  # the edit still names the write it saw
        with contextlib.closing(sqlite3.connect(tmp_path / "agent.db")) as db:
            (stamps,) = db.execute(
                "SELECT stamps FROM records WHERE key = ?", (edit.key,)
            ).fetchone()
        assert msgpack.unpackb(stamps)[0][0] == edit.hlc  # local stamps follow the change
        assert store.clock.last >= hlcs[-1]
        assert await store.recover_from_restore(marks) is None  # idempotent
    finally:
        await store.close()


async def _outbox(db_path: Path) -> list[Change]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT seq, key, hlc, parent FROM outbox ORDER BY seq").fetchall()
    return [Change(COLLECTION, k, "upsert", {}, h, p, "", s) for s, k, h, p in rows]


async def test_changes_hq_already_holds_are_forgotten_not_sent_twice(tmp_path: Path) -> None:
    """Queued at backup time and sent by the undone timeline: same seq, stamped before HQ's
    newest stamp. Renumbered they would be applied twice; they are counted as delivered."""
    identity = NodeIdentity.generate()
    store = await AgentStore.open(tmp_path / "agent.db", identity.node_id)
    try:
        await store.write([upsert(beneficiary(i)) for i in range(3)])  # seqs 1..3 (in backup)
        held = await _outbox(tmp_path / "agent.db")
        marks = HQMarks(acked_through=4, change_seq=20, max_hlc=held[-1].hlc + 1000)
        store.clock.observe(marks.max_hlc + 10)  # the restore happened later in real time
        await store.write([upsert(beneficiary(9))])  # seq 4, written after the restore
        recovery = await store.recover_from_restore(marks)
        assert recovery is not None and recovery.already_at_hq == 3 and recovery.renumbered == 1
        (left,) = await _outbox(tmp_path / "agent.db")
        assert (left.seq, left.key) == (21, "b00009") and left.hlc > marks.max_hlc
        assert int((await store.meta())["acked_changes"]) == 3
    finally:
        await store.close()


async def test_unexplained_divergence_is_shown_and_not_retried_in_a_loop(tmp_path: Path) -> None:
    """HQ says diverged, but this node is already above HQ's marks: nothing is renumbered or
    deleted, the refusal shows in status and the sync fails (backoff) instead of looping."""
    identity = NodeIdentity.generate()
    hq = RestoreAwareHQ(identity)
    store = await AgentStore.open(tmp_path / "agent.db", identity.node_id)
    try:
        await store.write([upsert(beneficiary(1))])

        async def always_diverged(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response(
                {
                    "error": "diverged",
                    "message": "other content",
                    "node": identity.node_id,
                    "batch": 1,
                    "seqs": [1, 1],
                    "hq_acked_through": 0,
                    "hq_change_seq": 0,
                    "hq_max_hlc": 0,
                },
                status=409,
            )

        app = web.Application()
        app.router.add_post(BATCHES_PATH, always_diverged)
        app.router.add_get(CHANGES_PATH, hq._feed)
        async with serve(app) as server:
            batcher = Batcher(
                store, identity, max_changes=10, max_bytes=1 << 20, window=4, zstd_level=3
            )
            async with HQClient(hq_enrolment(hq, base_url(server)), identity) as client:
                forwarder = Forwarder(
                    store,
                    client,
                    batcher,
                    backoff=Backoff(0.01, 0.05),
                    pull_interval_s=0.05,
                    feed_page_size=100,
                )
                try:
                    await asyncio.wait_for(forwarder.sync_once(), 10)
                except Exception as e:
                    error = str(e)
                else:
                    raise AssertionError("an unexplained divergence was accepted")
        assert "renumbering cannot help" in error
        state = await read_status(store)
        assert any("as diverged" in w for w in state["warnings"])
        assert (await store.backlog())["changes"] == 1  # kept
    finally:
        await store.close()


# ---- end to end: real HQ and agent processes -----------------------------------------------------


def _call(d: LocalDeployment, method: str, path: str, body: bytes | None = None) -> Any:
    headers = {"Content-Type": "application/x-ndjson"}
    token = d.root / "agent" / "api-token"
    if token.exists():
        headers["Authorization"] = "Bearer " + token.read_text().strip()
    request = urllib.request.Request(
        f"http://127.0.0.1:{d.api_port}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from e


def _bulk(d: LocalDeployment, records: list[dict[str, Any]]) -> None:
    body = b"\n".join(json.dumps(r).encode() for r in records)
    answer = _call(d, "POST", f"/v1/collections/{COLLECTION}/bulk", body)
    assert answer["accepted"] == len(records), answer


def _drained(d: LocalDeployment, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (state := _call(d, "GET", "/v1/status"))["backlog_changes"]:
        assert time.monotonic() < deadline, f"backlog did not drain: {state}"
        time.sleep(0.05)
    return dict(state)


def test_restore_from_backup_end_to_end_with_real_hq(tmp_path: Path) -> None:
    """The issue's acceptance test: back up agent.db, sync 5 more batches, restore the backup,
    write 100 new records: HQ holds every record exactly once and status says what happened."""
    d = LocalDeployment(
        tmp_path, sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "pull_interval_s": 0.1}
    )
    db = tmp_path / "agent" / "agent.db"
    written = {}
    try:
        d.enroll()
        d.start_hq()
        d.start_agent()
        first = [beneficiary(i) for i in range(50)]
        _bulk(d, first)
        _drained(d)
        assert d.agent_proc is not None
        d.stop(d.agent_proc)
        shutil.copyfile(db, tmp_path / "backup.db")  # a backup taken while the agent is stopped
        d.start_agent()
        later = []
        for round_ in range(5):
            batch = [beneficiary(100 + 10 * round_ + i, village="lost") for i in range(10)]
            _bulk(d, batch)
            _drained(d)
            later += batch
        assert d.agent_proc is not None
        d.stop(d.agent_proc)
        _restore(tmp_path / "backup.db", db)
        d.start_agent()
        new = [beneficiary(1000 + i, village="after restore") for i in range(100)]
        _bulk(d, new)
        state = _drained(d, timeout_s=90)
        written = {r["beneficiary_id"]: r for r in first + later + new}
        assert state["restore_recoveries"] == 1, state
        assert "restored database detected" in state["last_recovery"]
    finally:
        d.shutdown()
    with contextlib.closing(sqlite3.connect(tmp_path / "hq" / "hq.db")) as hq:
        rows = hq.execute("SELECT key, data FROM records WHERE collection = ?", (COLLECTION,))
        at_hq = {k: json.loads(v) for k, v in rows}
        count, distinct = hq.execute(
            "SELECT count(*), count(DISTINCT origin || ':' || origin_seq) FROM changelog"
        ).fetchone()
    assert at_hq == written
    assert count == distinct == len(written), "a change was applied twice or lost"
