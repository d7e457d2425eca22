"""The local error queue: records that broke their collection's rules, kept for people to fix.

Bulk capture (and later the drop folder) keeps the good records and puts each refused one here
with its payload and the violations (stage, rule, field, message) -- nothing is dropped silently.
Field staff then fix the payload, resubmit it (it is checked again, then stored and synced like any
write) or discard it with a reason, from the CLI or the local API.
"""

from __future__ import annotations

from typing import Any

from agent.capture.records import RecordError, RejectedInput, record_to_write
from agent.capture.validate import EdgeValidator
from agent.config import AgentConfig
from agent.store import AgentStore, QueuedError


class UnknownEntry(LookupError):
    """No open error-queue entry with that id."""


def entry_for(
    record: Any,
    collection: str,
    key_field: str,
    line: int | None,
    source: str | None,
    errors: list[RecordError],
    now_ms: int,
) -> QueuedError:
    key = record.get(key_field) if isinstance(record, dict) else None
    return QueuedError(
        collection=collection,
        key=str(key),
        payload=record,
        errors=[e.to_json() for e in errors],
        source=source,
        line=line,
        received_ms=now_ms,
    )


async def _open_entry(store: AgentStore, entry_id: int) -> QueuedError:
    entry = await store.queued_error(entry_id)
    if entry is None or entry.status != "open":
        raise UnknownEntry(f"no open error-queue entry {entry_id}")
    return entry


def _check(
    config: AgentConfig, validator: EdgeValidator | None, entry: QueuedError, payload: Any
) -> tuple[Any, list[RecordError]]:
    key_field = config.collections[entry.collection].key
    try:
        write = record_to_write(payload, entry.collection, key_field, source=f"error {entry.id}")
    except RejectedInput as e:
        return None, e.errors
    refused = validator.check(write, source=f"error {entry.id}") if validator else []
    return write, refused


async def fix(
    store: AgentStore,
    config: AgentConfig,
    validator: EdgeValidator | None,
    entry_id: int,
    payload: dict[str, Any],
) -> list[RecordError]:
    """Replace an entry's payload with a corrected one and check it again; returns what is still
    wrong (nothing: it can be resubmitted)."""
    entry = await _open_entry(store, entry_id)
    _, refused = _check(config, validator, entry, payload)
    await store.update_error(entry_id, payload=payload, errors=[e.to_json() for e in refused])
    return refused


async def resubmit(
    store: AgentStore,
    config: AgentConfig,
    validator: EdgeValidator | None,
    entry_id: int,
    now_ms: int,
) -> list[RecordError]:
    """Check the entry's (fixed) payload again and, if it passes, store it like any write and
    close the entry. Returns the violations that kept it in the queue (empty: stored)."""
    entry = await _open_entry(store, entry_id)
    write, refused = _check(config, validator, entry, entry.payload)
    if refused or write is None:
        await store.update_error(entry_id, errors=[e.to_json() for e in refused])
        return refused
    # Written first: a crash before the entry is closed means a second resubmit, which stores
    # nothing new (the record is unchanged) and then closes it.
    await store.write([write])
    closed = await store.update_error(
        entry_id, status="resubmitted", resolved_ms=now_ms, if_payload=entry.payload
    )
    if not closed:  # fixed again meanwhile: that newer fix is what must be stored
        return await resubmit(store, config, validator, entry_id, now_ms)
    return []


async def discard(store: AgentStore, entry_id: int, reason: str, now_ms: int) -> None:
    if not reason.strip():
        raise ValueError("say why the record is discarded (--reason)")
    await _open_entry(store, entry_id)
    await store.update_error(entry_id, status="discarded", note=reason, resolved_ms=now_ms)
