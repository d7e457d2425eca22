"""The agent's local store: records, outbox and sealed batches in one SQLite file (WAL).

Every accepted write lands in `records` and `outbox` in one transaction, committed with
`synchronous=FULL` before the caller hears "accepted": an acknowledged write survives a crash or a
power cut. Concurrent writers share one transaction and one fsync (group commit): whoever holds the
commit lock takes every write queued so far.

The outbox is the queue to HQ. The batcher seals outbox rows into numbered batches (kept verbatim,
so a resend is byte-identical) and only HQ's signed ack deletes them. Rows are streamed in bounded
pages, so memory stays flat however large the backlog grows.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite
import msgpack
import orjson

from agent.migrations import MigrationError, migrate
from protocol.change import OPS, Change, Op
from protocol.hlc import HybridClock, physical_ms, system_ms
from protocol.merge import (
    NO_POLICIES,
    NO_STAMP,
    FieldPolicies,
    Head,
    RecordState,
    apply_change,
    may_write,
)

T = TypeVar("T")
log = logging.getLogger("fieldsync.agent.store")

IN_CHUNK = 500
_NONE = object()  # "no such field", distinct from a field holding null
# SQLite's page cache per connection, in KiB. The default (~8 MB each) would be a tenth of the
# agent's memory budget on a small laptop; the workload is append-mostly, so a small cache costs
# little (measured: ingest and sync rates unchanged within noise).
WRITER_CACHE_KIB = 2048
READER_CACHE_KIB = 1024
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Below this many free bytes the data folder's disk counts as full even when no write has failed
# yet (what `status` says from another process); below LOW_DISK_BYTES status warns.
FULL_DISK_BYTES = 64 * 1024
LOW_DISK_BYTES = 16 * 1024 * 1024


class StoreError(Exception):
    """A store operation failed; the message names the step."""


class DiskFull(StoreError):
    """The data folder's disk is full: nothing was stored (SQLite rolled back). The local API
    answers writes with 507 and this message; reads, status and forwarding go on, and writes are
    accepted again by themselves once space returns. `data_dir` and `free_bytes` say where and how
    much is left, so the message can name them."""

    def __init__(self, message: str, *, data_dir: str, free_bytes: int) -> None:
        super().__init__(message)
        self.data_dir = data_dir
        self.free_bytes = free_bytes

    @classmethod
    def at(cls, data_dir: Path) -> DiskFull:
        free = free_bytes(data_dir)
        return cls(
            f"disk full: the agent's data folder {data_dir} has {free} bytes free, so nothing "
            "was stored; free some space on that disk (writes are accepted again by themselves "
            "once there is room; queued changes are kept and still forwarded)",
            data_dir=str(data_dir),
            free_bytes=free,
        )


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `folder`."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return int(st.f_bavail * st.f_frsize)


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """True for SQLite's SQLITE_FULL, an ENOSPC/EDQUOT OSError, or an SQLite I/O error while the
    disk has (next to) no space left (SQLite reports some ENOSPC cases as I/O errors)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, sqlite3.Error):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_FULL or "database or disk is full" in str(error):
        return True
    return primary == sqlite3.SQLITE_IOERR and free_bytes(folder) < FULL_DISK_BYTES


