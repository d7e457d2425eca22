"""The router's delivery logic against HQ's real store: order, positions, retries, dead letters.

The sink here is scripted (it answers what each test tells it to) because these tests are about the
router's decisions; every real sink is checked against a real target by the conformance suite, and
the end-to-end routing tests run the router with real sinks and targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hq_fixtures import FakeWall

from hq_server.routing.config import RetryPolicy, Route, RouteSection, Trigger, parse_trigger
from hq_server.routing.mapping import Mapped, MappingError
from hq_server.routing.router import RouteRunner, idempotency_key
from hq_server.routing.state import RouterStore
from hq_server.sinks.base import NOT_ATTEMPTED, Delivery, Outcome, Outgoing, SinkType
from hq_server.store import SQLiteHQStore
from protocol.change import Change
from protocol.identity import NodeIdentity

DAY = 24 * 3600 * 1000


@dataclass
class ScriptedSink:
    """Answers each item with `answer(item)`; keeps what it delivered, in order."""

    answer: Callable[[Outgoing], Outcome] = lambda item: Outcome.delivered()
    delivered: list[Outgoing] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    kind: ClassVar[str] = "scripted"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        out: list[Outcome] = []
        for item in items:
            if out and out[-1].status is Delivery.ERRORED:
                out.append(NOT_ATTEMPTED)
                continue
            self.seen.append(item.idempotency_key)
            outcome = self.answer(item)
            if outcome.status is Delivery.DELIVERED:
                self.delivered.append(item)
            out.append(outcome)
        return out


class FanOut:
    """A mapping yielding one record per item of the `parts` list (like a fan-out mapping)."""

    name = "fan_out"

    def apply(self, record: dict[str, Any], key: str | None = None) -> list[Mapped]:
        return [Mapped(f"{key}-{part}", {"part": part}) for part in record.get("parts", [])]


def make_route(
    *, attempts: int = 3, batch_size: int = 50, mapping: Any = None, trigger: str = "realtime"
) -> Route:
    section = RouteSection(
        sources=["grants"],
        batch_size=batch_size,
        retry=RetryPolicy(initial_s=1.0, max_s=60.0, attempts=attempts),
    )
    return Route(
        name="to-finance",
        section=section,
        predicates=(),
        mapping=mapping,
        trigger=parse_trigger(trigger),
        sink_type=SinkType("scripted", object, lambda s: ScriptedSink()),
        sink_settings=None,
    )


@dataclass
class Rig:
    store: SQLiteHQStore
    router_store: RouterStore
    node: NodeIdentity
    wall: FakeWall
    batch: int = 0
    seq: int = 0

    async def write(self, *records: tuple[str, dict[str, Any]], op: str = "upsert") -> None:
        changes = []
        for key, fields in records:
            self.seq += 1
            changes.append(
                Change(
                    "grants",
                    key,
                    op,
                    fields,
                    self.wall() * 65536 + self.seq,
                    0,  # type: ignore[arg-type]
                    self.node.node_id,
                    self.seq,
                )
            )
        self.batch += 1
        await self.store.ingest(self.node.node_id, self.batch, changes)

    def runner(self, route: Route, sink: ScriptedSink) -> RouteRunner:
        return RouteRunner(route, self.router_store, sink, wall=self.wall)

    async def drain(self, runner: RouteRunner, max_steps: int = 200) -> None:
        """Step until nothing is due, jumping the clock over backoff delays (bounded)."""
        for _ in range(max_steps):
            if await runner.step():
                continue
            state = await self.router_store.state(runner.route.name)
            if state.next_attempt_at > self.wall():
                self.wall.now = state.next_attempt_at
                continue
            return
        raise AssertionError("route did not settle")


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    wall = FakeWall()
    store = SQLiteHQStore(tmp_path / "hq.db", wall=wall)
    await store.open()
    node = NodeIdentity.generate()
    issued = await store.create_token("office", DAY, actor="test")
    await store.enroll(issued.token, node.public_key)
    router_store = RouterStore(store)
    await router_store.open()
    try:
        yield Rig(store, router_store, node, wall)
    finally:
        await store.close()


def keys(sink: ScriptedSink) -> list[str]:
    return [item.target_key for item in sink.delivered]


async def test_delivers_every_change_in_log_order_with_stable_keys(rig: Rig) -> None:
    await rig.write(*[(f"g{i}", {"n": i}) for i in range(5)])
    await rig.write(("g1", {"n": 10}))
    sink = ScriptedSink()
    await rig.drain(rig.runner(make_route(batch_size=2), sink))
    assert keys(sink) == ["g0", "g1", "g2", "g3", "g4", "g1"]
    assert sink.delivered[0].idempotency_key == idempotency_key(
        "to-finance", rig.node.node_id, 1, 0
    )
    assert sink.delivered[-1].payload == {"n": 10}  # the record's state
    state = await rig.router_store.state("to-finance")
    assert (state.cursor, state.partial, state.delivered) == (6, 0, 6)


async def test_a_restarted_runner_resumes_where_the_last_one_stopped(rig: Rig) -> None:
    await rig.write(*[(f"g{i}", {"n": i}) for i in range(4)])
    first = ScriptedSink()
    assert await rig.runner(make_route(batch_size=2), first).step()
    await rig.write(("g9", {"n": 9}))
    second = ScriptedSink()
    await rig.drain(rig.runner(make_route(batch_size=2), second))
    assert keys(first) + keys(second) == ["g0", "g1", "g2", "g3", "g9"]


async def test_a_rejected_item_is_dead_lettered_and_the_rest_delivered(rig: Rig) -> None:
    await rig.write(*[(f"g{i}", {"n": i}) for i in range(4)])
    sink = ScriptedSink(
        lambda item: (
            Outcome.rejected("400 bad amount") if item.target_key == "g2" else Outcome.delivered()
        )
    )
    await rig.drain(rig.runner(make_route(), sink))
    assert keys(sink) == ["g0", "g1", "g3"]
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    assert (dead.key, dead.reason, dead.error, dead.mapped) == (
        "g2",
        "rejected",
        "400 bad amount",
        {"n": 2},
    )
    assert dead.record == {"n": 2} and dead.origin_seq == 3


async def test_an_item_that_keeps_failing_is_dead_lettered_after_its_attempts(rig: Rig) -> None:
    await rig.write(*[(f"g{i}", {"n": i}) for i in range(3)])
    sink = ScriptedSink(
        lambda item: (
            Outcome.errored("429 slow down") if item.target_key == "g1" else Outcome.delivered()
        )
    )
    await rig.drain(rig.runner(make_route(attempts=3), sink))
    assert keys(sink) == ["g0", "g2"]
    assert sink.seen.count(idempotency_key("to-finance", rig.node.node_id, 2, 0)) == 3
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    assert (dead.key, dead.reason, dead.attempts) == ("g1", "exhausted", 3)


async def test_an_unreachable_target_never_dead_letters_and_order_holds(rig: Rig) -> None:
    await rig.write(*[(f"g{i}", {"n": i}) for i in range(6)])
    down = {"calls": 0}

    def answer(item: Outgoing) -> Outcome:
        down["calls"] += 1
        return (
            Outcome.unavailable("connection refused")
            if down["calls"] <= 25
            else Outcome.delivered()
        )

    sink = ScriptedSink(answer)
    runner = rig.runner(make_route(attempts=2), sink)
    await rig.drain(runner, max_steps=500)
    assert keys(sink) == [f"g{i}" for i in range(6)]
    assert await rig.router_store.dead_letters(route="to-finance") == []
    state = await rig.router_store.state("to-finance")
    assert state.last_error is None and state.failures == 0


async def test_backoff_doubles_and_waits(rig: Rig) -> None:
    await rig.write(("g0", {"n": 0}))
    sink = ScriptedSink(lambda item: Outcome.unavailable("503"))
    runner = rig.runner(make_route(attempts=5), sink)
    delays = []
    for _ in range(4):
        assert not await runner.step()
        state = await rig.router_store.state("to-finance")
        delays.append(state.next_attempt_at - rig.wall())
        assert not await runner.step()  # not due yet: nothing is sent
        rig.wall.now = state.next_attempt_at
    assert len(sink.seen) == 4
    for n, delay in enumerate(delays):
        ceiling = 1000 * 2**n
        assert ceiling / 2 <= delay <= ceiling


async def test_fan_out_resumes_mid_change_without_resending_delivered_siblings(rig: Rig) -> None:
    await rig.write(("g0", {"parts": ["a", "b", "c"]}), ("g1", {"parts": ["x"]}))
    calls = {"b": 0}

    def answer(item: Outgoing) -> Outcome:
        if item.target_key == "g0-b" and calls["b"] == 0:
            calls["b"] += 1
            return Outcome.unavailable("reset")
        return Outcome.delivered()

    sink = ScriptedSink(answer)
    await rig.drain(rig.runner(make_route(mapping=FanOut()), sink))
    assert keys(sink) == ["g0-a", "g0-b", "g0-c", "g1-x"]
    assert sink.seen.count(idempotency_key("to-finance", rig.node.node_id, 1, 0)) == 1


async def test_deletes_are_routed_by_key(rig: Rig) -> None:
    await rig.write(("g0", {"n": 0}))
    sink = ScriptedSink()
    await rig.drain(rig.runner(make_route(), sink))
    await rig.write(("g0", {}), op="delete")
    await rig.drain(rig.runner(make_route(), sink))
    assert [(i.op, i.target_key) for i in sink.delivered] == [("upsert", "g0"), ("delete", "g0")]


async def test_a_record_deleted_before_the_route_ran_is_not_routed_from_an_empty_state(
    rig: Rig,
) -> None:
    await rig.write(("g0", {"parts": ["a"]}), ("g1", {"parts": ["b"]}))
    await rig.write(("g0", {}), op="delete")
    sink = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=FanOut()), sink))
    # g0's upsert has no state left to map (no spurious dead letter), and its delete has no
    # delivered target record to remove.
    assert keys(sink) == ["g1-b"]
    assert await rig.router_store.dead_letters(route="to-finance") == []


async def test_resubmitted_dead_letters_are_delivered_first_with_the_current_mapping(
    rig: Rig,
) -> None:
    await rig.write(("g0", {"parts": ["a"]}), ("g1", {"parts": ["b"]}))
    refusing = ScriptedSink(
        lambda item: Outcome.rejected("400") if item.target_key == "g0-a" else Outcome.delivered()
    )
    await rig.drain(rig.runner(make_route(mapping=FanOut()), refusing))
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    assert await rig.router_store.set_status(
        [dead.id], "resubmit", actor="test", now_ms=rig.wall()
    ) == [dead.id]
    fixed = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=FanOut()), fixed))
    assert keys(fixed) == ["g0-a"]
    assert fixed.delivered[0].idempotency_key == dead.idempotency_key
    (done,) = await rig.router_store.dead_letters(route="to-finance", status="delivered")
    assert done.id == dead.id
    assert "dlq.resubmit" in [e.action for e in await rig.store.audit_log()]


def test_triggers() -> None:
    assert parse_trigger("realtime").realtime
    assert parse_trigger("every 15 minutes").every_s == 900
    assert parse_trigger("hourly").every_s == 3600
    daily = parse_trigger("daily after 02:00")
    at = 1_764_036_000_000  # 2025-11-25T02:00:00Z
    assert daily.first_window(at - 1000) == at
    assert daily.first_window(at + 1000) == at
    assert daily.next_window(at + 1000) == at + DAY
    nairobi: Trigger = parse_trigger("daily after 02:00", "Africa/Nairobi")
    assert nairobi.first_window(at) == at - 3 * 3600 * 1000  # 02:00 in Nairobi is 23:00Z
    for bad in ("daily after 25:00", "every 0 minutes", "sometimes", "daily"):
        with pytest.raises(ValueError, match=r"must be|at least"):
            parse_trigger(bad)


async def test_a_resubmitted_dead_letter_carries_the_records_current_state(rig: Rig) -> None:
    await rig.write(("g0", {"amount": -1}))
    refusing = ScriptedSink(
        lambda item: Outcome.rejected("400") if item.payload["amount"] < 0 else Outcome.delivered()
    )
    await rig.drain(rig.runner(make_route(), refusing))
    await rig.write(("g0", {"amount": 5}))
    await rig.drain(rig.runner(make_route(), refusing))
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    await rig.router_store.set_status([dead.id], "resubmit", actor="test", now_ms=rig.wall())
    later = ScriptedSink()
    await rig.drain(rig.runner(make_route(), later))
    # Not the refused snapshot: replaying it would undo the newer change already delivered.
    assert [i.payload for i in later.delivered] == [{"amount": 5}]
    assert later.delivered[0].idempotency_key == dead.idempotency_key


async def test_fan_out_records_are_deleted_and_shrunk_precisely(rig: Rig) -> None:
    await rig.write(("g0", {"parts": ["a", "b", "c"]}), ("g1", {"parts": ["x"]}))
    first = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=FanOut()), first))
    await rig.write(("g0", {"parts": ["a"]}))  # its fan-out shrinks: b and c must go
    await rig.write(("g1", {}), op="delete")  # the whole record goes: x must go
    await rig.write(("never-sent", {}), op="delete")  # nothing was delivered for it
    second = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=FanOut()), second))
    assert [(i.op, i.target_key) for i in second.delivered] == [
        ("upsert", "g0-a"),
        ("delete", "g0-b"),
        ("delete", "g0-c"),
        ("delete", "g1-x"),
    ]
    await rig.write(("g0", {}), op="delete")
    third = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=FanOut()), third))
    assert [(i.op, i.target_key) for i in third.delivered] == [("delete", "g0-a")]
    assert (
        await rig.router_store.target_keys("to-finance", [("grants", "g0"), ("grants", "g1")]) == {}
    )


class StrictFanOut(FanOut):
    """FanOut that refuses records without a `ok` flag -- until it is 'fixed'."""

    def __init__(self, fixed: bool = False) -> None:
        self.fixed = fixed

    def apply(self, record: dict[str, Any], key: str | None = None) -> list[Mapped]:
        if not self.fixed and not record.get("ok"):
            raise MappingError("strict", "ok", "required", "missing")
        return super().apply(record, key)


async def test_a_resubmitted_mapping_failure_delivers_every_item_and_remembers_them(
    rig: Rig,
) -> None:
    await rig.write(("g0", {"parts": ["a", "b", "c"]}))
    await rig.drain(rig.runner(make_route(mapping=StrictFanOut()), ScriptedSink()))
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    assert dead.reason == "mapping" and dead.mapped is None
    await rig.router_store.set_status([dead.id], "resubmit", actor="test", now_ms=rig.wall())
    fixed = ScriptedSink()
    await rig.drain(rig.runner(make_route(mapping=StrictFanOut(fixed=True)), fixed))
    assert keys(fixed) == ["g0-a", "g0-b", "g0-c"]
    assert await rig.router_store.target_keys("to-finance", [("grants", "g0")]) == {
        ("grants", "g0"): ["g0-a", "g0-b", "g0-c"]
    }


async def test_a_resubmission_that_errors_is_backed_off(rig: Rig) -> None:
    await rig.write(("g0", {"n": 1}))
    refusing = ScriptedSink(lambda item: Outcome.rejected("400"))
    await rig.drain(rig.runner(make_route(), refusing))
    (dead,) = await rig.router_store.dead_letters(route="to-finance")
    await rig.router_store.set_status([dead.id], "resubmit", actor="test", now_ms=rig.wall())
    down = ScriptedSink(lambda item: Outcome.unavailable("refused"))
    runner = rig.runner(make_route(), down)
    assert not await runner.step()
    assert not await runner.step()  # not due yet: nothing sent
    assert len(down.seen) == 1


async def test_an_errored_item_does_not_dead_letter_changes_behind_it_again_and_again(
    rig: Rig,
) -> None:
    await rig.write(("g0", {"ok": True, "parts": ["a"]}), ("g1", {"parts": ["b"]}))
    sink = ScriptedSink(lambda item: Outcome.errored("500 boom"))
    runner = rig.runner(make_route(attempts=3, mapping=StrictFanOut()), sink)
    await rig.drain(runner)
    letters = await rig.router_store.dead_letters(route="to-finance")
    # g0's item spent its 3 attempts; g1's mapping failure was dead-lettered once, when reached.
    assert sorted((d.key, d.reason) for d in letters) == [("g0", "exhausted"), ("g1", "mapping")]
    assert sink.seen.count(idempotency_key("to-finance", rig.node.node_id, 1, 0)) == 3
