"""The agent database's schema: one registry of numbered migrations, applied in order at open.

agent.db records its schema version in `PRAGMA user_version`. `migrate()` brings any older
database up to `LATEST`, one step per transaction (the step and the new version commit together,
so a kill at any point leaves the database at the old or the new version, never in between).
A database made before versions existed has user_version 0 and the tables of step 1, which
creates only what is missing. Opening a database already at `LATEST` writes nothing (so `status`
works on a full disk); a database newer than this code is refused, never "downgraded".

An upgrade never loses a queue: after each step the rows of the outbox, the sealed batches, the
error queue and the open conflicts are counted again, and a step that would drop any of them is
rolled back with an error naming it.

To change the schema, append a step; never edit a released one (tests/fixtures/agent-v1.db is a
database of version 0, and tests/test_agent_migrations.py migrates it and syncs it to a real HQ).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

# Version 1: the schema as it stood before versions (feaea22), created where missing.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,        -- visible field values, JSON (queryable with json_extract)
    stamps BLOB NOT NULL,      -- msgpack [top stamp, {field: stamp}, tombstone, {field: heads}]
    alive INTEGER NOT NULL,    -- 0 for a tombstone
    version INTEGER NOT NULL,  -- highest HLC in the record: the parent of the next local write
    UNIQUE (collection, key)
);
-- Review conflicts open on this replica (the details are the record's heads): what
-- `fieldsync-agent conflicts list` shows, kept in step with the records in each transaction.
CREATE TABLE IF NOT EXISTS conflicts (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    field TEXT NOT NULL,
    PRIMARY KEY (collection, key, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,   -- origin sequence: contiguous from 1, never reused
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    op INTEGER NOT NULL,       -- index into protocol.change.OPS
    fields BLOB NOT NULL,      -- msgpack map of the fields written
    hlc INTEGER NOT NULL,
    parent INTEGER NOT NULL
);
-- The outbox row holding the latest change of each summary record (protocol.summary): while it is
-- not yet claimed by the batcher, later increments update it in place instead of adding a row.
CREATE TABLE IF NOT EXISTS summary_outbox (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,   -- batch sequence: contiguous from 1
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sealed BLOB NOT NULL,      -- the exact bytes sent, so a resend is identical
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS error_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,     -- the record as submitted (JSON), or as last fixed
    errors TEXT NOT NULL,      -- why it was refused: [{stage, rule, field, message}] (JSON)
    source TEXT,               -- where it came from (request body, file name) and line
    line INTEGER,
    received_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',   -- open | resubmitted | discarded
    resolved_ms INTEGER,
    note TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS error_queue_once ON error_queue (collection, key, payload)
    WHERE status = 'open';
"""

V1_META: dict[str, Any] = {
    "next_change_seq": 1,
    "next_batch_seq": 1,
    "sealed_through": 0,
    # Outbox rows up to here are being sealed: never updated in place again (summary records).
    "claimed_through": 0,
    "acked_batch": 0,
    "clock_last": 0,
    "feed_cursor": 0,
    "groups": "[]",  # JSON: this node's groups as HQ last said (source_of_truth, review)
    "hq_offset_ms": 0,
    "last_contact_ms": 0,
    "last_error": "",
    "last_error_ms": 0,
    "acked_changes": 0,
    "sent_bytes": 0,
}

# Version 2: what a restore recovery needs to be shown and audited (agent.restore, `status`).
V2_META: dict[str, Any] = {
    "hq_refusal": "",  # JSON: HQ's last refusal of a batch (409 "diverged"), until it is resolved
    "recovery_count": 0,  # restore recoveries done on this database
    "last_recovery": "",  # JSON: what the last one did (HQ's marks, seqs renumbered, batches dropped)
}

# Queues an upgrade must never shrink.
QUEUES = ("outbox", "batches", "error_queue", "conflicts")


class MigrationError(Exception):
    """agent.db cannot be brought to this agent's schema; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    apply: Callable[[aiosqlite.Connection], Awaitable[None]]


async def _script(db: aiosqlite.Connection, sql: str) -> None:
    """Run `sql` statement by statement inside the current transaction (executescript would
    commit it)."""
    for statement in sql.split(";\n"):
        if statement.strip():
            await db.execute(statement)


async def _defaults(db: aiosqlite.Connection, values: dict[str, Any]) -> None:
    await db.executemany("INSERT OR IGNORE INTO meta (k, v) VALUES (?, ?)", values.items())


async def _v1(db: aiosqlite.Connection) -> None:
    await _script(db, V1_SCHEMA)
    await _defaults(db, V1_META)


async def _v2(db: aiosqlite.Connection) -> None:
    await _defaults(db, V2_META)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "base schema: records, outbox, batches, error queue, conflicts, meta", _v1),
    Migration(2, "restore recovery: HQ's refusal and the last recovery in meta", _v2),
)
LATEST = MIGRATIONS[-1].version


async def schema_version(db: aiosqlite.Connection) -> int:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _queue_sizes(db: aiosqlite.Connection) -> dict[str, int]:
    sizes = {}
    for table in QUEUES:
        async with db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None or not row[0]:
            sizes[table] = 0
            continue
        async with db.execute(f"SELECT count(*) FROM {table}") as cursor:
            row = await cursor.fetchone()
        sizes[table] = int(row[0]) if row else 0
    return sizes


async def migrate(db: aiosqlite.Connection, path: Path) -> int:
    """Bring the database on `db` (autocommit connection) to LATEST; returns the version found."""
    found = await schema_version(db)
    if found > LATEST:
        raise MigrationError(
            f"{path}: schema version {found} is newer than this agent knows ({LATEST}): "
            "it was used by a newer fieldsync; upgrade fieldsync-agent (never open it with an "
            "older one)"
        )
    for step in MIGRATIONS:
        if step.version <= found:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Another process (the CLI beside the daemon) may have migrated meanwhile.
            if await schema_version(db) >= step.version:
                await db.execute("ROLLBACK")
                continue
            before = await _queue_sizes(db)
            await step.apply(db)
            after = await _queue_sizes(db)
            lost = {t: (before[t], after[t]) for t in QUEUES if after[t] < before[t]}
            if lost:
                raise MigrationError(
                    f"{path}: migration {step.version} ({step.description}) would drop queued "
                    f"rows {lost}; nothing was changed"
                )
            await db.execute(f"PRAGMA user_version = {step.version}")
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
    return found