@dataclass(frozen=True, slots=True)
class SummaryUpdate:
    """What a write adds to one summary record: `apply(held)` gives every field of the summary
    record from what it holds now (None: it does not exist yet)."""

    collection: str
    key: str
    apply: Callable[[dict[str, Any] | None], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Planned:
    """What the edge pipeline decided for one write, inside its transaction (agent.capture.edge).

    `fields` replace the write's fields (the record as transformed); `local_only` fields are
    stored but never put in the outbox; `forward` False keeps the change on this agent; `whole`
    puts every field of the record in the change (its first one HQ sees); `summaries` are applied
    in the same transaction; `refused` refuses the write (nothing is stored)."""

    fields: dict[str, Any]
    local_only: frozenset[str] = frozenset()
    forward: bool = True
    whole: bool = False
    summaries: Sequence[SummaryUpdate] = ()
    refused: str | None = None


class EdgeHook(Protocol):
    def plan(self, write: Write, current: dict[str, Any] | None, node: str) -> Planned:
        """Decide for `write`, given the live record's values (None: no live record). Must not
        raise: a refusal is a Planned with `refused` set."""
        ...

    def summary_records(self, write: Write, node: str) -> list[tuple[str, str]]:
        """The summary records `write` would add to if stored: fetched for the whole transaction
        in one query, instead of one query each."""
        ...


@dataclass(slots=True)
class Write:
    collection: str
    key: str
    op: Op
    fields: dict[str, Any]
    # A partial update (PATCH): only for a record that exists when the transaction runs, so a
    # concurrent delete is never undone by a record holding just the patched fields.
    must_exist: bool = False
    # A conflict resolution: the fields are written even where they equal the visible value, so
    # the new change's parent covers every side and closes the conflict everywhere.
    resolves: bool = False
    # The collection's edge steps (transform, forwarding mode), set by the capture validator
    # (agent.capture.validate) and applied in the write transaction. None: stored as written.
    edge: EdgeHook | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    key: str
    # Origin sequence of the change; None when the write changed nothing or the change is kept
    # on this agent (summary and exceptions modes, device-only fields: then `hlc` is set).
    seq: int | None
    hlc: int | None
    missing: bool = False  # a must_exist write found no live record: nothing was written
    # Why the write was refused (a source_of_truth field this node does not own), else None.
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedError:
    """A record the collection's rules refused, kept for a person to fix, resubmit or discard."""

    collection: str
    key: str
    payload: dict[str, Any]
    errors: list[dict[str, Any]]
    source: str | None
    line: int | None
    received_ms: int
    id: int = 0
    status: str = "open"
    resolved_ms: int | None = None
    note: str | None = None


_ERROR_COLUMNS = (
    "collection, key, payload, errors, source, line, received_ms, id, status, resolved_ms, note"
)


def _queued_error(row: Sequence[Any]) -> QueuedError:
    values = list(row)
    values[2] = orjson.loads(values[2])
    values[3] = orjson.loads(values[3])
    return QueuedError(*values)


@dataclass(frozen=True, slots=True)
class SealedBatch:
    seq: int
    first: int
    last: int
    count: int
    sealed: bytes


class AgentStore:
    """One writer connection (all writes), one reader connection (API reads, batcher scans)."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        node_id: str,
        policies: Mapping[str, FieldPolicies] | None = None,
    ):
        self._writer = writer
        self._reader = reader
        self.node_id = node_id
        self.data_dir = Path(".")  # set by open(): where agent.db lives
        # The last write transaction failed for a full disk (cleared by the next one that commits).
        self.disk_full: DiskFull | None = None
        # The collections' conflict policies (protocol.merge.field_policies); none: all lww.
        self.policies: Mapping[str, FieldPolicies] = policies or {}
        self.clock = HybridClock()
        self._commit_lock = asyncio.Lock()  # one write transaction at a time
        self._group_lock = asyncio.Lock()  # one group commit being formed at a time
        self._pending: list[tuple[Sequence[Write], asyncio.Future[list[WriteResult]]]] = []
        self.changed = asyncio.Event()  # set after every commit that queued changes

    @classmethod
    async def open(
        cls, path: Path, node_id: str, policies: Mapping[str, FieldPolicies] | None = None
    ) -> AgentStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.execute("PRAGMA synchronous=FULL")
            await writer.execute("PRAGMA busy_timeout=10000")
            await writer.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            try:
                await migrate(writer, path)
            except MigrationError as e:
                raise StoreError(str(e)) from e
            except (sqlite3.Error, OSError) as e:
                if is_disk_full(e, path.parent):
                    raise DiskFull.at(path.parent) from e
                raise
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=10000")
            await reader.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
        except BaseException:
            await writer.close()
            raise
        store = cls(writer, reader, node_id, policies)
        store.data_dir = path.parent
        meta = await store.meta()
        store.clock.observe(int(meta["clock_last"]))
        store.clock.offset_ms = int(meta["hq_offset_ms"])
        return store

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def _transaction(self, body: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `body` in one write transaction (BEGIN IMMEDIATE .. COMMIT, ROLLBACK on error).

        Shielded, lock included: aiosqlite finishes a call even when its caller is cancelled, so a
        cancelled caller (a client that went away, shutdown) must not release the lock while its
        transaction is still open on the shared writer connection.

        A full disk raises DiskFull (nothing of the transaction is stored) and is remembered in
        `disk_full` until a transaction commits again.
        """

        async def run() -> T:
            async with self._commit_lock:
                db = self._writer
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    try:
                        result = await body(db)
                        await db.execute("COMMIT")
                    except BaseException:
                        # SQLite has already rolled back after disk-full or I/O errors: keep the
                        # original error rather than "no transaction is active".
                        if db.in_transaction:
                            await db.execute("ROLLBACK")
                        raise
                except (sqlite3.Error, OSError) as e:
                    if not is_disk_full(e, self.data_dir):
                        raise
                    if self.disk_full is None:
                        log.warning("data folder %s: disk full; writes refused", self.data_dir)
                    self.disk_full = DiskFull.at(self.data_dir)
                    raise self.disk_full from e
                if self.disk_full is not None:
                    log.warning("data folder %s: space is back; writes accepted", self.data_dir)
                    self.disk_full = None
                return result

        return await asyncio.shield(run())

    # ---- metadata -------------------------------------------------------------------------

    async def meta(self) -> dict[str, Any]:
        async with self._reader.execute("SELECT k, v FROM meta") as cursor:
            return {k: v async for k, v in cursor}

    async def set_meta(self, **values: Any) -> None:
        async def body(db: aiosqlite.Connection) -> None:
            await db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", values.items())

        await self._transaction(body)

    # ---- capture: group-committed writes ----------------------------------------------------

    async def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """Durably apply local writes; returns once they are fsync'd. Shares commits with peers."""
        future: asyncio.Future[list[WriteResult]] = asyncio.get_running_loop().create_future()
        self._pending.append((writes, future))
        async with self._group_lock:
            if not future.done():
                # Everyone queued while the previous commit ran shares this one.
                group, self._pending = self._pending, []
                # Shielded: if this caller goes away, the others in its group still get answers.
                await asyncio.shield(self._commit_group(group))
        return await future

    async def _commit_group(
        self, group: list[tuple[Sequence[Write], asyncio.Future[list[WriteResult]]]]
    ) -> None:
        writes = [w for batch, _ in group for w in batch]
        try:
            results = await self._transaction(lambda db: self._commit_writes(db, writes))
        except Exception as e:
            for _, future in group:
                if not future.done():
                    if isinstance(e, DiskFull):  # one exception object per waiting caller
                        future.set_exception(DiskFull.at(self.data_dir))
                    else:
                        future.set_exception(StoreError(f"commit local writes: {e}"))
            return
        offset = 0
        for batch, future in group:
            if not future.done():
                future.set_result(results[offset : offset + len(batch)])
            offset += len(batch)
        if any(r.seq is not None for r in results):
            self.changed.set()

    async def _commit_writes(
        self, db: aiosqlite.Connection, writes: Sequence[Write]
    ) -> list[WriteResult]:
        meta = {
            k: v
            async for k, v in await db.execute(
                "SELECT k, v FROM meta WHERE k IN ('next_change_seq', 'clock_last', 'groups',"
                " 'sealed_through', 'claimed_through')"
            )
        }
        next_seq = int(meta["next_change_seq"])
        # Summary records' outbox rows above this may still be updated in place.
        claimed = max(int(meta["sealed_through"]), int(meta.get("claimed_through", 0)))
        # Summary record -> its unclaimed outbox row (a list, updated in place) and whether the
        # row is new in this transaction (else it is updated in the table at the end).
        pending: dict[tuple[str, str], tuple[list[Any], bool]] = {}
        principals = frozenset({f"node:{self.node_id}", *orjson.loads(meta.get("groups", "[]"))})
        self.clock.observe(int(meta["clock_last"]))  # the CLI may write beside the daemon
        states = await _load_states(db, ((w.collection, w.key) for w in writes))
        summaries = {
            ident
            for w in writes
            if w.edge is not None and (w.collection, w.key) not in states
            for ident in w.edge.summary_records(w, self.node_id)
        }
        prefetched: set[tuple[str, str]] = set()
        if summaries:
            states.update(await _load_states(db, summaries))
            pending.update(await _unclaimed_summary_rows(db, summaries, claimed))
            prefetched = summaries
        dirty: dict[tuple[str, str], RecordState] = {}
        outbox: list[list[Any]] = []
        results: list[WriteResult] = []
        for w in writes:
            state = states.get((w.collection, w.key))
            if w.must_exist and (state is None or not state.alive):
                results.append(WriteResult(w.key, None, None, missing=True))
                continue
            written = w.fields
            plan: Planned | None = None
            if w.edge is not None:
                alive = state.values if state is not None and state.alive else None
                plan = w.edge.plan(w, alive, self.node_id)
                if plan.refused is not None:
                    results.append(WriteResult(w.key, None, None, refused=plan.refused))
                    continue
                written = plan.fields
            rules = self.policies.get(w.collection, NO_POLICIES)
            refused = [
                name
                for name, owner in rules.owners.items()
                if name in written
                # As at HQ: the initial value of an empty field is anyone's to set.
                and not may_write(
                    owner, principals, creating=state is None or name not in state.stamps
                )
                and (state is None or state.values.get(name) != written[name])
            ]
            if refused:
                owners = ", ".join(f"{n} (owned by {rules.owners[n]})" for n in refused)
                results.append(
                    WriteResult(w.key, None, None, refused=f"this node may not change {owners}")
                )
                continue
            if state is None and w.op == "upsert" and not rules.review:
                # New record, the common case of field capture: every field is written.
                hlc = self.clock.now()
                stamp = (hlc, self.node_id)
                fields = written
                state = RecordState(dict(fields), dict.fromkeys(fields, stamp))
                parent = 0
            else:
                state = state or RecordState()
                if w.op == "upsert":
                    fields = {
                        name: value
                        for name, value in written.items()
                        if w.resolves or name not in state.stamps or state.values[name] != value
                    }
                    if not fields:
                        results.append(WriteResult(w.key, None, None))
                        continue
                elif not state.alive:
                    results.append(WriteResult(w.key, None, None))
                    continue
                else:
                    fields = {}
                # Above the record's version even when a far-ahead clock elsewhere stamped it: a
                # write the caller is told was stored must win over what it replaced.
                hlc = max(self.clock.now(), state.version + 1)
                parent = state.version
                apply_change(
                    state,
                    Change(w.collection, w.key, w.op, fields, hlc, parent, self.node_id, 0),
                    rules.review,
                )
            states[(w.collection, w.key)] = state
            dirty[(w.collection, w.key)] = state
            if plan is not None:
                for update in plan.summaries:
                    next_seq = await self._summarise(
                        db, update, states, dirty, outbox, pending, prefetched, claimed, next_seq
                    )
                sent = dict(state.values) if plan.whole else fields
                if plan.local_only:
                    sent = {n: v for n, v in sent.items() if n not in plan.local_only}
                if not plan.forward or (w.op == "upsert" and not sent):
                    results.append(WriteResult(w.key, None, hlc))  # stored, kept on this agent
                    continue
                fields = sent
                if plan.whole:
                    parent = 0  # HQ has never seen this record
                    # Every field sent is stamped with this change here too, or a write from
                    # elsewhere stamped in between would win here and lose at HQ.
                    for name in sent:
                        state.stamps[name] = (hlc, self.node_id)
            outbox.append(
                [
                    next_seq,
                    w.collection,
                    w.key,
                    OPS.index(w.op),
                    msgpack.packb(fields, use_bin_type=True),
                    hlc,
                    parent,
                ]
            )
            results.append(WriteResult(w.key, next_seq, hlc))
            next_seq += 1
        if dirty:
            await _save_states(db, dirty, self.policies)
        for row, _ in pending.values():
            row[4] = msgpack.packb(row[4], use_bin_type=True)
        if outbox:
            await db.executemany(
                "INSERT INTO outbox (seq, collection, key, op, fields, hlc, parent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                outbox,
            )
        if pending:
            await db.executemany(
                "INSERT OR REPLACE INTO summary_outbox (collection, key, seq) VALUES (?, ?, ?)",
                [(c, k, row[0]) for (c, k), (row, new) in pending.items() if new],
            )
            await db.executemany(
                "UPDATE outbox SET fields = ?, hlc = ? WHERE seq = ?",
                [
                    (row[4], row[5], row[0])
                    for ident, (row, new) in pending.items()
                    if not new and ident in dirty  # prefetched rows left alone stay as they are
                ],
            )
        if dirty:
            await db.executemany(
                "UPDATE meta SET v = ? WHERE k = ?",
                [(next_seq, "next_change_seq"), (self.clock.last, "clock_last")],
            )
        return results

    async def _summarise(
        self,
        db: aiosqlite.Connection,
        update: SummaryUpdate,
        states: dict[tuple[str, str], RecordState],
        dirty: dict[tuple[str, str], RecordState],
        outbox: list[list[Any]],
        pending: dict[tuple[str, str], tuple[list[Any], bool]],
        fetched: set[tuple[str, str]],
        claimed: int,
        next_seq: int,
    ) -> int:
        """Apply one increment to a summary record, in the capture's transaction; returns the next
        origin sequence.

        Bytes matter more than changes here: while the summary record's last outbox row is not
        claimed by the batcher, it is updated in place (its seq kept, so origin sequences stay
        contiguous and are never reused) and carries the record's latest values; otherwise a new
        row carries what changed. Either way the change's parent is what HQ last saw.
        """
        ident = (update.collection, update.key)
        if ident not in fetched:  # state and unclaimed outbox row, read once per transaction
            fetched.add(ident)
            states.update(await _load_states(db, [ident]))
            pending.update(await _unclaimed_summary_rows(db, [ident], claimed))
        state = states.get(ident)
        held = state.values if state is not None and state.alive else None
        values = update.apply(held)
        changed = {n: v for n, v in values.items() if held is None or held.get(n, _NONE) != v}
        if not changed:
            return next_seq
        state = state or RecordState()
        hlc = max(self.clock.now(), state.version + 1)
        row: list[Any] | None = pending[ident][0] if ident in pending else None
        if row is not None:
            fields = row[4] = row[4] | changed
            row[5] = hlc
        else:
            fields = changed
            row = [next_seq, *ident, OPS.index("upsert"), fields, hlc, state.version]
            pending[ident] = (row, True)
            outbox.append(row)
            next_seq += 1
        # Stamped as HQ will stamp them: every field of the (coalesced) change at its HLC.
        apply_change(state, Change(*ident, "upsert", fields, hlc, state.version, self.node_id, 0))
        states[ident] = dirty[ident] = state
        return next_seq

    # ---- reads for the local API ------------------------------------------------------------

    async def get(self, collection: str, key: str) -> dict[str, Any] | None:
        async with self._reader.execute(
            "SELECT data FROM records WHERE collection = ? AND key = ? AND alive",
            (collection, key),
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else orjson.loads(row[0])

    async def page(
        self,
        collection: str,
        filters: dict[str, Any] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Live records in key order, `filters` matching field values exactly, paged by key.

        Returns the records and the key to pass as `after` for the next page (None at the end).
        """
        sql = ["SELECT key, data FROM records WHERE collection = ? AND alive"]
        params: list[Any] = [collection]
        for name, value in (filters or {}).items():
            if not FIELD_NAME.match(name):
                raise ValueError(f"filter field {name!r} is not a valid field name")
            sql.append("AND json_extract(data, ?) IS json_extract(?, '$')")
            params += [f'$."{name}"', orjson.dumps(value).decode()]
        if after is not None:
            sql.append("AND key > ?")
            params.append(after)
        sql.append("ORDER BY key LIMIT ?")
        params.append(limit)
        async with self._reader.execute(" ".join(sql), params) as cursor:
            rows = [(key, orjson.loads(data)) async for key, data in cursor]
        next_after = rows[-1][0] if len(rows) == limit else None
        return [record for _, record in rows], next_after

    async def list_records(
        self,
        collection: str,
        filters: dict[str, Any] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """One page of `page()`, without the continuation key."""
        records, _ = await self.page(collection, filters, after, limit)
        return records

    async def count(self, collection: str) -> int:
        async with self._reader.execute(
            "SELECT count(*) FROM records WHERE collection = ? AND alive", (collection,)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # ---- batcher ------------------------------------------------------------------------------

    async def unsealed_changes(self, max_changes: int, max_bytes: int) -> list[Change]:
        """The next outbox changes not yet in a batch, in order, bounded in count and bytes.

        Read in a write transaction that also claims them (`claimed_through`): a summary
        record's outbox row may be updated in place until it is claimed, never after, so a
        batch never misses an increment that landed while it was being sealed.
        """

        async def body(db: aiosqlite.Connection) -> list[Change]:
            async with db.execute(
                "SELECT k, v FROM meta WHERE k IN ('sealed_through', 'claimed_through')"
            ) as cursor:
                meta = {k: int(v) async for k, v in cursor}
            rows: list[Change] = []
            size = 0
            async with db.execute(
                "SELECT seq, collection, key, op, fields, hlc, parent FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (meta["sealed_through"], max_changes),
            ) as cursor:
                async for seq, collection, key, op, fields, hlc, parent in cursor:
                    size += len(fields) + len(key) + 24
                    if rows and size > max_bytes:
                        break
                    rows.append(
                        Change(
                            collection,
                            key,
                            OPS[op],
                            msgpack.unpackb(fields, raw=False),
                            hlc,
                            parent,
                            self.node_id,
                            seq,
                        )
                    )
            if rows and rows[-1].seq > meta.get("claimed_through", 0):
                await db.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES ('claimed_through', ?)",
                    (rows[-1].seq,),
                )
            return rows

        return await self._transaction(body)

    async def summaries_open(self) -> bool:
        """True if a summary record's outbox row can still absorb increments (not yet claimed)."""
        async with self._reader.execute(
            "SELECT 1 FROM summary_outbox WHERE seq > (SELECT max(v) FROM meta"
            " WHERE k IN ('sealed_through', 'claimed_through')) LIMIT 1"
        ) as cursor:
            return await cursor.fetchone() is not None

    async def add_batch(self, batch: SealedBatch, created_ms: int) -> None:
        """Record a sealed batch and advance `sealed_through`, atomically."""

        async def body(db: aiosqlite.Connection) -> None:
            async with db.execute("SELECT v FROM meta WHERE k = 'next_batch_seq'") as cursor:
                row = await cursor.fetchone()
            if row is None or int(row[0]) != batch.seq:
                raise StoreError(f"batch {batch.seq} is not the next batch ({row})")
            async with db.execute("SELECT v FROM meta WHERE k = 'sealed_through'") as cursor:
                sealed = await cursor.fetchone()
            if sealed is None or int(sealed[0]) + 1 != batch.first:
                # Renumbered meanwhile (a restore recovery): these changes are sealed anew.
                raise StoreError(f"batch {batch.seq} starts at change {batch.first}, not next")
            await db.execute(
                "INSERT INTO batches (seq, first, last, count, sealed, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (batch.seq, batch.first, batch.last, batch.count, batch.sealed, created_ms),
            )
            await db.executemany(
                "UPDATE meta SET v = ? WHERE k = ?",
                [(batch.seq + 1, "next_batch_seq"), (batch.last, "sealed_through")],
            )

        await self._transaction(body)

    async def unacked_batches(self, limit: int, after: int = 0) -> list[SealedBatch]:
        """Sealed batches not yet forgotten, oldest first (those above `after` only)."""
        async with self._reader.execute(
            "SELECT seq, first, last, count, sealed FROM batches WHERE seq > ? ORDER BY seq"
            " LIMIT ?",
            (after, limit),
        ) as cursor:
            return [SealedBatch(*row) async for row in cursor]

    async def mark_acked(self, acked_through: int) -> int:
        """Forget batches (and their outbox rows) that HQ's ack covers; idempotent.

        Returns the number of changes released.
        """

        async def body(db: aiosqlite.Connection) -> int:
            async with db.execute(
                "SELECT max(last), coalesce(sum(count), 0), coalesce(sum(length(sealed)), 0)"
                " FROM batches WHERE seq <= ?",
                (acked_through,),
            ) as cursor:
                row = await cursor.fetchone()
            last, count, size = row or (None, 0, 0)
            if last is not None:
                await db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
                await db.execute("DELETE FROM summary_outbox WHERE seq <= ?", (last,))
                await db.execute("DELETE FROM batches WHERE seq <= ?", (acked_through,))
            await db.execute(
                "UPDATE meta SET v = max(v, ?) WHERE k = 'acked_batch'", (acked_through,)
            )
            await db.execute("UPDATE meta SET v = v + ? WHERE k = 'acked_changes'", (count,))
            await db.execute("UPDATE meta SET v = v + ? WHERE k = 'sent_bytes'", (size,))
            return int(count)

        return await self._transaction(body)

    # ---- recovery after a restore from backup ------------------------------------------------

    async def recover_from_restore(self, marks: HQMarks) -> Recovery | None:
        """Make this node's unsent changes new to HQ after agent.db was restored from a backup
        (HQ holds batch or change sequence numbers, or stamps, from this node above its own).

        In one transaction, so a kill leaves the database before or after it: queued changes HQ
        already holds (seq and stamp within HQ's marks: queued at backup time, sent by the undone
        timeline) are forgotten; sealed but unacked batches are dropped (their changes stay
        queued); every other unsent change is renumbered from
        `hq_change_seq + 1` and batches continue after `hq_acked_through`; the clock moves past
        `hq_max_hlc` and every unsent change is stamped anew above it, in order (parents that
        named an earlier unsent change of the same record follow it), and so are the local
        records' stamps those changes set, so this replica and HQ agree on them. None when
        nothing is to be done (already recovered with these marks): idempotent.
        """

        async def body(db: aiosqlite.Connection) -> Recovery | None:
            async with db.execute(
                "SELECT k, v FROM meta WHERE k IN ('next_change_seq', 'next_batch_seq',"
                " 'acked_batch', 'clock_last', 'recovery_count', 'acked_changes')"
            ) as cursor:
                meta = {k: int(v) async for k, v in cursor}
            async with db.execute("SELECT min(seq), count(*), min(hlc) FROM outbox") as cursor:
                low, count, low_hlc = await cursor.fetchone() or (None, 0, None)
            async with db.execute("SELECT count(*), coalesce(min(seq), 0) FROM batches") as c:
                batches, _ = await c.fetchone() or (0, 0)
            if not (
                meta["next_batch_seq"] <= marks.acked_through
                or meta["next_change_seq"] <= marks.change_seq
                or (low is not None and low <= marks.change_seq)
                or (low_hlc is not None and low_hlc <= marks.max_hlc)
            ):
                return None
            self.clock.observe(max(marks.max_hlc, int(meta["clock_last"])))
            # Changes HQ already holds: queued when the backup was taken, sent later by the
            # timeline the restore undid (same seq, stamped before HQ's newest stamp). Sent
            # again under new numbers they would be applied twice. Assumes the clock was not
            # set back between that timeline and the restore (docs/operations.md).
            cursor = await db.execute(
                "DELETE FROM outbox WHERE seq <= ? AND hlc <= ?", (marks.change_seq, marks.max_hlc)
            )
            held = max(0, cursor.rowcount)
            await db.execute("DELETE FROM summary_outbox WHERE seq NOT IN (SELECT seq FROM outbox)")
            async with db.execute("SELECT min(seq), count(*) FROM outbox") as cursor:
                low, count = await cursor.fetchone() or (None, 0)
            base = max(marks.change_seq, (low or meta["next_change_seq"]) - 1)
            restamped: dict[tuple[str, str], dict[int, int]] = {}
            rows: list[tuple[int, int, int, int]] = []  # old seq, new seq, new hlc, new parent
            async with db.execute(
                "SELECT seq, collection, key, hlc, parent FROM outbox ORDER BY seq"
            ) as cursor:
                async for seq, collection, key, hlc, parent in cursor:
                    mine = restamped.setdefault((collection, key), {})
                    new_hlc = self.clock.now()
                    rows.append((seq, base + 1 + len(rows), new_hlc, mine.get(parent, parent)))
                    mine[hlc] = new_hlc
            await db.execute("DELETE FROM batches")
            # Through negative numbers: no two rows ever hold one seq during the update.
            await db.executemany(
                "UPDATE outbox SET seq = ?, hlc = ?, parent = ? WHERE seq = ?",
                [(-new, hlc, parent, old) for old, new, hlc, parent in rows],
            )
            await db.execute("UPDATE outbox SET seq = -seq WHERE seq < 0")
            await db.executemany(
                "UPDATE summary_outbox SET seq = ? WHERE seq = ?",
                [(new, old) for old, new, _, _ in rows],
            )
            states = await _load_states(db, restamped)
            for ident, state in states.items():
                _restamp(state, restamped[ident], self.node_id)
            await _save_states(db, states, self.policies)
            next_batch = max(marks.acked_through, meta["acked_batch"]) + 1
            recovery = Recovery(
                at_ms=system_ms(),
                hq_acked_through=marks.acked_through,
                hq_change_seq=marks.change_seq,
                hq_max_hlc=marks.max_hlc,
                dropped_batches=int(batches),
                already_at_hq=held,
                renumbered=int(count),
                old_first_seq=low,
                first_seq=base + 1 if rows else None,
                next_batch_seq=next_batch,
            )
            await db.executemany(
                "INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                [
                    ("next_change_seq", base + 1 + len(rows)),
                    ("sealed_through", base),
                    ("claimed_through", base),
                    ("next_batch_seq", next_batch),
                    ("acked_batch", next_batch - 1),
                    ("clock_last", self.clock.last),
                    ("recovery_count", meta.get("recovery_count", 0) + 1),
                    ("last_recovery", orjson.dumps(recovery.to_json()).decode()),
                    ("hq_refusal", ""),
                    ("acked_changes", int(meta.get("acked_changes", 0)) + held),
                ],
            )
            return recovery

        return await self._transaction(body)

    # ---- downstream --------------------------------------------------------------------------

    async def apply_feed(
        self, changes: Sequence[Change], cursor: int, groups: Sequence[str] | None = None
    ) -> int:
        """Merge HQ's downstream changes and advance the feed cursor in one transaction; `groups`
        is this node's groups as HQ's signed page states them (None: unchanged)."""

        async def body(db: aiosqlite.Connection) -> int:
            states = await _load_states(db, ((c.collection, c.key) for c in changes))
            dirty: dict[tuple[str, str], RecordState] = {}
            for change in changes:
                if change.origin == self.node_id:
                    continue
                state = states.setdefault((change.collection, change.key), RecordState())
                review = self.policies.get(change.collection, NO_POLICIES).review
                apply_change(state, change, review)
                dirty[(change.collection, change.key)] = state
                # A timestamp from a clock far ahead still merges (replicas must converge) but
                # must not drag this clock into the future with it.
                ahead = physical_ms(change.hlc) - self.clock.physical()
                if ahead <= self.clock.max_drift_ms:
                    self.clock.observe(change.hlc)
            await _save_states(db, dirty, self.policies)
            updates: list[tuple[Any, str]] = [
                (cursor, "feed_cursor"),
                (self.clock.last, "clock_last"),
            ]
            if groups is not None:
                updates.append((orjson.dumps(sorted(groups)).decode(), "groups"))
            await db.executemany("UPDATE meta SET v = ? WHERE k = ?", updates)
            return len(dirty)

        return await self._transaction(body)

    # ---- review conflicts open on this replica ------------------------------------------------

    async def open_conflicts(
        self, collection: str | None = None
    ) -> list[tuple[str, str, str, list[Head]]]:
        """(collection, key, field, heads highest stamp first) of every open review conflict."""
        sql = "SELECT c.collection, c.key, c.field, r.data, r.stamps FROM conflicts c JOIN "
        sql += "records r ON r.collection = c.collection AND r.key = c.key"
        params: list[Any] = []
        if collection is not None:
            sql += " WHERE c.collection = ?"
            params.append(collection)
        async with self._reader.execute(sql + " ORDER BY 1, 2, 3", params) as cursor:
            rows = await cursor.fetchall()
        out = []
        for coll, key, name, data, stamps in rows:
            heads = _unpack_state(data, stamps).conflict(name)
            if heads is not None:
                out.append((coll, key, name, heads))
        return out

    async def groups(self) -> list[str]:
        """This node's groups, as HQ last said."""
        return list(orjson.loads((await self.meta()).get("groups", "[]")))

    # ---- status ------------------------------------------------------------------------------

    # ---- error queue: records refused by the collection's rules, kept for people to fix ----------

    async def queue_errors(self, entries: Sequence[QueuedError]) -> int:
        """Keep refused records durably (an identical open entry is kept once); returns how many
        were added."""

        async def body(db: aiosqlite.Connection) -> int:
            before = db.total_changes
            await db.executemany(
                "INSERT OR IGNORE INTO error_queue (collection, key, payload, errors, source, line,"
                " received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.collection,
                        e.key,
                        orjson.dumps(e.payload).decode(),
                        orjson.dumps(e.errors).decode(),
                        e.source,
                        e.line,
                        e.received_ms,
                    )
                    for e in entries
                ],
            )
            return int(db.total_changes - before)

        return await self._transaction(body)

    async def queued_errors(
        self, status: str | None = "open", limit: int = 100, after_id: int = 0
    ) -> list[QueuedError]:
        sql = f"SELECT {_ERROR_COLUMNS} FROM error_queue WHERE id > ?"
        params: list[Any] = [after_id]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        async with self._reader.execute(sql + " ORDER BY id LIMIT ?", (*params, limit)) as cur:
            return [_queued_error(row) async for row in cur]

    async def queued_error(self, entry_id: int) -> QueuedError | None:
        async with self._reader.execute(
            f"SELECT {_ERROR_COLUMNS} FROM error_queue WHERE id = ?", (entry_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _queued_error(row)

    async def update_error(
        self,
        entry_id: int,
        *,
        payload: dict[str, Any] | None = None,
        errors: list[dict[str, Any]] | None = None,
        status: str | None = None,
        note: str | None = None,
        resolved_ms: int | None = None,
        if_payload: dict[str, Any] | None = None,
    ) -> bool:
        """Change an open entry: a fixed payload and its new errors, or its end (resubmitted or
        discarded, with a note). With `if_payload`, only if the entry still holds that payload
        (a fix saved meanwhile wins). True if the entry changed."""

        async def body(db: aiosqlite.Connection) -> bool:
            sql = (
                "UPDATE error_queue SET payload = coalesce(?, payload),"
                " errors = coalesce(?, errors), status = coalesce(?, status),"
                " note = coalesce(?, note), resolved_ms = coalesce(?, resolved_ms)"
                " WHERE id = ? AND status = 'open'"
            )
            params: list[Any] = [
                None if payload is None else orjson.dumps(payload).decode(),
                None if errors is None else orjson.dumps(errors).decode(),
                status,
                note,
                resolved_ms,
                entry_id,
            ]
            if if_payload is not None:
                sql += " AND payload = ?"
                params.append(orjson.dumps(if_payload).decode())
            cursor = await db.execute(sql, params)
            return bool(cursor.rowcount)

        return await self._transaction(body)

    async def backlog(self) -> dict[str, int]:
        """Changes not yet acked by HQ and their stored size; sealed batches waiting and theirs."""
        async with self._reader.execute(
            "SELECT (SELECT count(*) FROM outbox),"
            " (SELECT coalesce(sum(length(fields) + length(key)), 0) FROM outbox),"
            " (SELECT count(*) FROM batches),"
            " (SELECT coalesce(sum(length(sealed)), 0) FROM batches)"
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        names = ("changes", "bytes", "batches", "batch_bytes")
        return {name: int(value) for name, value in zip(names, row, strict=True)}


@dataclass(frozen=True, slots=True)
class HQMarks:
    """What HQ holds from this node: highest batch acked, highest change (origin) seq, highest
    HLC stamp (from its 409 "diverged" answer)."""

    acked_through: int
    change_seq: int
    max_hlc: int


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a restore recovery did (kept in meta `last_recovery`, shown by `status`)."""

    at_ms: int
    hq_acked_through: int
    hq_change_seq: int
    hq_max_hlc: int
    dropped_batches: int  # sealed, never acked: their changes were queued again
    already_at_hq: int  # queued here, but HQ holds them (sent before the restore): forgotten
    renumbered: int  # unsent changes given new sequence numbers and stamps
    old_first_seq: int | None
    first_seq: int | None
    next_batch_seq: int

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _restamp(state: RecordState, new_hlcs: Mapping[int, int], node_id: str) -> None:
    """Move this node's stamps (fields, tombstone, review heads) from old to new HLCs."""
    for name, (hlc, origin) in list(state.stamps.items()):
        if origin == node_id and hlc in new_hlcs:
            state.stamps[name] = (new_hlcs[hlc], origin)
    hlc, origin = state.tombstone
    if origin == node_id and hlc in new_hlcs:
        state.tombstone = (new_hlcs[hlc], origin)
    for name, heads in state.heads.items():
        moved = [
            h._replace(hlc=new_hlcs[h.hlc], parent=new_hlcs.get(h.parent, h.parent))
            if h.origin == node_id and h.hlc in new_hlcs
            else h
            for h in heads
        ]
        state.heads[name] = sorted(moved, key=lambda h: (h.hlc, h.origin), reverse=True)


async def _unclaimed_summary_rows(
    db: aiosqlite.Connection, idents: Iterable[tuple[str, str]], claimed: int
) -> dict[tuple[str, str], tuple[list[Any], bool]]:
    """The outbox rows of these summary records not yet claimed by the batcher (see _summarise),
    fields unpacked, as `pending` entries."""
    out: dict[tuple[str, str], tuple[list[Any], bool]] = {}
    wanted = orjson.dumps(sorted([c, k] for c, k in idents)).decode()
    async with db.execute(
        "SELECT o.seq, o.collection, o.key, o.op, o.fields, o.hlc, o.parent"
        " FROM summary_outbox s JOIN outbox o ON o.seq = s.seq"
        " JOIN (SELECT json_extract(value, '$[0]') AS c, json_extract(value, '$[1]') AS k"
        " FROM json_each(?)) w ON s.collection = w.c AND s.key = w.k WHERE s.seq > ?",
        (wanted, claimed),
    ) as cursor:
        async for found in cursor:
            row = list(found)
            row[4] = msgpack.unpackb(row[4], raw=False)  # packed again at commit
            out[(row[1], row[2])] = (row, False)
    return out


async def _load_states(
    db: aiosqlite.Connection, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], RecordState]:
    """Current state of the given records, read with one query per collection and chunk."""
    by_collection: dict[str, set[str]] = {}
    for collection, key in keys:
        by_collection.setdefault(collection, set()).add(key)
    states: dict[tuple[str, str], RecordState] = {}
    for collection, key_set in by_collection.items():
        ordered = list(key_set)
        for i in range(0, len(ordered), IN_CHUNK):
            chunk = ordered[i : i + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            async with db.execute(
                f"SELECT key, data, stamps FROM records WHERE collection = ? AND key IN ({marks})",
                [collection, *chunk],
            ) as cursor:
                async for key, data, stamps in cursor:
                    states[(collection, key)] = _unpack_state(data, stamps)
    return states


def _pack_state(state: RecordState) -> tuple[str, bytes, bool, int]:
    """(data JSON, stamps blob, alive, version) for the records table.

    Stamps are stored as [top stamp, {field: stamp} for fields whose stamp differs, tombstone,
    heads of review fields (only when there are some)]: most fields of a record share the stamp of
    its last write, so this stays small.
    """
    top = max(state.stamps.values()) if state.stamps else None
    others = {name: stamp for name, stamp in state.stamps.items() if stamp != top}
    tombstone = None if state.tombstone == NO_STAMP else state.tombstone
    heads = state.heads_to_storage()
    packed = [top, others, tombstone] if heads is None else [top, others, tombstone, heads]
    stamps = msgpack.packb(packed, use_bin_type=True)
    version = top[0] if top is not None else state.tombstone[0]
    return orjson.dumps(state.values).decode(), stamps, bool(state.stamps), version


def _unpack_state(data: str, stamps: bytes) -> RecordState:
    values = orjson.loads(data)
    top, others, tombstone, *rest = msgpack.unpackb(stamps, raw=False, use_list=False)
    heads = {}
    if rest:
        # Head values compare with values from JSON and the wire: lists must stay lists.
        unpacked = msgpack.unpackb(stamps, raw=False)[3]
        heads = {name: [Head(*h) for h in hs] for name, hs in unpacked.items()}
    return RecordState(
        values,
        {name: others.get(name, top) for name in values},
        tombstone if tombstone is not None else NO_STAMP,
        heads,
    )


async def _save_states(
    db: aiosqlite.Connection,
    states: dict[tuple[str, str], RecordState],
    policies: Mapping[str, FieldPolicies] | None = None,
) -> None:
    """Write merged records; with `policies`, also keep the open-conflicts table in step."""
    if policies:
        stale = [(c, k) for (c, k) in states if c in policies and policies[c].review]
        await db.executemany("DELETE FROM conflicts WHERE collection = ? AND key = ?", stale)
        await db.executemany(
            "INSERT INTO conflicts (collection, key, field) VALUES (?, ?, ?)",
            [(c, k, name) for (c, k) in stale for name in states[(c, k)].conflicts()],
        )
    # A generator: rows are encoded as SQLite consumes them, never all held at once.
    rows = ((c, k, *_pack_state(state)) for (c, k), state in states.items())
    await db.executemany(
        "INSERT INTO records (collection, key, data, stamps, alive, version)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, key) DO UPDATE SET"
        " data = excluded.data, stamps = excluded.stamps, alive = excluded.alive,"
        " version = excluded.version",
        rows,
    )
