"""HQ's durable state behind one small interface: nodes, enrolment tokens, records, change log, audit.

`HQStore` is the plug point (a PostgreSQL implementation comes later and must pass the same
conformance tests); `SQLiteHQStore` is the default. Every method's docstring is its contract.

SQLite layout and habits:

- One writer connection; writes are serialized by an asyncio.Lock and each runs in `BEGIN IMMEDIATE`,
  so a transaction never upgrades from read to write halfway (no SQLITE_BUSY mid-transaction) and
  other processes (the CLI) wait on `busy_timeout` instead of failing.
- A separate read-only connection for reads: WAL lets them proceed while a batch is being written,
  and a single SELECT sees one committed snapshot.
- WAL with `synchronous=FULL`: a committed batch survives power loss, which is what an ack promises.
- Batch SQL only. aiosqlite costs ~150 us per awaited call, so ingest does a fixed number of calls per
  batch (`executemany`, `json_each` for key lists), never one per change.
- Times are integer milliseconds since the Unix epoch (UTC).

Error hierarchy::

    StoreError               the store cannot do what was asked (I/O, schema, bad argument)
    ├── NodeNotFound         no such node (or, by name, none active)
    ├── AmbiguousNode        a name matches several nodes; use the node id
    ├── NodeRevoked          the node was revoked (e.g. between key lookup and ingest)
    ├── EnrollmentRefused    token unknown, used, expired or for another node; key revoked or
    │                        already enrolled (`.code`, one of ENROL_CODES)
    ├── UnstorableChange     a change's values cannot be stored (not JSON-compatible)
    ├── ConflictNotFound     no conflict with this id
    ├── ConflictNotOpen      the conflict is already resolved (or was logged as settled)
    └── ApiTokenNotFound     no API token with this name
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import msgpack
import orjson

from hq_server.conflicts import (
    HQ_WRITER,
    Correction,
    Judge,
    QueueEvent,
    Writer,
    skew_candidates,
)
from hq_server.logs import event
from protocol.change import Change, Op
from protocol.hlc import MAX_HLC, physical_ms, system_ms
from protocol.hlc import pack as pack_hlc
from protocol.identity import node_id_for
from protocol.merge import NO_POLICIES, FieldPolicies, RecordState, Stamp

log = logging.getLogger("fieldsync.hq.store")

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    acked_through INTEGER NOT NULL DEFAULT 0,
    last_contact INTEGER,
    clock_offset_ms INTEGER,
    flagged_reason TEXT,
    groups TEXT NOT NULL DEFAULT '[]',  -- JSON list of "group:NAME" (source_of_truth, review)
    -- The node's high marks (its own changes in the change log), kept by every ingest: what a node
    -- whose database went back in time must renumber and re-stamp above (see IngestResult).
    change_seq INTEGER NOT NULL DEFAULT 0,  -- highest origin seq
    max_hlc INTEGER NOT NULL DEFAULT 0      -- highest HLC
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by_node TEXT,
    groups TEXT NOT NULL DEFAULT '[]',  -- given to the node that enrols with the token
    -- Set: the token re-enrols this node (its key) and nothing else; NULL: it enrols a new key.
    reenroll_node TEXT
);
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    stamps TEXT NOT NULL,
    tombstone TEXT,
    version INTEGER NOT NULL,
    updated_seq INTEGER NOT NULL,
    heads TEXT,  -- JSON {field: [[hlc, origin, parent, value], ...]} for review fields
    PRIMARY KEY (collection, key)
);
CREATE TABLE IF NOT EXISTS changelog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    origin_seq INTEGER NOT NULL,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    op TEXT NOT NULL,
    fields BLOB NOT NULL,
    hlc INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    UNIQUE (origin, origin_seq)
);
-- Every change to one record, oldest first: the common ancestor of a conflict's sides.
CREATE INDEX IF NOT EXISTS changelog_record ON changelog (collection, key);
CREATE TABLE IF NOT EXISTS conflicts (
    -- The conflict queue (status open: review conflicts waiting for a person) and the conflict
    -- log (status resolved, or auto for lww losers, refused source_of_truth writes and
    -- clock-bounded stamps). At most one open entry per record field.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    field TEXT NOT NULL,
    policy TEXT NOT NULL,     -- review | lww | source_of_truth | clock
    status TEXT NOT NULL,     -- open | resolved | auto
    sides TEXT NOT NULL,      -- JSON [{value, hlc, origin, parent?}], highest stamp first
    ancestor TEXT,            -- JSON {value, hlc, origin} the sides started from, or null
    reviewer TEXT,            -- group:NAME that may resolve it offline; null: HQ only
    note TEXT NOT NULL DEFAULT '',
    opened_at INTEGER NOT NULL,
    opened_seq INTEGER NOT NULL,  -- change-log entry that opened (or settled) it
    closed_at INTEGER,
    closed_seq INTEGER,
    resolution TEXT           -- JSON {value, origin, seq, by?, note?}
);
CREATE UNIQUE INDEX IF NOT EXISTS conflicts_open ON conflicts (collection, key, field)
    WHERE status = 'open';
CREATE INDEX IF NOT EXISTS conflicts_status ON conflicts (status, id);
CREATE TABLE IF NOT EXISTS skewed_stamps (
    -- Stamps that arrived far ahead of HQ's clock, with the real time HQ estimates for them
    -- (hq_server.conflicts): what clock bounding compares instead of the stamp.
    origin TEXT NOT NULL,
    hlc INTEGER NOT NULL,
    real_ms INTEGER NOT NULL,
    PRIMARY KEY (origin, hlc)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS field_stand_ins (
    -- What a write of one field counts as for source_of_truth (hq_server.conflicts): an HQ
    -- correction counts as the write it restored, a non-owner's initial value as nothing (0, '').
    hlc INTEGER NOT NULL,
    origin TEXT NOT NULL,
    field TEXT NOT NULL,
    for_hlc INTEGER NOT NULL,
    for_origin TEXT NOT NULL,
    PRIMARY KEY (hlc, origin, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch_digests (
    -- What every applied batch held (ingest.batch_digest: change sequences, timestamps, ops,
    -- keys): a batch with a known number but other content comes from a node whose database
    -- went back in time (a restored backup) and is refused instead of taken for a duplicate.
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (node_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_tokens (
    -- Bearer tokens of the admin API (/v1/admin/...). Only the SHA-256 of a token is kept; a
    -- revoked token stays listed, and its name may be given to a new token.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active ON api_tokens (name)
    WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_NODE_COLUMNS = (
    "node_id, name, public_key, enrolled_at, revoked_at, acked_through, last_contact, "
    "clock_offset_ms, flagged_reason, groups, change_seq, max_hlc"
)
_RECORD_COLUMNS = "collection, key, data, stamps, tombstone, version, updated_seq, heads"
# Schema changes from an older version, applied in order when an older database is opened.
_MIGRATIONS: dict[int, str] = {
    2: """
    ALTER TABLE nodes ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tokens ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE records ADD COLUMN heads TEXT;
    """,
    # The nodes' high marks, from the change log (the (origin, origin_seq) index serves the first).
    3: """
    ALTER TABLE nodes ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN max_hlc INTEGER NOT NULL DEFAULT 0;
    UPDATE nodes SET
        change_seq = (SELECT COALESCE(MAX(origin_seq), 0) FROM changelog WHERE origin = node_id),
        max_hlc = (SELECT COALESCE(MAX(hlc), 0) FROM changelog WHERE origin = node_id);
    """,
    # Re-enrolment tokens (tokens made before could enrol any key, enrolled or not: they now
    # enrol new keys only).
    4: """
    ALTER TABLE tokens ADD COLUMN reenroll_node TEXT;
    """,
}
_ALIVE = "stamps != '{}'"


def _dumps(value: Any) -> str:
    """Compact JSON for the database. orjson: ~6x faster than `json` on the ingest hot path, which
    is what keeps ingest above 20k changes/s. Refuses non-string keys and out-of-range integers
    (TypeError); ingest validation refuses NaN/Infinity before values get here."""
    return orjson.dumps(value).decode()


_loads = orjson.loads
_pack = msgpack.Packer(use_bin_type=True).pack
_INSERT_LOG = (
    "INSERT INTO changelog(seq, origin, origin_seq, collection, key, op, fields, hlc, parent, "
    "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_RECORD = (
    f"INSERT INTO records({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(collection, key) DO UPDATE SET data = excluded.data, "
    "stamps = excluded.stamps, tombstone = excluded.tombstone, "
    "version = excluded.version, updated_seq = excluded.updated_seq, heads = excluded.heads"
)


def _record_rows(
    states: dict[tuple[str, str], RecordState], items: Sequence[tuple[tuple[str, str], int]]
) -> list[tuple[Any, ...]]:
    """Storage rows for merged records; UnstorableChange if a value is not JSON-compatible."""
    out = []
    try:
        for (collection, key), updated_seq in items:
            state = states[(collection, key)]
            values, stamps, tomb = state.to_storage()
            heads = state.heads_to_storage()
            out.append(
                (
                    collection,
                    key,
                    _dumps(values),
                    _dumps(stamps),
                    None if tomb is None else _dumps(tomb),
                    state.version,
                    updated_seq,
                    None if heads is None else _dumps(heads),
                )
            )
    except (TypeError, ValueError, OverflowError) as e:
        raise UnstorableChange(f"a change holds a value that cannot be stored ({e})") from e
    return out


def _unseen(changes: Sequence[Change], held: Mapping[tuple[str, int], Any]) -> list[Change]:
    """Changes whose id is neither in `held` (the change log) nor earlier in `changes`."""
    seen = set(held)
    fresh = []
    for change in changes:
        if change.change_id not in seen:
            seen.add(change.change_id)
            fresh.append(change)
    return fresh


def _canonical(fields: Any) -> bytes | None:
    """Fields in one byte form whatever their order or encoding (None if they have none): True
    is not 1, 1 is not 1.0, as in storage and on the wire."""
    try:
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None


def _same(held: Sequence[Any] | None, change: Change) -> bool:
    """False if the change log holds another write under this change's id: a node sends a change
    only as it made it (a resend, even re-sealed into another batch, is identical), so other
    content means its database went back in time and reused the number."""
    if held is None:
        return True
    hlc, parent, op, collection, key, fields = held
    if (hlc, parent, op, collection, key) != (
        change.hlc,
        change.parent,
        change.op,
        change.collection,
        change.key,
    ):
        return False
    mine = _canonical(change.fields)
    return mine is not None and mine == _canonical(msgpack.unpackb(fields, raw=False))


def _span(seqs: Iterable[int]) -> tuple[int, int] | None:
    """(lowest, highest) of `seqs`; None if there are none."""
    listed = list(seqs)
    return (min(listed), max(listed)) if listed else None


# --------------------------------------------------------------------------------------- errors


class StoreError(Exception):
    """The store could not do what was asked; the message says which step failed."""


class NodeNotFound(StoreError):
    pass


class AmbiguousNode(StoreError):
    pass


class NodeRevoked(StoreError):
    pass


class UnstorableChange(StoreError):
    pass


class EnrollmentRefused(StoreError):
    """An enrolment the store refused; `code` is a stable machine-readable reason (ENROL_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


# ---------------------------------------------------------------------------------- data types


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    name: str
    public_key: bytes
    enrolled_at: int
    revoked_at: int | None
    acked_through: int
    last_contact: int | None
    clock_offset_ms: int | None
    flagged_reason: str | None
    groups: tuple[str, ...] = ()  # "group:NAME": what it owns (source_of_truth) and reviews
    change_seq: int = 0  # highest change (origin) sequence HQ holds from the node
    max_hlc: int = 0  # highest HLC among the node's changes HQ holds

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class IngestStatus(enum.Enum):
    APPLIED = "applied"  # the batch was the next one: stored, acked_through advanced
    DUPLICATE = "duplicate"  # already stored: nothing changed, ack again
    GAP = "gap"  # an earlier batch is missing: nothing changed, ask for `expected`
    # A known batch number with other content, or a new batch reusing change sequences HQ holds
    # with other content: the node's database went back in time. Nothing changed, refuse.
    DIVERGED = "diverged"


@dataclass(frozen=True, slots=True)
class IngestResult:
    status: IngestStatus
    acked_through: int  # the node's high-water mark after this call
    appended: int = 0  # changes appended to the change log
    skipped: int = 0  # changes whose (origin, seq) was already in the change log, identical
    change_seq: int = 0  # highest change sequence HQ holds from the node after this call
    max_hlc: int = 0  # highest HLC HQ holds from the node's changes after this call
    # DIVERGED: the change sequences at fault, (first, last) -- those HQ holds with other content,
    # or the batch's whole range when the batch number itself is reused. None otherwise.
    seqs: tuple[int, int] | None = None

    @property
    def expected(self) -> int:
        """The batch sequence HQ wants next from this node."""
        return self.acked_through + 1


@dataclass(frozen=True, slots=True)
class FeedPage:
    changes: list[Change]
    cursor: int  # pass back as `cursor` to continue after this page
    more: bool  # True if another page is ready now


@dataclass(frozen=True, slots=True)
class StoredRecord:
    collection: str
    key: str
    state: RecordState
    version: int
    updated_seq: int  # change-log seq of the last change applied to this record

    @property
    def data(self) -> dict[str, Any]:
        return self.state.values

    @property
    def deleted(self) -> bool:
        return not self.state.alive


@dataclass(frozen=True, slots=True)
class ConflictEntry:
    """One entry of the conflict queue (status "open") or log ("resolved", "auto")."""

    id: int
    collection: str
    key: str
    field: str
    policy: str  # review | lww | source_of_truth | clock
    status: str  # open | resolved | auto
    sides: list[dict[str, Any]]  # {value, hlc, origin, parent?}, highest stamp first
    ancestor: dict[str, Any] | None  # {value, hlc, origin}: what the sides started from
    reviewer: str | None  # group:NAME that may resolve it offline; None: HQ only
    note: str
    opened_at: int
    closed_at: int | None
    resolution: dict[str, Any] | None  # {value, origin, seq, op, by?, note?}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConflictNotFound(StoreError):
    pass


class ConflictNotOpen(StoreError):
    pass


class ApiTokenNotFound(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An admin-API token as stored (never the token itself)."""

    name: str
    created_at: int
    created_by: str
    revoked_at: int | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def actor(self) -> str:
        """Who the audit log names for what the token does."""
        return f"api:{self.name}"


@dataclass(frozen=True, slots=True)
class IssuedApiToken:
    token: str  # shown once; only its SHA-256 is stored
    name: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str  # shown once; only its SHA-256 is stored
    node_name: str
    expires_at: int
    reenroll_node: str | None = None  # the node (id) a re-enrolment token is for


# Why an enrolment is refused (EnrollmentRefused.code; HTTP 403, nothing changed, audited as
# node.enroll_refused).
ENROL_CODES = {
    "token_invalid": "the token is not one HQ issued",
    "token_used": "the token was used already (tokens are one-time)",
    "token_expired": "the token's lifetime is over",
    "key_revoked": "the key belongs to a revoked node (revocation is final: make a new key)",
    "already_enrolled": "the key is enrolled already, and the token is not a re-enrolment "
    "token made for its node (token create --node NAME --reenroll)",
    "wrong_node": "the token re-enrols another node than the one the key belongs to (or the key "
    "is not enrolled)",
}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: int
    actor: str
    action: str
    detail: dict[str, Any]
    hash: str


GROUP = re.compile(r"group:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
API_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Enrolment tokens start with a fixed prefix: never with "-" (a command line would take the token
# for an option), and recognisable to secret scanners.
ENROL_TOKEN_PREFIX = "fse_"
API_TOKEN_PREFIX = "fsa_"  # recognisable in a leaked file or a secret scanner


def check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """Node groups as stored: "group:NAME" (a bare NAME gets the prefix), sorted, no repeats."""
    out = set()
    for group in groups:
        name = group if group.startswith("group:") else f"group:{group}"
        if GROUP.fullmatch(name) is None:
            raise StoreError(
                f"node group {group!r}: use letters, digits, '_', '.' or '-' (at most 64)"
            )
        out.add(name)
    return tuple(sorted(out))


def token_hash(token: str) -> str:
    """The stored form of a token: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _audit_hash(prev: str, at: int, actor: str, action: str, detail: str) -> str:
    line = json.dumps([prev, at, actor, action, detail], separators=(",", ":"))
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------- interface


class HQStore(Protocol):
    """Everything HQ keeps. Implementations must pass tests/test_hq_store.py."""

    origin: str  # HQ's node id: the origin of the changes HQ writes ("" if it writes none)

    async def open(self) -> None:
        """Create or migrate the schema and get ready; StoreError if the store is unusable."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def get_node(self, node_id: str) -> Node | None:
        """The node with this id, revoked or not; None if it never enrolled."""

    async def list_nodes(self) -> list[Node]:
        """Every node ever enrolled, by name then id."""

    async def find_node(self, ref: str) -> Node:
        """A node by id, else by name among active nodes (else among all).

        NodeNotFound if nothing matches; AmbiguousNode if a name matches several nodes.
        """

    async def create_token(
        self,
        node_name: str,
        ttl_ms: int,
        *,
        actor: str,
        groups: Sequence[str] = (),
        reenroll: bool = False,
    ) -> IssuedToken:
        """Issue a one-time enrolment token bound to `node_name`, valid for `ttl_ms`; audited.

        An ordinary token enrols a new key as a node named `node_name` with `groups`. With
        `reenroll`, `node_name` is an existing node (id, or name as `find_node` takes it) and the
        token enrols that node's key again, and no other; `groups`, if any, replace the node's.
        NodeNotFound / AmbiguousNode if there is no such node or several; StoreError if it is
        revoked. Only the token's hash is stored: the returned token cannot be recovered later.
        """

    async def enroll(self, token: str, public_key: bytes, *, name_hint: str = "") -> Node:
        """Consume `token` and register `public_key` under the token's node name, atomically.

        The name is always the token's; `name_hint` (what the agent calls itself) is only
        audited. A key already enrolled needs a re-enrolment token made for its node, which keeps
        the node's id, name, acked_through and high marks (nothing is replayed or lost). Raises
        EnrollmentRefused (a code of ENROL_CODES) and then changes nothing but the audit log.
        Every attempt is audited: node.enroll, or node.enroll_refused with the code.
        """

    async def revoke_node(self, node_id: str, *, actor: str) -> tuple[Node, bool]:
        """Revoke a node: from then on its batches and requests are refused. Audited.

        Idempotent: returns (node, False) if it was already revoked. NodeNotFound if unknown.
        Its data and acked_through are kept.
        """

    async def ingest(
        self,
        node_id: str,
        batch_seq: int,
        changes: Sequence[Change],
        *,
        clock_offset_ms: int | None = None,
        flag: str | None = None,
        digest: bytes | None = None,
    ) -> IngestResult:
        """Store batch `batch_seq` of `node_id` exactly once, in one transaction.

        batch_seq <= acked_through: DUPLICATE, data unchanged -- or DIVERGED if `digest` differs
        from the stored batch's (seqs: the batch's change range). batch_seq > acked_through + 1:
        GAP, data unchanged. Otherwise, if the change log holds any of the changes' ids (origin,
        seq) with other content (stamp, parent, op, collection, key or fields), DIVERGED (seqs:
        those changes' range), data unchanged: HQ never acks a change it did not apply. Else
        every change not yet in the log is merged into its record and appended to the log
        (identical ones are skipped), acked_through becomes batch_seq and the node's change_seq
        and max_hlc cover the batch: APPLIED. Every result carries those high marks. In all
        cases the node's last_contact and clock_offset_ms are updated and a non-None `flag` is
        recorded as its flagged_reason. NodeNotFound / NodeRevoked if the node cannot send;
        UnstorableChange (nothing stored) if a value cannot be stored. Callers validate the
        batch (origins, sequences) before calling.
        """

    async def feed(self, node_id: str, cursor: int, limit: int, *, max_bytes: int) -> FeedPage:
        """Up to `limit` change-log entries after `cursor`, in log order, excluding the node's own.

        The returned cursor also skips the node's own entries, so an agent never re-reads them.
        Stops early (more=True) once the page holds about `max_bytes` of field data.
        """

    async def touch_node(self, node_id: str, *, clock_offset_ms: int | None) -> None:
        """Record a contact (e.g. an authenticated feed request) from the node."""

    async def flag_node(self, node_id: str, reason: str) -> None:
        """Record why a node needs an operator's attention (e.g. its clock is far ahead)."""

    async def get_record(self, collection: str, key: str) -> StoredRecord | None:
        """The record's merged state (deleted records included); None if never written."""

    async def list_records(
        self, collection: str, *, after_key: str = "", limit: int = 1000, deleted: bool = False
    ) -> list[StoredRecord]:
        """Records of a collection ordered by key, after `after_key` (paging); live ones only
        unless `deleted`."""

    async def count_records(self, collection: str, *, deleted: bool = False) -> int:
        """Number of live records in a collection (all records if `deleted`)."""

    async def changelog_count(self) -> int:
        """Number of entries in the change log."""

    async def audit_log(self) -> list[AuditEntry]:
        """Every audit entry, oldest first."""

    async def verify_audit(self) -> int | None:
        """Id of the first audit entry whose hash chain does not verify; None if all do."""

    async def get_meta(self, key: str) -> str | None:
        """A small persistent setting (e.g. HQ's last clock value); None if unset."""

    async def set_meta(self, key: str, value: str) -> None:
        """Set a small persistent setting."""

    async def set_groups(self, node_id: str, groups: Sequence[str], *, actor: str) -> Node:
        """Replace a node's groups (normalised by `check_groups`); audited. NodeNotFound if
        unknown; StoreError naming the bad group, and nothing changed, if one is malformed."""

    async def list_conflicts(
        self,
        *,
        status: str | None = "open",
        collection: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[ConflictEntry]:
        """Conflicts with id > `after_id`, by id, at most `limit`; `status` None: any status."""

    async def get_conflict(self, conflict_id: int) -> ConflictEntry:
        """One conflict; ConflictNotFound if there is none with this id."""

    async def write_record(
        self,
        collection: str,
        key: str,
        fields: dict[str, Any],
        *,
        actor: str,
        action: str,
        detail: dict[str, Any] | None = None,
    ) -> Change:
        """Write fields of a record as a change of HQ's own, applied and sent to every node like
        any change; audited as `action`. UnstorableChange if a value cannot be stored."""

    async def resolve_conflict(
        self, conflict_id: int, value: Any, *, actor: str, note: str = ""
    ) -> ConflictEntry:
        """Settle an open review conflict with `value`, written by HQ as a change covering every
        side; audited as conflict.resolve. Nothing changes on error: ConflictNotFound if
        unknown, ConflictNotOpen if not open, UnstorableChange if the value cannot be stored."""

    async def create_api_token(self, name: str, *, actor: str) -> IssuedApiToken:
        """Issue an admin-API token named `name` (letters, digits, '_', '.', '-'); audited as
        api_token.create. Only its SHA-256 is stored. StoreError if the name is malformed or an
        active token already has it."""

    async def revoke_api_token(self, name: str, *, actor: str) -> bool:
        """Revoke the active token named `name`; audited as api_token.revoke. Idempotent: False
        if it was already revoked. ApiTokenNotFound if no token ever had this name."""

    async def list_api_tokens(self) -> list[ApiToken]:
        """Every API token ever issued (revoked ones too), by name then creation."""

    async def check_api_token(self, token: str) -> ApiToken | None:
        """The active token whose hash matches `token`; None for an unknown or revoked one.
        Looked up by hash, so the comparison leaks nothing about stored tokens."""


# ------------------------------------------------------------------------------ implementation


class SQLiteHQStore:
    """`HQStore` on one SQLite file. `wall` returns the current time in ms (tests inject it).

    With `create=False` (the CLI), a missing database is an error rather than a new empty one: a
    wrong data_dir must not yield tokens the server never sees.
    """

    def __init__(
        self,
        path: Path,
        *,
        wall: Callable[[], int] = system_ms,
        create: bool = True,
        policies: Mapping[str, FieldPolicies] | None = None,
        origin: str = "",
        max_ahead_ms: int = 300_000,
    ) -> None:
        """`policies` are the collections' conflict policies (none: every field lww); `origin` is
        HQ's node id, the origin of the changes HQ writes itself (resolutions, corrections);
        `max_ahead_ms` how far ahead of HQ's clock a stamp may be before it is bounded."""
        self.path = path
        self._wall = wall
        self._create = create
        self.policies = dict(policies or {})
        self.origin = origin
        self.max_ahead_ms = max_ahead_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    # -- lifecycle

    async def open(self) -> None:
        if not self._create and not self.path.exists():
            raise StoreError(
                f"no HQ database at {self.path}: check hq.data_dir "
                "(`fieldsync-hq serve` creates it on first start)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                # Records hold personal data: create the file private; SQLite gives the -wal and
                # -shm files the same mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._writer = await self._connect()
            await self._writer.execute_fetchall("PRAGMA journal_mode=WAL")
            await self._writer.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            await self._writer.execute_fetchall(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            rows = await self._writer.execute_fetchall(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            )
            version = int(next(iter(rows))[0])
            if version < SCHEMA_VERSION:
                version = await self._migrate(version)
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version}, this build knows {SCHEMA_VERSION}"
                )
            self._reader = await self._connect()
            await self._reader.execute_fetchall("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise StoreError(f"open {self.path}: {e}") from e
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, version: int) -> int:
        """Bring an older database to this build's schema, one version at a time, atomically."""
        steps = "".join(_MIGRATIONS[v] for v in range(version + 1, SCHEMA_VERSION + 1))
        await self._w.executescript(
            f"BEGIN IMMEDIATE;{steps}"
            f"UPDATE meta SET value = '{SCHEMA_VERSION}' WHERE key = 'schema_version';COMMIT;"
        )
        return SCHEMA_VERSION

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        # Pragmas that answer with a row must be fetched, or the statement stays "in progress".
        await conn.execute_fetchall(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await conn.execute_fetchall("PRAGMA synchronous=FULL")
        return conn

    async def close(self) -> None:
        for name in ("_reader", "_writer"):
            conn = getattr(self, name)
            setattr(self, name, None)
            if conn is not None:
                await conn.close()

    async def __aenter__(self) -> SQLiteHQStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreError("store is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("store is not open")
        return self._reader

    @contextlib.asynccontextmanager
    async def _transaction(self, step: str) -> AsyncIterator[aiosqlite.Connection]:
        """One serialized write transaction; rolled back on any error or cancellation.

        aiosqlite finishes a call even when the awaiting task is cancelled, and runs calls in
        order, so the shielded ROLLBACK is queued before any later BEGIN.
        """
        async with self._write_lock:
            conn = self._w
            try:
                # Inside the try: a task cancelled while BEGIN runs must still roll back, or the
                # connection would stay in a transaction and refuse every later BEGIN.
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.shield(conn.execute("ROLLBACK"))
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"{step}: {e}") from e
                raise

    def transaction(
        self, step: str
    ) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        """A serialized write transaction, for modules keeping their own tables in this database
        (the router): one writer, so their writes and ingest never contend."""
        return self._transaction(step)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Read-only query on the reader connection; sqlite3 errors become StoreError."""
        return await self._read(sql, params)

    async def audit(
        self, conn: aiosqlite.Connection, actor: str, action: str, detail: dict[str, Any]
    ) -> None:
        """Append a hash-chained audit entry inside the caller's transaction."""
        await self._audit(conn, actor, action, detail)

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return list(await self._r.execute_fetchall(sql, params))
        except sqlite3.Error as e:
            raise StoreError(f"read: {e}") from e

    # -- nodes

    @staticmethod
    def _node(row: Sequence[Any]) -> Node:
        return Node(
            node_id=row[0],
            name=row[1],
            public_key=bytes(row[2]),
            enrolled_at=row[3],
            revoked_at=row[4],
            acked_through=row[5],
            last_contact=row[6],
            clock_offset_ms=row[7],
            flagged_reason=row[8],
            groups=tuple(_loads(row[9])),
            change_seq=row[10],
            max_hlc=row[11],
        )

    async def get_node(self, node_id: str) -> Node | None:
        rows = await self._read(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,))
        return self._node(rows[0]) if rows else None

    async def list_nodes(self) -> list[Node]:
        rows = await self._read(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name, node_id")
        return [self._node(r) for r in rows]

    async def find_node(self, ref: str) -> Node:
        node = await self.get_node(ref)
        if node is not None:
            return node
        rows = await self._read(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?", (ref,))
        named = [self._node(r) for r in rows]
        candidates = [n for n in named if n.active] or named
        if not candidates:
            raise NodeNotFound(f"no node with id or name {ref!r}")
        if len(candidates) > 1:
            ids = ", ".join(n.node_id for n in candidates)
            raise AmbiguousNode(f"several nodes are named {ref!r} ({ids}); give the node id")
        return candidates[0]

    async def _audit(
        self, conn: aiosqlite.Connection, actor: str, action: str, detail: dict[str, Any]
    ) -> None:
        """Append one hash-chained audit entry inside the caller's transaction."""
        rows = await conn.execute_fetchall("SELECT hash FROM audit ORDER BY id DESC LIMIT 1")
        prev = next(iter(rows))[0] if rows else ""
        at = self._wall()
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        digest = _audit_hash(prev, at, actor, action, text)
        await conn.execute(
            "INSERT INTO audit(at, actor, action, detail, hash) VALUES (?, ?, ?, ?, ?)",
            (at, actor, action, text, digest),
        )

    async def create_token(
        self,
        node_name: str,
        ttl_ms: int,
        *,
        actor: str,
        groups: Sequence[str] = (),
        reenroll: bool = False,
    ) -> IssuedToken:
        groups = check_groups(groups)
        if not node_name.strip():
            raise StoreError("create token: the node name must not be empty")
        if ttl_ms <= 0:
            raise StoreError("create token: the lifetime must be positive")
        token = ENROL_TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        now = self._wall()
        async with self._transaction("create token") as conn:
            node_id = None
            if reenroll:
                node = await self._node_for_reenrolment(conn, node_name)
                node_id, node_name = node.node_id, node.name
            issued = IssuedToken(token, node_name, now + ttl_ms, node_id)
            await conn.execute(
                "INSERT INTO tokens(token_hash, node_name, created_at, expires_at, groups, "
                "reenroll_node) VALUES (?, ?, ?, ?, ?, ?)",
                (digest, node_name, now, issued.expires_at, _dumps(list(groups)), node_id),
            )
            detail = {
                "node_name": node_name,
                "expires_at": issued.expires_at,
                "id": digest[:12],
                "groups": list(groups),
                "reenroll_node": node_id,
            }
            await self._audit(conn, actor, "token.create", detail)
        return issued

    async def _node_for_reenrolment(self, conn: aiosqlite.Connection, ref: str) -> Node:
        """The node `ref` names (id, else name as `find_node`), which must be active."""
        rows = await conn.execute_fetchall(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ? OR name = ? "
            "ORDER BY node_id = ? DESC",
            (ref, ref, ref),
        )
        nodes = [self._node(r) for r in rows]
        if nodes and nodes[0].node_id == ref:
            nodes = nodes[:1]
        candidates = [n for n in nodes if n.active] or nodes
        if not candidates:
            raise NodeNotFound(
                f"create token: no node with id or name {ref!r} to re-enrol "
                "(a new node needs a token without --reenroll)"
            )
        if len(candidates) > 1:
            ids = ", ".join(n.node_id for n in candidates)
            raise AmbiguousNode(f"several nodes are named {ref!r} ({ids}); give the node id")
        node = candidates[0]
        if not node.active:
            raise StoreError(
                f"create token: node {node.node_id} ({node.name}) was revoked and cannot be "
                "re-enrolled; enrol a new key with a token without --reenroll"
            )
        return node

    async def enroll(self, token: str, public_key: bytes, *, name_hint: str = "") -> Node:
        node_id = node_id_for(public_key)
        digest = token_hash(token)
        refusal: EnrollmentRefused | None = None
        async with self._transaction("enroll") as conn:
            try:
                return await self._enroll(conn, digest, node_id, public_key, name_hint)
            except EnrollmentRefused as e:
                # Nothing was written; the refusal is audited (and committed) all the same.
                refusal = e
                detail = {
                    "node_id": node_id,
                    "name_hint": name_hint,
                    "token_id": digest[:12],
                    "code": e.code,
                    "reason": str(e),
                }
                await self._audit(conn, node_id, "node.enroll_refused", detail)
        assert refusal is not None  # the transaction returned otherwise
        raise refusal

    async def _enroll(
        self,
        conn: aiosqlite.Connection,
        digest: str,
        node_id: str,
        public_key: bytes,
        name_hint: str,
    ) -> Node:
        """`enroll` inside its transaction: every check before the first write."""
        now = self._wall()
        rows = await conn.execute_fetchall(
            "SELECT node_name, expires_at, used_at, groups, reenroll_node FROM tokens "
            "WHERE token_hash = ?",
            (digest,),
        )
        if not rows:
            raise EnrollmentRefused("token_invalid", "enrolment token is not valid")
        name, expires_at, used_at, groups, reenroll_node = next(iter(rows))
        if used_at is not None:
            raise EnrollmentRefused(
                "token_used", "enrolment token was already used; ask HQ for a new one"
            )
        if expires_at <= now:
            raise EnrollmentRefused(
                "token_expired", "enrolment token has expired; ask HQ for a new one"
            )
        rows = await conn.execute_fetchall(
            "SELECT revoked_at, name FROM nodes WHERE node_id = ?", (node_id,)
        )
        existing = next(iter(rows)) if rows else None
        if existing is not None and existing[0] is not None:
            raise EnrollmentRefused(
                "key_revoked",
                f"node {node_id} was revoked; generate a new key and enrol with it",
            )
        if reenroll_node is None and existing is not None:
            raise EnrollmentRefused(
                "already_enrolled",
                f"this key is already enrolled as node {node_id} ({existing[1]}), and the token "
                f"enrols a new node ({name}); to enrol this node again, ask HQ for "
                f"`fieldsync-hq token create --node {node_id} --reenroll`",
            )
        if reenroll_node is not None and reenroll_node != node_id:
            which = "is not enrolled" if existing is None else f"is node {node_id} ({existing[1]})"
            raise EnrollmentRefused(
                "wrong_node",
                f"this token re-enrols node {reenroll_node} ({name}) only; the key presented "
                f"{which}",
            )
        await conn.execute(
            "UPDATE tokens SET used_at = ?, used_by_node = ? WHERE token_hash = ?",
            (now, node_id, digest),
        )
        if existing is None:
            await conn.execute(
                "INSERT INTO nodes(node_id, name, public_key, enrolled_at, groups) "
                "VALUES (?, ?, ?, ?, ?)",
                (node_id, name, public_key, now, groups),
            )
        elif _loads(groups):
            # A re-enrolment keeps the node as it is (id, name, marks); groups only if given.
            await conn.execute("UPDATE nodes SET groups = ? WHERE node_id = ?", (groups, node_id))
        detail = {
            "node_id": node_id,
            "name": name,
            "name_hint": name_hint,
            "reenrolled": existing is not None,
            "token_id": digest[:12],
        }
        if existing is not None and _loads(groups):
            detail["groups"] = _loads(groups)
        await self._audit(conn, node_id, "node.enroll", detail)
        rows = await conn.execute_fetchall(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)
        )
        return self._node(next(iter(rows)))

    async def set_groups(self, node_id: str, groups: Sequence[str], *, actor: str) -> Node:
        """Give a node its groups (replacing the old ones); the node learns them at its next
        contact. Audited: groups decide who may write source_of_truth fields."""
        groups = check_groups(groups)
        async with self._transaction("set node groups") as conn:
            rows = await conn.execute_fetchall(
                "SELECT groups FROM nodes WHERE node_id = ?", (node_id,)
            )
            if not rows:
                raise NodeNotFound(f"no node {node_id}")
            before = _loads(next(iter(rows))[0])
            await conn.execute(
                "UPDATE nodes SET groups = ? WHERE node_id = ?", (_dumps(list(groups)), node_id)
            )
            detail = {"node_id": node_id, "before": before, "after": list(groups)}
            await self._audit(conn, actor, "node.groups", detail)
            rows = await conn.execute_fetchall(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)
            )
            return self._node(next(iter(rows)))

    async def revoke_node(self, node_id: str, *, actor: str) -> tuple[Node, bool]:
        async with self._transaction("revoke node") as conn:
            cursor = await conn.execute(
                "UPDATE nodes SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
                (self._wall(), node_id),
            )
            changed = cursor.rowcount == 1
            rows = await conn.execute_fetchall(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)
            )
            if not rows:
                raise NodeNotFound(f"no node {node_id}")
            node = self._node(next(iter(rows)))
            if changed:
                await self._audit(
                    conn, actor, "node.revoke", {"node_id": node_id, "name": node.name}
                )
        return node, changed

    async def touch_node(self, node_id: str, *, clock_offset_ms: int | None) -> None:
        async with self._transaction("touch node") as conn:
            await conn.execute(
                "UPDATE nodes SET last_contact = ?, "
                "clock_offset_ms = COALESCE(?, clock_offset_ms) WHERE node_id = ?",
                (self._wall(), clock_offset_ms, node_id),
            )

    async def flag_node(self, node_id: str, reason: str) -> None:
        async with self._transaction("flag node") as conn:
            await conn.execute(
                "UPDATE nodes SET flagged_reason = ? WHERE node_id = ?", (reason, node_id)
            )

    # -- ingest

    async def ingest(
        self,
        node_id: str,
        batch_seq: int,
        changes: Sequence[Change],
        *,
        clock_offset_ms: int | None = None,
        flag: str | None = None,
        digest: bytes | None = None,
    ) -> IngestResult:
        now = self._wall()
        async with self._transaction("ingest") as conn:
            rows = await conn.execute_fetchall(
                "SELECT acked_through, revoked_at, groups, change_seq, max_hlc FROM nodes "
                "WHERE node_id = ?",
                (node_id,),
            )
            if not rows:
                raise NodeNotFound(f"node {node_id} is not enrolled")
            acked, revoked_at, groups, change_seq, max_hlc = next(iter(rows))
            if revoked_at is not None:
                raise NodeRevoked(f"node {node_id} was revoked")
            # Where HQ stands with the node; only an applied batch moves it.
            held_marks = IngestResult(
                IngestStatus.DUPLICATE, acked, change_seq=change_seq, max_hlc=max_hlc
            )
            if batch_seq <= acked:
                known = await conn.execute_fetchall(
                    "SELECT digest FROM batch_digests WHERE node_id = ? AND seq = ?",
                    (node_id, batch_seq),
                )
                same = digest is None or not known or bytes(next(iter(known))[0]) == digest
                if same:
                    # The digest leaves out the values (it must match resends of batches stored
                    # before it existed): compare the changes themselves with the log too.
                    held = await self._held(conn, changes)
                    same = all(_same(held.get(c.change_id), c) for c in changes)
                result = held_marks
                if not same:
                    span = _span(c.seq for c in changes)
                    result = replace(held_marks, status=IngestStatus.DIVERGED, seqs=span)
            elif batch_seq > acked + 1:
                result = replace(held_marks, status=IngestStatus.GAP)
            else:
                held = await self._held(conn, changes)
                reused = _span(c.seq for c in changes if not _same(held.get(c.change_id), c))
                if reused is not None:
                    result = replace(held_marks, status=IngestStatus.DIVERGED, seqs=reused)
                else:
                    writer = Writer(
                        frozenset({f"node:{node_id}", *_loads(groups)}),
                        clock_offset_ms=clock_offset_ms,
                    )
                    appended, skipped = await self._apply(conn, changes, now, writer, held=held)
                    result = IngestResult(
                        IngestStatus.APPLIED,
                        batch_seq,
                        appended,
                        skipped,
                        change_seq=max([change_seq, *(c.seq for c in changes)]),
                        max_hlc=max([max_hlc, *(c.hlc for c in changes)]),
                    )
                    if digest is not None:
                        await conn.execute(
                            "INSERT OR REPLACE INTO batch_digests (node_id, seq, digest)"
                            " VALUES (?, ?, ?)",
                            (node_id, batch_seq, digest),
                        )
            await conn.execute(
                "UPDATE nodes SET acked_through = ?, last_contact = ?, "
                "clock_offset_ms = COALESCE(?, clock_offset_ms), "
                "flagged_reason = COALESCE(?, flagged_reason), change_seq = ?, max_hlc = ? "
                "WHERE node_id = ?",
                (
                    result.acked_through,
                    now,
                    clock_offset_ms,
                    flag,
                    result.change_seq,
                    result.max_hlc,
                    node_id,
                ),
            )
        return result

    async def _apply(
        self,
        conn: aiosqlite.Connection,
        changes: Sequence[Change],
        now: int,
        writer: Writer,
        *,
        held: Mapping[tuple[str, int], Sequence[Any]] | None = None,
    ) -> tuple[int, int]:
        """Merge new changes into their records under the collections' policies, append them to
        the log, keep the conflict queue, and append the corrections HQ authors (see
        hq_server.conflicts); returns (appended, skipped) for the given changes. `held`: what
        `_held` found of them, when the caller has looked already.

        All rows are built first, then written with one `executemany` per table. (Overlapping the
        two -- queueing writes while encoding the next rows -- was measured slower: the sqlite3
        module retakes the GIL for every row and convoys behind the encoding thread.)
        """
        if held is None:
            held = await self._held(conn, changes)
        fresh = _unseen(changes, held)
        if not fresh:
            return 0, len(changes)
        states = await self._load_states(conn, fresh)
        judge = Judge(
            self.policies,
            now_ms=now,
            max_ahead_ms=self.max_ahead_ms,
            skewed_time=await self._skewed_times(conn, states.values(), now),
            stand_ins=await self._stand_ins(conn, states),
        )
        rows = await conn.execute_fetchall(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changelog'"
        )
        seq = next(iter(rows))[0] if rows else 0
        touched: dict[tuple[str, str], int] = {}
        log_rows = []
        events: list[tuple[Change, int, QueueEvent]] = []
        skewed: list[tuple[str, int, int]] = []
        stand_ins: list[tuple[int, str, str, int, str]] = []
        pending: deque[tuple[Change, Writer] | tuple[tuple[str, str], Correction]] = deque(
            (change, writer) for change in fresh
        )
        while pending:
            item = pending.popleft()
            if isinstance(item[1], Correction):
                # HQ's correction is made only now, right after what it corrects (or the
                # correction before it): its stamp must be above the record's version *now*.
                (collection, key), correction = item[0], item[1]
                try:
                    fix = await self._hq_change(
                        conn, collection, key, states[(collection, key)], now, correction=True
                    )
                except UnstorableChange as e:
                    # A record stamped at the end of the clock's range (accepted before such
                    # stamps were refused): logged, never a reason to refuse the node's batch.
                    event(log, logging.WARNING, "HQ could not write a correction", error=str(e))
                    continue
                change = replace(fix, op=correction.op, fields=correction.fields)
                author = Writer(
                    hq=True, stands_for=correction.stands_for, real_ms=correction.real_ms
                )
            else:
                change, author = item
            seq += 1
            state = states.setdefault((change.collection, change.key), RecordState())
            verdict = judge.apply(state, change, author)
            events.extend((change, seq, e) for e in verdict.events)
            real_ms = verdict.real_ms if verdict.real_ms is not None else verdict.skewed
            if real_ms is not None:
                skewed.append((change.origin, change.hlc, real_ms))
            stand_ins.extend(
                (*stamp, name, *counts_as) for stamp, name, counts_as in verdict.stand_ins
            )
            # HQ's corrections come next, before the batch's later changes.
            for correction in reversed(verdict.corrections):
                pending.appendleft(((change.collection, change.key), correction))
            touched[(change.collection, change.key)] = seq
            log_rows.append(
                (
                    seq,
                    change.origin,
                    change.seq,
                    change.collection,
                    change.key,
                    change.op,
                    _pack(change.fields),
                    change.hlc,
                    change.parent,
                    now,
                )
            )
        record_rows = _record_rows(states, list(touched.items()))
        await conn.executemany(_INSERT_LOG, log_rows)
        await conn.executemany(_UPSERT_RECORD, record_rows)
        if skewed:
            await conn.executemany(
                "INSERT OR REPLACE INTO skewed_stamps(origin, hlc, real_ms) VALUES (?, ?, ?)",
                skewed,
            )
        if stand_ins:
            await conn.executemany(
                "INSERT OR REPLACE INTO field_stand_ins(hlc, origin, field, for_hlc, for_origin) "
                "VALUES (?, ?, ?, ?, ?)",
                stand_ins,
            )
        # Settled conflicts (the lww log, reverts) in one statement: there can be one per field
        # of every change in a batch.
        await conn.executemany(
            "INSERT INTO conflicts(collection, key, field, policy, status, sides, note, "
            "opened_at, opened_seq, closed_at, closed_seq) "
            "VALUES (?, ?, ?, ?, 'auto', ?, ?, ?, ?, ?, ?)",
            [
                (
                    change.collection,
                    change.key,
                    e.field,
                    e.policy,
                    _dumps([side.to_json() for side in e.sides]),
                    e.note,
                    now,
                    at_seq,
                    now,
                    at_seq,
                )
                for change, at_seq, e in events
                if e.kind == "auto"
            ],
        )
        for change, at_seq, queue_event in events:
            if queue_event.kind != "auto":
                await self._queue(conn, change, at_seq, queue_event, now)
        return len(fresh), len(changes) - len(fresh)

    async def _stand_ins(
        self, conn: aiosqlite.Connection, states: dict[tuple[str, str], RecordState]
    ) -> dict[tuple[Stamp, str], Stamp]:
        """What the writes of source_of_truth fields in `states` count as (HQ's corrections, a
        non-owner's initial values), by (stamp, field); one query for the whole batch."""
        wanted = sorted(
            [stamp[0], stamp[1], name]
            for (collection, _), state in states.items()
            for name in self.policies.get(collection, NO_POLICIES).owners
            if (stamp := state.stamps.get(name)) is not None
        )
        if not wanted:
            return {}
        rows = await conn.execute_fetchall(
            "SELECT s.hlc, s.origin, s.field, s.for_hlc, s.for_origin FROM field_stand_ins s "
            "JOIN (SELECT json_extract(value, '$[0]') AS hlc, json_extract(value, '$[1]') AS "
            "origin, json_extract(value, '$[2]') AS field FROM json_each(?)) w "
            "ON s.hlc = w.hlc AND s.origin = w.origin AND s.field = w.field",
            (_dumps(wanted),),
        )
        return {((hlc, origin), name): (fh, fo) for hlc, origin, name, fh, fo in rows}

    async def _skewed_times(
        self, conn: aiosqlite.Connection, states: Iterable[RecordState], now: int
    ) -> dict[Stamp, int]:
        """Known real times of the stamps in `states` that are not their HLC's: stamps beyond
        HQ's clock bound, and HQ's corrections (which count with the restored write's time)."""
        states = list(states)
        wanted = skew_candidates(states, now, self.max_ahead_ms)
        wanted |= {s for state in states for s in state.stamps.values() if s[1] == self.origin}
        if not wanted:
            return {}
        rows = await conn.execute_fetchall(
            "SELECT s.hlc, s.origin, s.real_ms FROM skewed_stamps s JOIN "
            "(SELECT json_extract(value, '$[0]') AS hlc, json_extract(value, '$[1]') AS origin "
            "FROM json_each(?)) w ON s.hlc = w.hlc AND s.origin = w.origin",
            (_dumps(sorted([list(s) for s in wanted])),),
        )
        return {(hlc, origin): real_ms for hlc, origin, real_ms in rows}

    async def _hq_change(
        self,
        conn: aiosqlite.Connection,
        collection: str,
        key: str,
        state: RecordState,
        now: int,
        *,
        correction: bool = False,
    ) -> Change:
        """A new change authored by HQ on a record, with no fields yet: parent = the version HQ
        holds (it has seen every side), HLC above that version and every HLC HQ issued before,
        origin sequence the next of HQ's own. Taken inside the caller's transaction, so the
        server and a CLI process never issue the same sequence or stamp."""
        if not self.origin:
            raise StoreError("HQ cannot write changes: the store was opened without HQ's node id")
        rows = await conn.execute_fetchall(
            "SELECT key, value FROM meta WHERE key IN ('hq_change_seq', 'hq_last_hlc')"
        )
        meta = {k: int(v) for k, v in rows}
        seq = meta.get("hq_change_seq", 0) + 1
        # Above the record's version (which a wrong clock may have put far ahead) and above the
        # stamps HQ issued before -- but HQ's own sequence never inherits such a jump, or every
        # later HQ change would be stamped far ahead too.
        bound = now + self.max_ahead_ms
        last = meta.get("hq_last_hlc", 0)
        last = last if physical_ms(last) <= bound else 0
        # A correction is stamped just above the record (it must only outrank what it corrects,
        # not a node's later delete of the record); a new decision (resolution, system write)
        # at HQ's clock.
        hlc = state.version + 1 if correction else max(pack_hlc(now), state.version + 1, last + 1)
        if hlc > MAX_HLC:
            raise UnstorableChange(
                f"{collection}/{key}: HQ cannot stamp a change above the record's version "
                f"{state.version} (the end of the clock's range)"
            )
        last_kept = hlc if physical_ms(hlc) <= bound else max(last, pack_hlc(now))
        await conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [("hq_change_seq", str(seq)), ("hq_last_hlc", str(last_kept))],
        )
        return Change(collection, key, "upsert", {}, hlc, state.version, self.origin, seq)

    async def _queue(
        self, conn: aiosqlite.Connection, change: Change, seq: int, queued: QueueEvent, now: int
    ) -> None:
        """Record one conflict-queue event (see QueueEvent) in the conflicts table."""
        sides = _dumps([side.to_json() for side in queued.sides])
        where = (change.collection, change.key, queued.field)
        if queued.kind == "opened":
            ancestor = await self._ancestor(conn, change, queued)
            reviewer = self.policies.get(change.collection, NO_POLICIES).reviewers
            await conn.execute(
                "INSERT INTO conflicts(collection, key, field, policy, status, sides, ancestor, "
                "reviewer, opened_at, opened_seq) VALUES (?, ?, ?, 'review', 'open', ?, ?, ?, ?, ?)",
                (*where, sides, ancestor, reviewer.get(queued.field), now, seq),
            )
        elif queued.kind == "updated":
            await conn.execute(
                "UPDATE conflicts SET sides = ? WHERE collection = ? AND key = ? AND field = ? "
                "AND status = 'open'",
                (sides, *where),
            )
        else:  # closed
            winner = queued.sides[0] if queued.sides else None
            resolution = {
                "value": winner.value if winner else None,
                "origin": change.origin,
                "seq": change.seq,
                "op": change.op,
            }
            await conn.execute(
                "UPDATE conflicts SET status = 'resolved', closed_at = ?, closed_seq = ?, "
                "resolution = ? WHERE collection = ? AND key = ? AND field = ? "
                "AND status = 'open'",
                (now, seq, _dumps(resolution), *where),
            )

    @staticmethod
    async def _ancestor(
        conn: aiosqlite.Connection, change: Change, queued: QueueEvent
    ) -> str | None:
        """The last write to the field that every side had seen: what they both changed."""
        seen = min((side.parent or 0) for side in queued.sides)
        rows = await conn.execute_fetchall(
            "SELECT origin, hlc, fields FROM changelog WHERE collection = ? AND key = ? "
            "AND op = 'upsert' AND hlc <= ? ORDER BY hlc DESC, origin DESC",
            (change.collection, change.key, seen),
        )
        for origin, hlc, fields in rows:
            values = msgpack.unpackb(fields, raw=False)
            if queued.field in values:
                return _dumps({"value": values[queued.field], "hlc": hlc, "origin": origin})
        return None

    @staticmethod
    async def _held(
        conn: aiosqlite.Connection, changes: Sequence[Change]
    ) -> dict[tuple[str, int], Sequence[Any]]:
        """What the change log holds under the changes' ids: (origin, seq) -> (hlc, parent, op,
        collection, key, fields). One indexed query per origin; usually nothing is found."""
        by_origin: dict[str, list[int]] = {}
        for change in changes:
            by_origin.setdefault(change.origin, []).append(change.seq)
        held: dict[tuple[str, int], Sequence[Any]] = {}
        for origin, seqs in by_origin.items():
            rows = await conn.execute_fetchall(
                "SELECT origin_seq, hlc, parent, op, collection, key, fields FROM changelog "
                "WHERE origin = ? AND origin_seq IN (SELECT value FROM json_each(?))",
                (origin, _dumps(seqs)),
            )
            held.update(((origin, r[0]), r[1:]) for r in rows)
        return held

    @staticmethod
    async def _load_states(
        conn: aiosqlite.Connection, changes: Sequence[Change]
    ) -> dict[tuple[str, str], RecordState]:
        """Current state of every record the changes touch (empty state for new records)."""
        keys: dict[str, set[str]] = {}
        for change in changes:
            keys.setdefault(change.collection, set()).add(change.key)
        states: dict[tuple[str, str], RecordState] = {}
        for collection, names in keys.items():
            rows = await conn.execute_fetchall(
                "SELECT key, data, stamps, tombstone, heads FROM records WHERE collection = ? "
                "AND key IN (SELECT value FROM json_each(?))",
                (collection, _dumps(sorted(names))),
            )
            for key, data, stamps, tomb, heads in rows:
                states[(collection, key)] = RecordState.from_storage(
                    _loads(data),
                    _loads(stamps),
                    _loads(tomb) if tomb else None,
                    _loads(heads) if heads else None,
                )
            for name in names:
                states.setdefault((collection, name), RecordState())
        return states

    # -- downstream

    async def feed(self, node_id: str, cursor: int, limit: int, *, max_bytes: int) -> FeedPage:
        if limit < 1:
            raise StoreError("feed: limit must be at least 1")
        # One statement = one snapshot: `top` and the page agree, so skipping to `top` when the
        # page is short never skips a row committed in between.
        rows = await self._read(
            "SELECT m.top, c.seq, c.origin, c.origin_seq, c.collection, c.key, c.op, c.fields, "
            "c.hlc, c.parent FROM (SELECT COALESCE(MAX(seq), 0) AS top FROM changelog) AS m "
            "LEFT JOIN (SELECT * FROM changelog WHERE seq > ? AND origin != ? "
            "ORDER BY seq LIMIT ?) AS c ON 1 ORDER BY c.seq",
            (cursor, node_id, limit + 1),
        )
        top = rows[0][0]
        entries = [r for r in rows if r[1] is not None]
        more = len(entries) > limit
        changes: list[Change] = []
        size = 0
        last = cursor
        for row in entries[:limit]:
            entry_size = len(row[7]) + len(row[5]) + len(row[4]) + 32
            if changes and size + entry_size > max_bytes:
                more = True
                break
            size += entry_size
            op: Op = "delete" if row[6] == "delete" else "upsert"
            changes.append(
                Change(
                    collection=row[4],
                    key=row[5],
                    op=op,
                    fields=msgpack.unpackb(row[7], raw=False),
                    hlc=row[8],
                    parent=row[9],
                    origin=row[2],
                    seq=row[3],
                )
            )
            last = row[1]
        next_cursor = last if more else max(cursor, top)
        return FeedPage(changes, next_cursor, more)

    # -- conflict queue

    _CONFLICT_COLUMNS = (
        "id, collection, key, field, policy, status, sides, ancestor, reviewer, note, opened_at, "
        "closed_at, resolution"
    )

    @staticmethod
    def _conflict(row: Sequence[Any]) -> ConflictEntry:
        return ConflictEntry(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            _loads(row[6]),
            _loads(row[7]) if row[7] else None,
            row[8],
            row[9],
            row[10],
            row[11],
            _loads(row[12]) if row[12] else None,
        )

    async def list_conflicts(
        self,
        *,
        status: str | None = "open",
        collection: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[ConflictEntry]:
        """Conflicts by id; `status` None lists the whole log."""
        where, params = ["id > ?"], [after_id]
        if status is not None:
            where.append("status = ?")
            params.append(status)  # type: ignore[arg-type]
        if collection is not None:
            where.append("collection = ?")
            params.append(collection)  # type: ignore[arg-type]
        rows = await self._read(
            f"SELECT {self._CONFLICT_COLUMNS} FROM conflicts WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT ?",
            (*params, limit),
        )
        return [self._conflict(r) for r in rows]

    async def get_conflict(self, conflict_id: int) -> ConflictEntry:
        rows = await self._read(
            f"SELECT {self._CONFLICT_COLUMNS} FROM conflicts WHERE id = ?", (conflict_id,)
        )
        if not rows:
            raise ConflictNotFound(f"no conflict {conflict_id}")
        return self._conflict(rows[0])

    async def write_record(
        self,
        collection: str,
        key: str,
        fields: dict[str, Any],
        *,
        actor: str,
        action: str,
        detail: dict[str, Any] | None = None,
    ) -> Change:
        """HQ writes fields of a record as a change of its own (e.g. a newer reference table):
        applied, logged and sent to every node like any change. Audited as `action`."""
        now = self._wall()
        async with self._transaction(action) as conn:
            change = await self._write_as_hq(conn, collection, key, fields, now)
            audited = {"collection": collection, "key": key, "change": [change.origin, change.seq]}
            await self._audit(conn, actor, action, audited | (detail or {}))
        return change

    async def _write_as_hq(
        self,
        conn: aiosqlite.Connection,
        collection: str,
        key: str,
        fields: dict[str, Any],
        now: int,
    ) -> Change:
        """A new decision taken at HQ (a resolution, a system's write, a reference table), applied
        as HQ's own change above everything HQ holds of the record, in the caller's transaction.
        UnstorableChange (nothing written) if a value cannot be stored."""
        try:
            _dumps(fields)
        except (TypeError, ValueError, OverflowError) as e:
            raise UnstorableChange(f"{collection}/{key}: value cannot be stored: {e}") from e
        probe = Change(collection, key, "upsert", {}, 1, 0, self.origin, 0)
        state = (await self._load_states(conn, [probe]))[(collection, key)]
        change = replace(await self._hq_change(conn, collection, key, state, now), fields=fields)
        await self._apply(conn, [change], now, HQ_WRITER)
        return change

    async def resolve_conflict(
        self, conflict_id: int, value: Any, *, actor: str, note: str = ""
    ) -> ConflictEntry:
        """Settle an open review conflict with `value`: HQ writes it as a change whose parent
        covers every side, so it closes the conflict here and on every node that applies it.
        Audited."""
        now = self._wall()
        async with self._transaction("resolve conflict") as conn:
            rows = await conn.execute_fetchall(
                "SELECT collection, key, field, status FROM conflicts WHERE id = ?",
                (conflict_id,),
            )
            if not rows:
                raise ConflictNotFound(f"no conflict {conflict_id}")
            collection, key, name, status = next(iter(rows))
            if status != "open":
                raise ConflictNotOpen(
                    f"conflict {conflict_id} is {status}, not open: nothing to resolve"
                )
            change = await self._write_as_hq(conn, collection, key, {name: value}, now)
            # Closed by the change's merge -- or still open when the field is no longer under
            # review (the collections file changed since): then it is closed here.
            await conn.execute(
                "UPDATE conflicts SET status = 'resolved', closed_at = ?, resolution = ? "
                "WHERE id = ? AND status = 'open'",
                (
                    now,
                    _dumps({"value": value, "origin": change.origin, "seq": change.seq}),
                    conflict_id,
                ),
            )
            by = {"by": actor, "note": note}
            await conn.execute(
                "UPDATE conflicts SET resolution = json_patch(resolution, ?) WHERE id = ?",
                (_dumps(by), conflict_id),
            )
            detail = {
                "conflict": conflict_id,
                "collection": collection,
                "key": key,
                "field": name,
                "value": value,
                "change": [change.origin, change.seq],
                "note": note,
            }
            await self._audit(conn, actor, "conflict.resolve", detail)
            rows = await conn.execute_fetchall(
                f"SELECT {self._CONFLICT_COLUMNS} FROM conflicts WHERE id = ?", (conflict_id,)
            )
            return self._conflict(next(iter(rows)))

    # -- records, log, audit, meta

    @staticmethod
    def _record(row: Sequence[Any]) -> StoredRecord:
        state = RecordState.from_storage(
            _loads(row[2]),
            _loads(row[3]),
            _loads(row[4]) if row[4] else None,
            _loads(row[7]) if row[7] else None,
        )
        return StoredRecord(row[0], row[1], state, row[5], row[6])

    async def get_record(self, collection: str, key: str) -> StoredRecord | None:
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE collection = ? AND key = ?",
            (collection, key),
        )
        return self._record(rows[0]) if rows else None

    async def list_records(
        self, collection: str, *, after_key: str = "", limit: int = 1000, deleted: bool = False
    ) -> list[StoredRecord]:
        alive = "" if deleted else f" AND {_ALIVE}"
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE collection = ? AND key > ?{alive} "
            "ORDER BY key LIMIT ?",
            (collection, after_key, limit),
        )
        return [self._record(r) for r in rows]

    async def count_records(self, collection: str, *, deleted: bool = False) -> int:
        alive = "" if deleted else f" AND {_ALIVE}"
        rows = await self._read(
            f"SELECT COUNT(*) FROM records WHERE collection = ?{alive}", (collection,)
        )
        return int(rows[0][0])

    async def changelog_count(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM changelog")
        return int(rows[0][0])

    async def audit_log(self) -> list[AuditEntry]:
        rows = await self._read("SELECT id, at, actor, action, detail, hash FROM audit ORDER BY id")
        return [AuditEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]

    async def verify_audit(self) -> int | None:
        rows = await self._read("SELECT id, at, actor, action, detail, hash FROM audit ORDER BY id")
        prev = ""
        for entry_id, at, actor, action, detail, digest in rows:
            if _audit_hash(prev, at, actor, action, detail) != digest:
                return int(entry_id)
            prev = digest
        return None

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self._transaction("set meta") as conn:
            await conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- admin API tokens

    async def create_api_token(self, name: str, *, actor: str) -> IssuedApiToken:
        if API_TOKEN_NAME.fullmatch(name) is None:
            raise StoreError(
                f"API token name {name!r}: use letters, digits, '_', '.' or '-' (at most 64)"
            )
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        async with self._transaction("create API token") as conn:
            rows = await conn.execute_fetchall(
                "SELECT 1 FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,)
            )
            if rows:
                raise StoreError(
                    f"an active API token is already named {name!r}: revoke it first, "
                    "or choose another name"
                )
            await conn.execute(
                "INSERT INTO api_tokens(name, token_hash, created_at, created_by) "
                "VALUES (?, ?, ?, ?)",
                (name, digest, self._wall(), actor),
            )
            await self._audit(conn, actor, "api_token.create", {"name": name, "id": digest[:12]})
        return IssuedApiToken(token, name)

    async def revoke_api_token(self, name: str, *, actor: str) -> bool:
        async with self._transaction("revoke API token") as conn:
            cursor = await conn.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL "
                "RETURNING token_hash",
                (self._wall(), name),
            )
            revoked = list(await cursor.fetchall())
            await cursor.close()
            if not revoked:
                rows = await conn.execute_fetchall(
                    "SELECT 1 FROM api_tokens WHERE name = ? LIMIT 1", (name,)
                )
                if not rows:
                    raise ApiTokenNotFound(f"no API token named {name!r}")
                return False
            detail = {"name": name, "id": revoked[0][0][:12]}
            await self._audit(conn, actor, "api_token.revoke", detail)
        return True

    async def list_api_tokens(self) -> list[ApiToken]:
        rows = await self._read(
            "SELECT name, created_at, created_by, revoked_at FROM api_tokens ORDER BY name, id"
        )
        return [ApiToken(*row) for row in rows]

    async def check_api_token(self, token: str) -> ApiToken | None:
        rows = await self._read(
            "SELECT name, created_at, created_by, revoked_at FROM api_tokens "
            "WHERE token_hash = ? AND revoked_at IS NULL",
            (token_hash(token),),
        )
        return ApiToken(*rows[0]) if rows else None
