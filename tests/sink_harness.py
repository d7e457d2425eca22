"""What the sink conformance suite needs from each sink's test setup.

Each sink's test module provides a `SinkHarness` for a REAL target (an aiohttp server on 127.0.0.1,
a PostgreSQL or RabbitMQ server started by a fixture, a folder) and `tests/test_sink_conformance.py`
runs the same contract checks against every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from hq_server.sinks.base import Outgoing, Sink


class SinkHarness(Protocol):
    name: str  # e.g. "webhook", "postgres"

    async def make_sink(self) -> Sink:
        """A new, opened sink pointed at the target."""

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything the target holds or received, as (idempotency_key or target_key, payload),
        one entry per stored row / message / request the target accepted (so duplicates show)."""

    async def current(self) -> dict[str, dict[str, Any]]:
        """The target's current value per target_key (for upsert targets: the row; for append
        targets such as queues and files: the last payload received per target_key)."""

    async def set_available(self, available: bool) -> None:
        """Make the target unreachable (connection refused/reset or 503-like) or reachable again."""

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        """A variant of `base` the target refuses permanently (e.g. HTTP 400, a NOT NULL column
        left null, a payload too large), or None if this target cannot refuse anything."""

    async def cleanup(self) -> None: ...


def outgoing(
    n: int,
    *,
    key: str | None = None,
    route: str = "conformance",
    payload: dict[str, Any] | None = None,
) -> Outgoing:
    """The n-th test item; items with the same `key` are successive versions of one record."""
    target_key = key or f"rec-{n:04d}"
    return Outgoing(
        idempotency_key=f"{route}:nconformance:{n}:0",
        route=route,
        collection="grants",
        source_key=target_key,
        target_key=target_key,
        op="upsert",
        payload=payload if payload is not None else {"id": target_key, "n": n, "amount": n * 10},
        change_seq=n,
    )


def items(count: int, start: int = 1) -> Sequence[Outgoing]:
    return [outgoing(n) for n in range(start, start + count)]
