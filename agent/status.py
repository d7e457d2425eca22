"""The agent's health in one dictionary: shown by `fieldsync-agent status` and GET /v1/status."""

from __future__ import annotations

import json
from typing import Any

from agent.store import FULL_DISK_BYTES, LOW_DISK_BYTES, AgentStore, free_bytes
from protocol.hlc import format_hlc


def _when(ms: int) -> str | None:
    return format_hlc(ms << 16).rsplit("+", 1)[0] if ms else None


def disk_warnings(store: AgentStore) -> tuple[bool, int, list[str]]:
    """(disk full, free bytes, warnings) for the data folder.

    Full when this process's last write failed for lack of space, or (seen from another process,
    such as the CLI) when less than FULL_DISK_BYTES are left."""
    free = free_bytes(store.data_dir)
    full = store.disk_full is not None or free < FULL_DISK_BYTES
    if full:
        return (
            True,
            free,
            [
                f"disk full: the data folder {store.data_dir} has {free} bytes free; writes are "
                "refused (507) until space returns, reads and forwarding go on"
            ],
        )
    if free < LOW_DISK_BYTES:
        return False, free, [f"disk almost full: {free} bytes free in {store.data_dir}"]
    return False, free, []


async def read_status(store: AgentStore) -> dict[str, Any]:
    meta = await store.meta()
    backlog = await store.backlog()
    full, free, warnings = disk_warnings(store)
    refusal = _json(meta.get("hq_refusal"))
    if refusal:
        warnings.append(f"{refusal.get('message')} at {_when(int(refusal.get('at_ms', 0)))}")
    recovery = _json(meta.get("last_recovery"))
    return {
        "node_id": store.node_id,
        "backlog_changes": backlog["changes"],
        "backlog_bytes": backlog["bytes"],
        "sealed_batches_waiting": backlog["batches"],
        "sealed_bytes_waiting": backlog["batch_bytes"],
        "acked_batches": int(meta["acked_batch"]),
        "acked_changes": int(meta["acked_changes"]),
        "bytes_sent": int(meta["sent_bytes"]),
        "last_contact": _when(int(meta["last_contact_ms"])),
        "last_error": meta["last_error"] or None,
        "last_error_at": _when(int(meta["last_error_ms"])),
        "hq_clock_offset_ms": int(meta["hq_offset_ms"]),
        "feed_cursor": int(meta["feed_cursor"]),
        "data_dir": str(store.data_dir),
        "disk_free_bytes": free,
        "disk_full": full,
        # What an operator must know first (disk full, HQ refusals).
        "warnings": warnings,
        # Restores from backup this node recovered from (agent.store.recover_from_restore).
        "restore_recoveries": int(meta.get("recovery_count", 0)),
        "last_recovery": _recovery_text(recovery) if recovery else None,
        "last_recovery_detail": recovery or None,
    }


def _json(text: object) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _recovery_text(r: dict[str, Any]) -> str:
    return (
        f"{_when(int(r.get('at_ms', 0)))}: restored database detected (HQ held batches through "
        f"{r.get('hq_acked_through')} and changes through {r.get('hq_change_seq')} from this "
        f"node); {r.get('renumbered')} unsent changes renumbered from {r.get('first_seq')} "
        f"and restamped, {r.get('already_at_hq')} already at HQ forgotten, "
        f"{r.get('dropped_batches')} sealed batches re-queued"
    )
