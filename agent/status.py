"""The agent's health in one dictionary: shown by `fieldsync-agent status` and GET /v1/status."""

from __future__ import annotations

from typing import Any

from agent.store import AgentStore
from protocol.hlc import format_hlc


def _when(ms: int) -> str | None:
    return format_hlc(ms << 16).rsplit("+", 1)[0] if ms else None


async def read_status(store: AgentStore) -> dict[str, Any]:
    meta = await store.meta()
    backlog = await store.backlog()
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
    }
