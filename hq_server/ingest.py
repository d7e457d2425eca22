"""Upstream ingest: sealed batch bytes in, signed ack out.

The order is the security argument: parse the frame (cheap, bounded) -> find the signer's key ->
verify the signature -> only then decompress (bounded by the header and `max_raw`) and decode ->
check the batch is self-consistent -> store it in one transaction -> sign the ack. Nothing reaches
SQLite before the signature checks out and the whole batch validates, so every bad input is refused
without changing HQ's state.

A node's clock being far ahead is not a reason to refuse its data (that would strand its queue):
the node is flagged for an operator and HQ's own clock is not moved by the bad timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from hq_server.logs import event
from hq_server.store import (
    HQStore,
    IngestResult,
    IngestStatus,
    NodeNotFound,
    NodeRevoked,
    UnstorableChange,
)
from protocol.change import Change, decode_changes
from protocol.collections import CollectionsConfig
from protocol.envelope import Codec, Kind, open_sealed, read_header, seal
from protocol.errors import ClockDrift, CorruptMessage, InvalidChange, UnknownNode
from protocol.hlc import MAX_HLC, HybridClock, format_hlc, physical_ms
from protocol.identity import NodeIdentity
from protocol.limits import Problem, change_problem, shown
from protocol.transport import ack_body
from protocol.validation import type_violations

log = logging.getLogger("fieldsync.hq.ingest")

# The highest stamp a node's change may carry: HQ keeps 2^32 stamps above it for its own changes.
MAX_NODE_HLC = MAX_HLC - 2**32


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    node_id: str
    seq: int  # batch sequence
    time: int  # signer's HLC when sealing (0 if it did not say)
    changes: list[Change]  # ordered by change sequence
    size: int  # bytes on the wire


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    node_id: str
    batch_seq: int
    changes: int
    size: int
    result: IngestResult
    ack: bytes | None  # sealed ACK; None when HQ answers a gap instead
    flag: str | None  # why the node was flagged by this batch, if it was


def peek_signer(data: bytes) -> str:
    """The node id a CHANGES message claims, from its frame alone (nothing trusted yet)."""
    kind, header, _, _ = read_header(data)
    if kind != Kind.CHANGES:
        raise CorruptMessage(f"expected a changes batch, got a {kind.name.lower()} message")
    node: str = header["node"]
    return node


def _invalid(batch_seq: int, change: Change, problem: Problem) -> InvalidChange:
    where = f"batch {batch_seq}, change {change.seq} ({shown(change.collection)}, key "
    where += f"{shown(change.key)})"
    return InvalidChange(
        f"{where}: {problem}; nothing of the batch was stored",
        batch=batch_seq,
        change=change.seq,
        rule=problem.rule,
        field=problem.field,
    )


def _type_problem(collections: CollectionsConfig | None, change: Change) -> Problem | None:
    """A value breaking its declared type, when HQ has the collections file and declares the
    collection (HQ accepts collections it does not declare, as agents without the file send)."""
    if collections is None or change.op != "upsert":
        return None
    collection = collections.collections.get(change.collection)
    if collection is None:
        return None
    violations = type_violations(collection, change.fields)
    if not violations:
        return None
    first = violations[0]
    return Problem("field_type", f"{first.message} (declared in {collections.source})", first.field)


def validate_batch(
    header: dict[str, Any],
    changes: list[Change],
    collections: CollectionsConfig | None = None,
) -> list[Change]:
    """Check a decoded batch against its signed header, and every change against the rules both
    sides share (protocol.limits) and, with `collections`, the declared types; return the changes
    in sequence order.

    Structure first (CorruptMessage, 400: the batch contradicts itself or its header), then
    content (InvalidChange, 422, naming the batch, the change and the rule), change by change in
    sequence order. `decode_changes` groups changes by collection, so the decoded order is not
    the sequence order; sorting restores the order in which the node made them (the change log
    keeps it).
    """
    node, batch_seq = header["node"], header["seq"]
    first, last = header["first"], header["last"]
    if batch_seq < 1:
        raise CorruptMessage("header: batch 'seq' must be at least 1")
    if header["count"] != len(changes):
        raise CorruptMessage(
            f"header says {header['count']} changes, the body holds {len(changes)}"
        )
    ordered = sorted(changes, key=attrgetter("seq"))
    previous = 0
    for change in ordered:
        if change.origin != node:
            raise CorruptMessage(
                f"change {change.seq}: origin {change.origin} is not the signer {node}; "
                "a node may only send its own changes"
            )
        if change.seq <= previous:
            raise CorruptMessage(f"change sequence {change.seq} appears twice or is not positive")
        previous = change.seq
        if not first <= change.seq <= last:
            raise CorruptMessage(
                f"change sequence {change.seq} is outside the header's range [{first}, {last}]"
            )
        if not 0 < change.hlc <= MAX_HLC or not 0 <= change.parent <= MAX_HLC:
            raise CorruptMessage(f"change {change.seq}: timestamp or parent out of range")
        if change.hlc > MAX_NODE_HLC:
            # HQ must be able to write above any stamp it accepts (its corrections, resolutions).
            raise CorruptMessage(
                f"change {change.seq}: timestamp {change.hlc} is at the end of the clock's range "
                f"(at most {MAX_NODE_HLC}); the node's clock is broken"
            )
        if change.parent >= change.hlc:
            # A write comes after the version its writer saw; the conflict rules rely on it.
            raise CorruptMessage(
                f"change {change.seq}: parent {change.parent} is not below its timestamp "
                f"{change.hlc}"
            )
    for change in ordered:
        problem = change_problem(change.collection, change.key, change.fields) or _type_problem(
            collections, change
        )
        if problem is not None:
            raise _invalid(batch_seq, change, problem)
    return ordered


def decode_batch(
    data: bytes,
    public_key: bytes | None,
    *,
    max_raw: int,
    collections: CollectionsConfig | None = None,
) -> DecodedBatch:
    """Verify, decompress, decode and validate one CHANGES message (CPU-bound: run it in a thread).

    `public_key` is the enrolled, unrevoked key of the node the frame names, or None, which
    makes `open_sealed` refuse it as UnknownNode before any signature or decompression work.
    """
    opened = open_sealed(data, lambda _node: public_key, max_raw=max_raw)
    if opened.kind != Kind.CHANGES:
        raise CorruptMessage(f"expected a changes batch, got a {opened.kind.name.lower()} message")
    header = opened.header
    changes = validate_batch(header, decode_changes(opened.body), collections)
    return DecodedBatch(header["node"], header["seq"], header["time"], changes, opened.size)


def _when(stamp: int) -> str:
    try:
        return format_hlc(stamp)
    except (OverflowError, ValueError, OSError):
        return str(stamp)


def batch_digest(changes: Sequence[Change]) -> bytes:
    """What identifies a batch's content: each change's sequence, timestamp, op and key. A resend
    (even re-sealed) has the same; a batch re-made from a database restored from a backup reuses
    sequence numbers for writes with other timestamps, and so differs."""
    h = hashlib.sha256()
    for change in changes:
        h.update(f"{change.seq}\x1f{change.hlc}\x1f{change.op}\x1f{change.collection}\x1f".encode())
        h.update(change.key.encode())
        h.update(b"\x1e")
    return h.digest()


class Ingestor:
    """Turns sealed batch bytes into stored changes and a signed ack.

    `clock` is HQ's clock; its `max_drift_ms` is the "too far ahead" bound (max_clock_ahead_s).
    Timestamps within the bound advance it, so HQ's acks and feed pages are stamped after
    everything it has accepted; timestamps beyond it flag the node and leave the clock alone.
    """

    def __init__(
        self,
        store: HQStore,
        identity: NodeIdentity,
        clock: HybridClock,
        *,
        max_raw: int,
        collections: CollectionsConfig | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.clock = clock
        self.max_raw = max_raw
        # hq.collections_file: changes to a collection it declares must keep the declared types.
        self.collections = collections
        # Decoding is CPU- and memory-heavy (a batch expands up to max_raw): at most as many at
        # once as there are cores, so a burst of uploads cannot multiply HQ's memory.
        self._decoding = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))

    async def ingest(self, data: bytes) -> IngestOutcome:
        """Store one batch exactly once. Raises a ProtocolError for every kind of bad input."""
        node = await self.store.get_node(peek_signer(data))
        key = node.public_key if node is not None and node.active else None
        async with self._decoding:
            batch = await asyncio.to_thread(
                decode_batch, data, key, max_raw=self.max_raw, collections=self.collections
            )
        offset, flag = self._check_clock(batch)
        try:
            result = await self.store.ingest(
                batch.node_id,
                batch.seq,
                batch.changes,
                clock_offset_ms=offset,
                flag=flag,
                digest=batch_digest(batch.changes),
            )
        except (NodeNotFound, NodeRevoked) as e:
            raise UnknownNode(str(e)) from e
        except UnstorableChange as e:
            raise CorruptMessage(str(e)) from e
        refused = result.status in (IngestStatus.GAP, IngestStatus.DIVERGED)
        ack = None if refused else self.seal_ack(batch.node_id, result)
        return IngestOutcome(
            batch.node_id, batch.seq, len(batch.changes), batch.size, result, ack, flag
        )

    def seal_ack(self, node_id: str, result: IngestResult) -> bytes:
        """A signed ACK carrying the node's high-water mark and HQ's wall time (for its offset)."""
        body = ack_body(node_id, result.acked_through, self.clock.physical())
        return seal(self.identity, Kind.ACK, body, codec=Codec.NONE, time=self.clock.now())

    def _check_clock(self, batch: DecodedBatch) -> tuple[int | None, str | None]:
        """(node clock offset in ms, flag reason or None); merges in-bound stamps into HQ's clock."""
        now = self.clock.physical()
        offset = physical_ms(batch.time) - now if batch.time else None
        newest = max((c.hlc for c in batch.changes), default=0)
        flag = None
        for what, stamp in (("sealing time", batch.time), ("newest change", newest)):
            if stamp == 0:
                continue
            try:
                self.clock.receive(stamp)
            except ClockDrift:
                ahead_s = (physical_ms(stamp) - now) // 1000
                limit_s = self.clock.max_drift_ms // 1000
                flag = flag or (
                    f"clock ahead: batch {batch.seq} {what} {_when(stamp)} is {ahead_s} s "
                    f"ahead of HQ (limit {limit_s} s)"
                )
                event(
                    log,
                    logging.WARNING,
                    "node clock ahead of HQ; data accepted, node flagged",
                    node=batch.node_id,
                    batch=batch.seq,
                    what=what,
                    ahead_s=ahead_s,
                    limit_s=limit_s,
                )
        return offset, flag
