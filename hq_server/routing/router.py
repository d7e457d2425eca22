"""The router: each route reads HQ's change log from its own cursor, maps, and delivers in order.

For each route, one loop:

1. items resubmitted from the dead-letter queue are delivered first, with the *current* mapping;
2. the next changes after the route's position are read (in log order), filtered and mapped; each
   item carries an idempotency key derived from the change id, the route and its fan-out index;
3. the sink answers per item: DELIVERED advances; REJECTED (and a mapping error) goes to the
   dead-letter queue and advances; ERRORED stops the run there -- nothing behind it is delivered
   before it, which keeps every record key in order -- and the route retries after a backoff
   (exponential, jittered). An item that keeps failing while the target answers is dead-lettered
   after `retry.attempts`; an unreachable target spends no attempts: the route waits, in order.
4. the new position is stored only after the sink answered: a crash repeats, never loses.

Scheduled triggers run the same loop in windows: drain what is there when the window opens, sleep
until the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hq_server.logs import event
from hq_server.routing.config import Route, RoutesConfig
from hq_server.routing.mapping import Mapped, MappingError
from hq_server.routing.masking import configured_mask
from hq_server.routing.state import (
    DeadLetter,
    NewDeadLetter,
    RouterStore,
    RouteState,
    SourceChange,
)
from hq_server.sinks.base import NOT_ATTEMPTED, Delivery, Outcome, Outgoing, Sink
from protocol.hlc import system_ms

log = logging.getLogger("fieldsync.hq.router")
IDLE_POLL_S = 1.0
# A Retry-After of 0 (or a date just past) still waits this long: a target answering 429 with
# "Retry-After: 0" to every request must not get a tight loop of requests.
MIN_RETRY_AFTER_S = 0.1


def idempotency_key(route: str, origin: str, origin_seq: int, index: int) -> str:
    """Stable across retries, restarts and re-mapping: the same change, route and fan-out slot."""
    return f"{route}:{origin}:{origin_seq}:{index}"


def map_change(route: Route, change: SourceChange) -> list[Mapped]:
    """What `change` becomes for `route` (MappingError if it cannot be mapped)."""
    if change.op == "delete":
        # A tombstone has no fields to map from: the target deletes by the source key.
        return [Mapped(change.key, {})]
    if route.mapping is None:
        return [Mapped(change.key, dict(change.record))]
    return route.mapping.apply(change.record, key=change.key or None)


def to_outgoing(
    route: Route, change: SourceChange, index: int, mapped: Mapped, *, delete: bool | None = None
) -> Outgoing:
    return Outgoing(
        idempotency_key=idempotency_key(route.name, change.origin, change.origin_seq, index),
        route=route.name,
        collection=change.collection,
        source_key=change.key,
        target_key=mapped.target_key,
        op="delete" if (change.op == "delete" if delete is None else delete) else "upsert",
        payload=mapped.payload,
        change_seq=change.seq,
    )


def planned_items(
    route: Route, change: SourceChange, delivered_before: list[str]
) -> list[Outgoing]:
    """Everything `change` makes the route send, in a stable order (MappingError if unmappable).

    With a mapping, the target records a source record produced are remembered: its delete
    removes each of them, and an update whose fan-out shrank removes the ones it no longer yields.
    """
    if route.mapping is None:
        return [to_outgoing(route, change, 0, m) for m in map_change(route, change)]
    if change.op == "delete":
        return [
            to_outgoing(route, change, i, Mapped(key, {}), delete=True)
            for i, key in enumerate(delivered_before)
        ]
    mapped = map_change(route, change)
    now = {m.target_key for m in mapped}
    stale = [key for key in delivered_before if key not in now]
    items = [to_outgoing(route, change, i, m) for i, m in enumerate(mapped)]
    items += [
        to_outgoing(route, change, len(mapped) + i, Mapped(key, {}), delete=True)
        for i, key in enumerate(stale)
    ]
    return items


@dataclass
class _Slot:
    """One item of a run and where it came from."""

    change: SourceChange
    index: int
    outgoing: Outgoing


@dataclass
class _Targets:
    """Target records created and deleted by a run (remembered only for mapped routes); the last
    delivery of a target key in the run decides whether it exists."""

    tracked: bool
    exists: dict[tuple[str, str, str], bool] = field(default_factory=dict)

    def delivered(self, item: Outgoing) -> None:
        if self.tracked:
            self.exists[(item.collection, item.source_key, item.target_key)] = item.op != "delete"

    @property
    def added(self) -> list[tuple[str, str, str]]:
        return [entry for entry, present in self.exists.items() if present]

    @property
    def removed(self) -> list[tuple[str, str, str]]:
        return [entry for entry, present in self.exists.items() if not present]


class RouteRunner:
    def __init__(
        self,
        route: Route,
        store: RouterStore,
        sink: Sink,
        *,
        wall: Callable[[], int] = system_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.route = route
        self.store = store
        self.sink = sink
        self._wall = wall
        self._rng = rng or random.Random()
        self.wakeup = asyncio.Event()
        self._resubmit_failures = 0
        self._resubmit_retry_at = 0
        self._configured_mask = configured_mask(route)

    def mask(self, text: str) -> str:
        """`text` with every form of the route's secrets masked: those in its configuration and
        those the sink learnt since (access tokens, a rotated password). Every error text the
        router logs or stores passes here."""
        text = self._configured_mask(text)
        sink_mask = getattr(self.sink, "mask", None)
        return sink_mask(text) if callable(sink_mask) else text

    def _error_log(self, message: str, *args: Any) -> None:
        """log.exception, with the traceback masked (exceptions may quote what was sent)."""
        trace = self.mask(traceback.format_exc())
        log.error(message + "\n%s", *args, trace)

    # -- backoff

    def _delay_ms(self, failures: int, outcome: Outcome | None = None) -> int:
        """The wait before the next try: what the target asked for (Retry-After), or doubling
        with jitter; either at most retry.max_s."""
        policy = self.route.section.retry
        if outcome is not None and outcome.retry_after_s is not None:
            asked = max(MIN_RETRY_AFTER_S, outcome.retry_after_s)
            return int(min(policy.max_s, asked) * 1000)
        ceiling = min(policy.max_s, policy.initial_s * 2 ** min(failures - 1, 60))
        return int(self._rng.uniform(ceiling / 2, ceiling) * 1000)

    # -- one step

    async def step(self) -> bool:
        """Deliver what is due now. True if the route moved on (more may be waiting)."""
        if await self._resubmissions():
            return True
        state = await self.store.state(self.route.name)
        if state.next_attempt_at > self._wall():
            return False
        changes, _ = await self.store.changes(
            self.route.section.sources, state.cursor, self.route.section.batch_size
        )
        if not changes:
            return False
        now = self._wall()
        dead: list[NewDeadLetter] = []
        known = (
            await self.store.target_keys(self.route.name, [(c.collection, c.key) for c in changes])
            if self.route.mapping is not None
            else {}
        )
        plan = self._plan(state, changes, known, dead, now)
        items = [entry.outgoing for entry in plan if isinstance(entry, _Slot)]
        outcomes = iter(await self._send(items) if items else [])
        cursor, partial = state.cursor, state.partial
        delivered = 0
        targets = _Targets(self.route.mapping is not None)
        for position, entry in enumerate(plan):
            if isinstance(entry, SourceChange):  # filtered out or dead-lettered while mapping
                cursor, partial = entry.seq, 0
                continue
            outcome = next(outcomes)
            if outcome.status is Delivery.ERRORED:
                return await self._errored(
                    state, entry, outcome, (cursor, partial), delivered, dead, now, targets
                )
            if outcome.status is Delivery.DELIVERED:
                delivered += 1
                targets.delivered(entry.outgoing)
            else:
                dead.append(self._dead(entry, "rejected", outcome.detail, 1, now))
            cursor, partial = self._after(plan, position)
        await self._save(
            state, (cursor, partial), delivered, dead, targets, now, attempts=0, failures=0
        )
        return True

    async def _save(
        self,
        state: RouteState,
        position: tuple[int, int],
        delivered: int,
        dead: list[NewDeadLetter],
        targets: _Targets,
        now: int,
        *,
        attempts: int,
        failures: int,
        next_attempt_at: int = 0,
        last_error: str | None = None,
    ) -> None:
        """Store the route's position after a run, with its dead letters and target records."""
        dead = [replace(d, error=self.mask(d.error)) for d in dead]
        await self.store.save(
            replace(
                state,
                cursor=position[0],
                partial=position[1],
                attempts=attempts,
                failures=failures,
                next_attempt_at=next_attempt_at,
                last_error=None if last_error is None else self.mask(last_error),
                delivered=state.delivered + delivered,
                dead_lettered=state.dead_lettered + len(dead),
                last_delivery_at=now if delivered else state.last_delivery_at,
            ),
            dead,
            now,
            targets_added=targets.added,
            targets_removed=targets.removed,
        )

    def _plan(
        self,
        state: RouteState,
        changes: list[SourceChange],
        known: dict[tuple[str, str], list[str]],
        dead: list[NewDeadLetter],
        now: int,
    ) -> list[_Slot | SourceChange]:
        """The run, in log order: a slot per item to send, or the change itself when it needs no
        delivery (filtered out, or its mapping failed -- then it is dead-lettered)."""
        plan: list[_Slot | SourceChange] = []
        items = 0
        for position, change in enumerate(changes):
            if items >= self.route.section.batch_size:
                break
            if change.op != "delete" and (
                not change.record or not self.route.wants(change.collection, change.record)
            ):
                # Filtered out -- or deleted since (no fields left): its delete comes later in
                # the log and is routed then; there is no state to deliver for this upsert.
                plan.append(change)
                continue
            try:
                outgoing = planned_items(
                    self.route, change, known.get((change.collection, change.key), [])
                )
            except MappingError as e:
                dead.append(NewDeadLetter(change, 0, None, None, "mapping", str(e), 1, now))
                plan.append(change)
                continue
            # The first change may be half done: its first `partial` items were delivered.
            skip = state.partial if position == 0 else 0
            slots = [
                _Slot(change, index, item) for index, item in enumerate(outgoing) if index >= skip
            ]
            plan.extend(slots or [change])
            items += len(slots)
        return plan

    @staticmethod
    def _after(plan: list[_Slot | SourceChange], position: int) -> tuple[int, int]:
        """The route's position once plan[position] (a slot) is done."""
        slot = plan[position]
        assert isinstance(slot, _Slot)
        following = plan[position + 1] if position + 1 < len(plan) else None
        if isinstance(following, _Slot) and following.change.seq == slot.change.seq:
            return slot.change.seq - 1, slot.index + 1  # mid fan-out
        return slot.change.seq, 0

    async def _errored(
        self,
        state: RouteState,
        slot: _Slot,
        outcome: Outcome,
        position: tuple[int, int],
        delivered: int,
        dead: list[NewDeadLetter],
        now: int,
        targets: _Targets,
    ) -> bool:
        """Stop the run at `slot`; back off; dead-letter it once its attempts are spent."""
        # Mapping failures planned for changes after the stop are not reached yet: they are
        # dead-lettered when the route gets there, once.
        dead[:] = [d for d in dead if d.change.seq < slot.change.seq]
        moved = position != (state.cursor, state.partial) or delivered > 0 or bool(dead)
        failures = 1 if moved else state.failures + 1
        attempts = (0 if moved else state.attempts) + (0 if outcome.target_down else 1)
        cursor, partial = position
        next_at = now + self._delay_ms(failures, outcome)
        exhausted = attempts >= self.route.section.retry.attempts
        if exhausted:
            dead.append(self._dead(slot, "exhausted", outcome.detail, attempts, now))
            cursor, partial = slot.change.seq - 1, slot.index + 1
            attempts, failures, next_at = 0, 0, 0
        log.warning(
            "route %s: delivery errored%s: %s",
            self.route.name,
            " (dead-lettered: attempts spent)"
            if exhausted
            else f" (retry in {(next_at - now) / 1000:.1f} s)",
            self.mask(outcome.detail),
        )
        await self._save(
            state,
            (cursor, partial),
            delivered,
            dead,
            targets,
            now,
            attempts=attempts,
            failures=failures,
            next_attempt_at=next_at,
            last_error=outcome.detail,
        )
        return exhausted

    async def _send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        try:
            outcomes = await self.sink.send(items)
        except Exception as e:  # a sink bug: treat as a transient failure of the whole run
            self._error_log("route %s: sink %s raised", self.route.name, self.sink.kind)
            outcomes = [Outcome.errored(self.mask(f"sink raised {type(e).__name__}: {e}"))]
        if len(outcomes) != len(items):
            if outcomes and outcomes[0].status is Delivery.ERRORED:
                first = outcomes[0]
            else:
                first = Outcome.errored("sink answered for the wrong number of items")
            return [first] + [NOT_ATTEMPTED for _ in items[1:]]
        return outcomes

    def _dead(self, slot: _Slot, reason: str, error: str, attempts: int, now: int) -> NewDeadLetter:
        return NewDeadLetter(
            slot.change,
            slot.index,
            slot.outgoing.payload,
            slot.outgoing.idempotency_key,
            reason,
            error,
            attempts,
            now,
        )

    # -- resubmitted dead letters

    async def _resubmissions(self) -> bool:
        """Deliver dead letters an operator resubmitted; they go before new changes. A target
        that errors on them is backed off like any other (they keep their place)."""
        if self._resubmit_retry_at > self._wall():
            return False
        waiting = await self.store.dead_letters(route=self.route.name, status="resubmit", limit=50)
        if not waiting:
            return False
        progressed = False
        for letter in waiting:
            outcome, targets = await self._redeliver(letter)
            if outcome.status is Delivery.ERRORED:
                self._resubmit_failures += 1
                self._resubmit_retry_at = self._wall() + self._delay_ms(
                    self._resubmit_failures, outcome
                )
                log.warning(
                    "route %s: resubmitted dead letter %d errored: %s",
                    self.route.name,
                    letter.id,
                    self.mask(outcome.detail),
                )
                return progressed
            self._resubmit_failures = 0
            await self.store.finish_resubmit(
                letter.id,
                delivered=outcome.status is Delivery.DELIVERED,
                error=self.mask(outcome.detail),
                now_ms=self._wall(),
                targets_added=targets.added,
                targets_removed=targets.removed,
            )
            progressed = True
        return progressed

    async def _redeliver(self, letter: DeadLetter) -> tuple[Outcome, _Targets]:
        """Send a dead letter again through the current mapping: its one item, or -- when the
        mapping itself had failed -- every item the record now maps to."""
        targets = _Targets(self.route.mapping is not None)
        # Routes deliver a record's current state: newer changes of the record may have been
        # delivered since this one failed, and replaying the old snapshot would undo them.
        current = await self.store.current_record(letter.collection, letter.key)
        change = SourceChange(
            letter.change_seq,
            letter.origin,
            letter.origin_seq,
            letter.collection,
            letter.key,
            letter.op,
            letter.record if current is None or letter.op == "delete" else current,
        )
        known = await self.store.target_keys(self.route.name, [(change.collection, change.key)])
        try:
            items = planned_items(
                self.route, change, known.get((change.collection, change.key), [])
            )
        except MappingError as e:
            return Outcome.rejected(str(e)), targets
        if letter.reason != "mapping":
            if letter.item_index >= len(items):
                return Outcome.rejected(
                    f"the current mapping no longer yields item {letter.item_index} for this record"
                ), targets
            items = [items[letter.item_index]]
        outcomes = await self._send(items) if items else []
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.status is Delivery.DELIVERED:
                targets.delivered(item)
        worst = next((o for o in outcomes if o.status is Delivery.ERRORED), None) or next(
            (o for o in outcomes if o.status is Delivery.REJECTED), Outcome.delivered()
        )
        return worst, targets

    # -- the loop

    async def _open_sink(self, stop: asyncio.Event) -> bool:
        """Open the sink, retrying with backoff while the target is unreachable at start; the
        reason shows in the route's last_error (`fieldsync-hq routes`), not only in the log."""
        failures = 0
        while not stop.is_set():
            try:
                await self.sink.open()
                return True
            except Exception as e:
                failures += 1
                delay = self._delay_ms(failures) / 1000
                reason = self.mask(str(e))
                log.warning(
                    "route %s: cannot open sink %s (retry in %.1f s): %s",
                    self.route.name,
                    self.sink.kind,
                    delay,
                    reason,
                )
                with contextlib.suppress(Exception):
                    state = await self.store.state(self.route.name)
                    await self.store.save(replace(state, last_error=f"cannot open sink: {reason}"))
                await _wait(stop, delay)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Never raises but on cancellation: one route's trouble must not stop the others."""
        if not await self._open_sink(stop):
            return
        try:
            while not stop.is_set():
                try:
                    await self._loop(stop)
                except Exception:
                    self._error_log("route %s: routing loop failed; restarting it", self.route.name)
                    await _wait(stop, 5.0)
        finally:
            with contextlib.suppress(Exception):
                await self.sink.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        trigger = self.route.trigger
        while not stop.is_set():
            if not trigger.realtime:
                await self._wait_for_window(stop)
                if stop.is_set():
                    return
                started = self._wall()
                await self._drain(stop, within_window=True)
                state = await self.store.state(self.route.name)
                await self.store.save(replace(state, last_run_at=started))
                continue
            await self._drain(stop, within_window=False)
            state = await self.store.state(self.route.name)
            wait_s = max(0.0, (state.next_attempt_at - self._wall()) / 1000) or IDLE_POLL_S
            self.wakeup.clear()
            await _wait(stop, wait_s, self.wakeup)

    async def _drain(self, stop: asyncio.Event, *, within_window: bool) -> None:
        """Step while there is progress. In a scheduled window, also wait out retries (with their
        backoff) until what was there is delivered or dead-lettered: a window is not given up on
        a transient error, or a daily route would retry once a day."""
        while not stop.is_set():
            if await self.step():
                continue
            if not within_window:
                return
            state = await self.store.state(self.route.name)
            due = max(state.next_attempt_at, self._resubmit_retry_at)
            if due <= self._wall():
                return
            await _wait(stop, (due - self._wall()) / 1000)

    async def _wait_for_window(self, stop: asyncio.Event) -> None:
        state = await self.store.state(self.route.name)
        trigger = self.route.trigger
        now = self._wall()
        opens = (
            trigger.next_window(state.last_run_at)
            if state.last_run_at
            else trigger.first_window(now)
        )
        if opens > now:
            await _wait(stop, (opens - now) / 1000)


