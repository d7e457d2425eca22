"""The agent's health in one dictionary: shown by `fieldsync-agent status` and GET /v1/status."""

from __future__ import annotations

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
        # What an operator must know first (disk full, HQ refusals and restore recoveries).
        "warnings": warnings,
    }
