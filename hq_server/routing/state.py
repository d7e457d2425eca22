"""The router's durable state, in HQ's database: a cursor per route and the dead-letter queue.

A route's position is (cursor, partial): every change up to `cursor` is done (delivered, filtered
out or dead-lettered), and so are the first `partial` items the next change maps to. Progress is
recorded only after the sink answered, so a crash means a repeat, which sinks tolerate by
idempotency key -- never a loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from hq_server.store import SQLiteHQStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS route_state (
    route TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL DEFAULT 0,
    partial INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,      -- item-level transient failures of the head item
    failures INTEGER NOT NULL DEFAULT 0,      -- consecutive failed sends (outages included)
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    last_delivery_at INTEGER,
    last_run_at INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    origin TEXT NOT NULL,
    origin_seq INTEGER NOT NULL,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    op TEXT NOT NULL,
    item_index INTEGER NOT NULL,
    record TEXT NOT NULL,          -- the source record as it was routed (JSON)
    mapped TEXT,                   -- the mapped payload (JSON), NULL when mapping itself failed
    idempotency_key TEXT,
    reason TEXT NOT NULL,          -- rejected | exhausted | mapping
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed_at INTEGER NOT NULL,
    last_failed_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',   -- open | resubmit | delivered | discarded
    resolved_at INTEGER,
    resolved_by TEXT,
    note TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_by_route ON dead_letters (route, status, id);
CREATE TABLE IF NOT EXISTS route_targets (
    -- What a mapped route has delivered for each source record, so that a delete, or a record
    -- whose fan-out shrank, can remove exactly those target records.
    route TEXT NOT NULL,
    collection TEXT NOT NULL,
    source_key TEXT NOT NULL,
    target_key TEXT NOT NULL,
    PRIMARY KEY (route, collection, source_key, target_key)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class RouteState:
    route: str
    cursor: int = 0
    partial: int = 0
    attempts: int = 0
    failures: int = 0
    next_attempt_at: int = 0
    last_error: str | None = None
    delivered: int = 0
    dead_lettered: int = 0
    last_delivery_at: int | None = None
    last_run_at: int | None = None


@dataclass(frozen=True)
class SourceChange:
    """A change from HQ's change log, with the record's current state (what routes deliver)."""

    seq: int
    origin: str
    origin_seq: int
    collection: str
    key: str
    op: str
    record: dict[str, Any]


@dataclass(frozen=True)
class DeadLetter:
    id: int
    route: str
    change_seq: int
    origin: str
    origin_seq: int
    collection: str
    key: str
    op: str
    item_index: int
    record: dict[str, Any]
    mapped: dict[str, Any] | None
    idempotency_key: str | None
    reason: str
    error: str
    attempts: int
    first_failed_at: int
    last_failed_at: int
    status: str
    resolved_at: int | None
    resolved_by: str | None
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewDeadLetter:
    change: SourceChange
    item_index: int
    mapped: dict[str, Any] | None
    idempotency_key: str | None
    reason: str
    error: str
    attempts: int
    first_failed_at: int


_STATE_SELECT = (
    "SELECT route, cursor, partial, attempts, failures, next_attempt_at, last_error,"
    " delivered, dead_lettered, last_delivery_at, last_run_at FROM route_state"
)
_DL_COLUMNS = (
    "id, route, change_seq, origin, origin_seq, collection, key, op, item_index, record, mapped, "
    "idempotency_key, reason, error, attempts, first_failed_at, last_failed_at, status, "
    "resolved_at, resolved_by, note"
)


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    values = list(row)
    values[9] = json.loads(values[9])
    values[10] = json.loads(values[10]) if values[10] is not None else None
    return DeadLetter(*values)


class RouterStore:
    """Route cursors and the dead-letter queue, in the tables of HQ's own store."""

    def __init__(self, store: SQLiteHQStore) -> None:
        self.store = store

    async def open(self) -> None:
        async with self.store.transaction("create router tables") as conn:
            for statement in filter(str.strip, SCHEMA.split(";")):
                await conn.execute(statement)

    # -- positions

    async def state(self, route: str) -> RouteState:
        rows = await self.store.read(f"{_STATE_SELECT} WHERE route = ?", (route,))
        return RouteState(*rows[0]) if rows else RouteState(route)

    async def states(self) -> dict[str, RouteState]:
        rows = await self.store.read(_STATE_SELECT)
        return {row[0]: RouteState(*row) for row in rows}

    async def save(
        self,
        state: RouteState,
        dead: Sequence[NewDeadLetter] = (),
        now_ms: int = 0,
        *,
        targets_added: Sequence[tuple[str, str, str]] = (),
        targets_removed: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """Record a route's new position, its new dead letters and the target records it created
        or deleted ((collection, source key, target key)), in one transaction."""
        async with self.store.transaction(f"route {state.route}: save progress") as conn:
            await _change_targets(conn, state.route, targets_added, targets_removed)
            await conn.execute(
                "INSERT INTO route_state (route, cursor, partial, attempts, failures,"
                " next_attempt_at, last_error, delivered, dead_lettered, last_delivery_at,"
                " last_run_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (route) DO UPDATE SET cursor = excluded.cursor,"
                " partial = excluded.partial, attempts = excluded.attempts,"
                " failures = excluded.failures, next_attempt_at = excluded.next_attempt_at,"
                " last_error = excluded.last_error, delivered = excluded.delivered,"
                " dead_lettered = excluded.dead_lettered,"
                " last_delivery_at = excluded.last_delivery_at, last_run_at = excluded.last_run_at",
                (
                    state.route,
                    state.cursor,
                    state.partial,
                    state.attempts,
                    state.failures,
                    state.next_attempt_at,
                    state.last_error,
                    state.delivered,
                    state.dead_lettered,
                    state.last_delivery_at,
                    state.last_run_at,
                ),
            )
            if dead:
                await conn.executemany(
                    "INSERT INTO dead_letters (route, change_seq, origin, origin_seq, collection,"
                    " key, op, item_index, record, mapped, idempotency_key, reason, error,"
                    " attempts, first_failed_at, last_failed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_dead_row(state.route, d, now_ms) for d in dead],
                )

    # -- the change log, as routes read it

    async def changes(
        self, collections: Sequence[str], after_seq: int, limit: int
    ) -> tuple[list[SourceChange], int]:
        """Changes after `after_seq` in log order, for `collections`, with each record's current
        state; plus the last log sequence scanned (so filtered-out stretches are skipped once)."""
        marks = ",".join("?" * len(collections))
        rows = await self.store.read(
            "SELECT c.seq, c.origin, c.origin_seq, c.collection, c.key, c.op, r.data"
            " FROM changelog c LEFT JOIN records r"
            " ON r.collection = c.collection AND r.key = c.key"
            f" WHERE c.seq > ? AND c.collection IN ({marks}) ORDER BY c.seq LIMIT ?",
            (after_seq, *collections, limit),
        )
        changes = [
            SourceChange(seq, origin, origin_seq, coll, key, op, json.loads(data or "{}"))
            for seq, origin, origin_seq, coll, key, op, data in rows
        ]
        return changes, (changes[-1].seq if changes else after_seq)

    async def target_keys(
        self, route: str, records: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], list[str]]:
        """Target keys a route has delivered for each (collection, source key), in key order."""
        found: dict[tuple[str, str], list[str]] = {}
        wanted = sorted(set(records))
        for start in range(0, len(wanted), 400):
            chunk = wanted[start : start + 400]
            rows = await self.store.read(
                "SELECT collection, source_key, target_key FROM route_targets WHERE route = ?"
                " AND (collection, source_key) IN (VALUES "
                + ",".join("(?, ?)" for _ in chunk)
                + ") ORDER BY collection, source_key, target_key",
                (route, *(part for pair in chunk for part in pair)),
            )
            for collection, source_key, target_key in rows:
                found.setdefault((collection, source_key), []).append(target_key)
        return found

    async def current_record(self, collection: str, key: str) -> dict[str, Any] | None:
        """The record's state now (None if HQ does not hold it)."""
        rows = await self.store.read(
            "SELECT data FROM records WHERE collection = ? AND key = ?", (collection, key)
        )
        return json.loads(rows[0][0]) if rows else None

    async def head(self) -> int:
        rows = await self.store.read("SELECT coalesce(max(seq), 0) FROM changelog")
        return int(rows[0][0])

    # -- dead-letter queue

    async def dead_letters(
        self, *, route: str | None = None, status: str | None = "open", limit: int = 100
    ) -> list[DeadLetter]:
        sql = f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE 1 = 1"
        params: list[Any] = []
        if route is not None:
            sql += " AND route = ?"
            params.append(route)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        rows = await self.store.read(sql + " ORDER BY id LIMIT ?", (*params, limit))
        return [_dead_letter(row) for row in rows]

    async def dead_letter(self, dead_id: int) -> DeadLetter | None:
        rows = await self.store.read(
            f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id = ?", (dead_id,)
        )
        return _dead_letter(rows[0]) if rows else None

    async def count_dead_letters(self, route: str, status: str = "open") -> int:
        rows = await self.store.read(
            "SELECT count(*) FROM dead_letters WHERE route = ? AND status = ?", (route, status)
        )
        return int(rows[0][0])

    async def set_status(
        self, ids: Sequence[int], status: str, *, actor: str, note: str = "", now_ms: int
    ) -> list[int]:
        """Mark dead letters for resubmission or discard them; audited. Returns the ids changed
        (only open ones can be resubmitted or discarded)."""
        async with self.store.transaction(f"dead letters: {status}") as conn:
            changed = []
            for dead_id in ids:
                cursor = await conn.execute(
                    "UPDATE dead_letters SET status = ?, resolved_at = ?, resolved_by = ?, note = ?"
                    " WHERE id = ? AND status = 'open'",
                    (status, now_ms, actor, note or None, dead_id),
                )
                if cursor.rowcount:
                    changed.append(dead_id)
            if changed:
                action = "dlq.resubmit" if status == "resubmit" else "dlq.discard"
                await self.store.audit(conn, actor, action, {"ids": changed, "note": note})
        return changed

    async def finish_resubmit(
        self,
        dead_id: int,
        *,
        delivered: bool,
        error: str = "",
        now_ms: int,
        targets_added: Sequence[tuple[str, str, str]] = (),
        targets_removed: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """After the router retried a resubmitted dead letter: delivered, or back to open with
        the error; with the target records it created or deleted, in the same transaction."""
        async with self.store.transaction("dead letter: resubmitted") as conn:
            rows = await conn.execute_fetchall(
                "SELECT route FROM dead_letters WHERE id = ?", (dead_id,)
            )
            route = next(iter(rows))[0]
            await _change_targets(conn, route, targets_added, targets_removed)
            if delivered:
                await conn.execute(
                    "UPDATE dead_letters SET status = 'delivered', resolved_at = ? WHERE id = ?",
                    (now_ms, dead_id),
                )
            else:
                await conn.execute(
                    "UPDATE dead_letters SET status = 'open', error = ?, attempts = attempts + 1,"
                    " last_failed_at = ? WHERE id = ?",
                    (error, now_ms, dead_id),
                )


async def _change_targets(
    conn: aiosqlite.Connection,
    route: str,
    added: Sequence[tuple[str, str, str]],
    removed: Sequence[tuple[str, str, str]],
) -> None:
    if added:
        await conn.executemany(
            "INSERT OR IGNORE INTO route_targets VALUES (?, ?, ?, ?)",
            [(route, *t) for t in added],
        )
    if removed:
        await conn.executemany(
            "DELETE FROM route_targets WHERE route = ? AND collection = ?"
            " AND source_key = ? AND target_key = ?",
            [(route, *t) for t in removed],
        )


def _dead_row(route: str, d: NewDeadLetter, now_ms: int) -> tuple[Any, ...]:
    c = d.change
    return (
        route,
        c.seq,
        c.origin,
        c.origin_seq,
        c.collection,
        c.key,
        c.op,
        d.item_index,
        json.dumps(c.record, ensure_ascii=False),
        json.dumps(d.mapped, ensure_ascii=False) if d.mapped is not None else None,
        d.idempotency_key,
        d.reason,
        d.error,
        d.attempts,
        d.first_failed_at,
        now_ms,
    )