async def _wait(stop: asyncio.Event, seconds: float, *events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, *events)]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


class RouteSetupError(Exception):
    """A route's sink cannot be built (e.g. its secret is missing); the message names the route."""


class Router:
    """Every enabled route's runner, with its own sink, as tasks of one TaskGroup.

    Sinks are built when the router is (secrets are read then), so a missing credential stops HQ
    at start with the route's name instead of failing later in the background.
    """

    def __init__(
        self, config: RoutesConfig, store: RouterStore, *, wall: Callable[[], int] = system_ms
    ) -> None:
        self.config = config
        self.store = store
        self._wall = wall
        self.runners: dict[str, RouteRunner] = {}
        for route in config.routes.values():
            if not route.active:
                continue
            try:
                sink = route.sink_type.factory(route.sink_settings)
            except Exception as e:
                reason = configured_mask(route)(str(e))
                raise RouteSetupError(f"route {route.name}: {reason}") from e
            self.runners[route.name] = RouteRunner(route, store, sink, wall=wall)

    def notify(self) -> None:
        """New changes were appended to the log: wake realtime routes."""
        for runner in self.runners.values():
            runner.wakeup.set()

    def warn_plaintext(self) -> None:
        """One warning per running route allowed to send unencrypted (insecure_plaintext), at
        every start, so the exception never goes unnoticed."""
        for runner in self.runners.values():
            for found in runner.route.plaintext:
                event(
                    log,
                    logging.WARNING,
                    f"route {runner.route.name} sends records unencrypted: {found.what} "
                    f"(insecure_plaintext = true); to encrypt: {found.fix}",
                    route=runner.route.name,
                    setting=f"sink.{found.key}",
                )

    async def run(self, stop: asyncio.Event) -> None:
        self.warn_plaintext()
        await self.store.open()
        async with asyncio.TaskGroup() as tasks:
            for runner in self.runners.values():
                tasks.create_task(runner.run(stop), name=f"route {runner.route.name}")


def describe(route: Route) -> dict[str, Any]:
    """One route for the inventory."""
    s = route.section
    return {
        "name": route.name,
        "state": s.state,
        "owner": s.owner,
        "description": s.description,
        "source": ", ".join(s.sources),
        "filter": " and ".join(f"{p.field} {p.op} {p.value!r}" for p in route.predicates) or "-",
        "mapping": s.mapping or "(as is)",
        "target": route.sink_type.kind + (" (INSECURE PLAINTEXT)" if route.plaintext else ""),
        "trigger": s.trigger + ("" if s.timezone == "UTC" else f" ({s.timezone})"),
        "error_handling": f"retry {s.retry.attempts}x, {s.retry.initial_s:g}s..{s.retry.max_s:g}s"
        ", then dead-letter queue",
        "retired": f"{s.retired_at}: {s.retired_reason}" if s.state == "retired" else "",
        "insecure_plaintext": s.insecure_plaintext,
        "plaintext": "; ".join(p.what for p in route.plaintext),
    }
