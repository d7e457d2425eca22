"""The sink plug point: one small interface, its contract in the docstrings.

The router hands a sink a short, ordered run of `Outgoing` items and gets one `Outcome` per item:

    DELIVERED  the target has it (or had it already): advance past it
    ERRORED    transient (timeout, connection refused/reset, HTTP 429/5xx, broker unavailable):
               keep it, retry later with backoff
    REJECTED   permanent (HTTP 4xx other than 429, constraint violation, payload the target refuses):
               dead-letter it, never retry it as is

Sinks raise nothing for delivery problems: they classify them. An exception escaping `send` is a
bug and is treated as ERRORED for the whole run.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    ERRORED = "errored"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One mapped record on its way to a target.

    `idempotency_key` is derived from the change id (origin node, origin sequence), the route and
    the fan-out index: the same change mapped again gets the same key, so a repeat never duplicates
    in the target. `target_key` is the record's key in the target (upsert key).
    """

    idempotency_key: str
    route: str
    collection: str
    source_key: str
    target_key: str
    op: Literal["upsert", "delete"]
    payload: dict[str, Any]
    change_seq: int


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Delivery
    detail: str = ""  # why, for the log and the dead-letter queue; never a secret
    # ERRORED because the target as a whole is unreachable (connection refused or reset, timeout,
    # HTTP 502/503/504, broker down): the router waits it out without spending the item's retry
    # budget, so an outage never dead-letters data; only item-level transient errors exhaust it.
    target_down: bool = False
    # Seconds the target asked to wait before the next try (HTTP Retry-After on 429 or 503); the
    # router waits that long instead of its own backoff, capped by the route's retry.max_s.
    retry_after_s: float | None = None

    @classmethod
    def delivered(cls) -> Outcome:
        return cls(Delivery.DELIVERED)

    @classmethod
    def errored(cls, detail: str) -> Outcome:
        return cls(Delivery.ERRORED, detail)

    @classmethod
    def unavailable(cls, detail: str, retry_after_s: float | None = None) -> Outcome:
        return cls(Delivery.ERRORED, detail, target_down=True, retry_after_s=retry_after_s)

    @classmethod
    def rejected(cls, detail: str) -> Outcome:
        return cls(Delivery.REJECTED, detail)


NOT_ATTEMPTED = Outcome(Delivery.ERRORED, "not attempted: an earlier item in the run errored")


async def send_one_by_one(
    items: Sequence[Outgoing], deliver: Callable[[Outgoing], Awaitable[Outcome]]
) -> list[Outcome]:
    """The contract's run for sinks that deliver one item per request: in order, and nothing
    after the first ERRORED item (NOT_ATTEMPTED for the rest)."""
    outcomes: list[Outcome] = []
    for item in items:
        outcome = await deliver(item)
        outcomes.append(outcome)
        if outcome.status is Delivery.ERRORED:
            outcomes.extend(NOT_ATTEMPTED for _ in range(len(items) - len(outcomes)))
            break
    return outcomes


class Sink(Protocol):
    """A delivery target. Instances are built from their validated settings by the router.

    Contract:
    - `send` delivers `items` in order and returns exactly one Outcome per item, in order.
    - After the first ERRORED item it must not deliver later items (return NOT_ATTEMPTED for them):
      per-record-key order in the target depends on it. REJECTED items do not stop the run.
    - It must tolerate a repeat of any item (at-least-once delivery): upsert by `target_key`,
      or deduplicate by `idempotency_key` (carried to the target where the target allows).
    - `open` may connect eagerly; `send` must reconnect by itself after a connection loss.
    - `close` releases connections; the sink is not used afterwards.
    """

    kind: ClassVar[str]

    async def open(self) -> None: ...

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SinkType:
    kind: str
    settings: type  # a dataclass of protocol.config settings
    factory: Callable[[Any], Sink]  # settings -> sink
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SINK_TYPES: dict[str, SinkType] = {}
S = TypeVar("S")


def register_sink(kind: str, settings: type, description: str = "") -> Callable[[type[S]], type[S]]:
    """Class decorator: make a sink available as `type = KIND` in route configs."""

    def register(cls: type[S]) -> type[S]:
        if kind in SINK_TYPES:
            raise ValueError(f"sink type {kind!r} is registered twice")
        SINK_TYPES[kind] = SinkType(kind, settings, cls, description)  # type: ignore[arg-type]
        return cls

    return register
