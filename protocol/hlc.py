"""Hybrid logical clocks.

A timestamp is one unsigned 64-bit integer: physical milliseconds since the Unix epoch in the high 48
bits, a logical counter in the low 16 bits. Integers compare, encode (msgpack) and store (SQLite
INTEGER) cheaply, and "increment" is just +1: a counter overflow carries into the millisecond field,
which keeps the clock monotonic without a special case. Ties between equal timestamps from different
nodes are broken by the origin node id (see `protocol.merge`).

Field laptops have wrong clocks, so the clock takes an offset learned from HQ and refuses remote
timestamps that are further ahead of it than `max_drift_ms`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from protocol.errors import ClockDrift

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
# Signed 64-bit so every store (SQLite INTEGER, PostgreSQL bigint) holds it; ms < 2**47 lasts to 6429.
MAX_HLC = (1 << 63) - 1
DEFAULT_MAX_DRIFT_MS = 5 * 60 * 1000


def pack(physical_ms: int, logical: int = 0) -> int:
    """Build a timestamp from its two parts."""
    if not 0 <= logical <= LOGICAL_MASK:
        raise ValueError(f"logical counter out of range: {logical}")
    return (physical_ms << LOGICAL_BITS) | logical


def physical_ms(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def logical(hlc: int) -> int:
    return hlc & LOGICAL_MASK


def format_hlc(hlc: int) -> str:
    """Human-readable form for logs and CLIs: ISO time plus the logical counter."""
    ms = physical_ms(hlc)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))
    return f"{stamp}.{ms % 1000:03d}Z+{logical(hlc)}"


def system_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """A monotonic HLC.

    `wall` returns physical milliseconds; tests inject their own. `offset_ms` is added to it: the agent
    sets it from HQ's time at every contact so its timestamps track HQ rather than a laptop's clock.
    """

    def __init__(
        self,
        wall: Callable[[], int] = system_ms,
        *,
        last: int = 0,
        offset_ms: int = 0,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
    ) -> None:
        self._wall = wall
        self.last = last
        self.offset_ms = offset_ms
        self.max_drift_ms = max_drift_ms

    def physical(self) -> int:
        return max(0, self._wall() + self.offset_ms)

    def now(self) -> int:
        """A timestamp strictly greater than every one this clock issued or received."""
        self.last = max(self.last + 1, pack(self.physical()))
        if self.last > MAX_HLC:
            raise OverflowError("hybrid logical clock exhausted")
        return self.last

    def receive(self, remote: int) -> int:
        """Merge a remote timestamp; refuse one too far in the future (a wrong clock elsewhere)."""
        ahead = physical_ms(remote) - self.physical()
        if ahead > self.max_drift_ms:
            raise ClockDrift(
                f"remote timestamp is {ahead} ms ahead of this clock (limit {self.max_drift_ms} ms)"
            )
        self.last = max(self.last + 1, remote + 1, pack(self.physical()))
        return self.last

    def observe(self, remote: int) -> None:
        """Raise `last` to at least `remote` without a drift check (restoring persisted state)."""
        self.last = max(self.last, remote)
