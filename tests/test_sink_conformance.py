"""The sink contract (hq_server/sinks/base.py), checked against every registered sink harness.

Harnesses come from `sink_harness_registry`: every tests/test_sink_*.py module is imported and
may register one (see that module for how). Each check is a plain `check_*` coroutine that raises
AssertionError when a sink breaks the contract; `test_checks_catch_broken_sinks` runs each one
against deliberately broken sinks, so none of them can pass vacuously.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sink_harness import SinkHarness, items, outgoing
from sink_harness_registry import (
    HARNESSES,
    IMPORT_ERRORS,
    exported_fixtures,
    load_harness_modules,
)

from hq_server.sinks.base import NOT_ATTEMPTED, Delivery, Outcome, Outgoing, Sink

load_harness_modules(Path(__file__).resolve().parent, skip=Path(__file__).stem)
globals().update(exported_fixtures())  # harness fixtures defined in other test modules

pytestmark = pytest.mark.timeout(60)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes `harness` runs once per registered harness (ids: harness names)."""
    if "harness" in metafunc.fixturenames:
        params = [
            pytest.param(entry.fixture, id=name, marks=entry.marks)
            for name, entry in sorted(HARNESSES.items())
        ]
        params += [
            pytest.param(f"!{module}: {error}", id=f"import-error:{module}")
            for module, error in sorted(IMPORT_ERRORS.items())
        ]
        metafunc.parametrize("harness", params, indirect=True)


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> SinkHarness:
    if request.param.startswith("!"):
        pytest.fail(f"harness module failed to import: {request.param[1:]}", pytrace=False)
    value: SinkHarness = request.getfixturevalue(request.param)
    return value


# -- helpers


async def send(sink: Sink, run: Sequence[Outgoing]) -> list[Outcome]:
    """`sink.send`, with the contract's shape checks: no exception, one outcome per item."""
    try:
        outcomes = await sink.send(run)
    except Exception as e:
        raise AssertionError(f"send raised {type(e).__name__}: {e} (it must classify)") from e
    assert len(outcomes) == len(run), f"{len(outcomes)} outcomes for {len(run)} items"
    assert all(isinstance(o, Outcome) for o in outcomes), outcomes
    return outcomes


def statuses(outcomes: Sequence[Outcome]) -> list[Delivery]:
    return [o.status for o in outcomes]


async def new_sink(harness: SinkHarness) -> Sink:
    return await harness.make_sink()


def tally(
    entries: Sequence[tuple[str, dict[str, Any]]], delivered: Sequence[Outgoing]
) -> list[int]:
    """Index into `delivered` of each target entry, in the target's order.

    Entries are named by idempotency key or by target key (the harness decides); an entry that
    matches no delivered item fails, and so does a payload that differs from the item's.
    """
    by_key: dict[str, int] = {}
    for i, item in enumerate(delivered):
        by_key[item.idempotency_key] = i
        by_key[item.target_key] = i
    indexes = []
    for key, payload in entries:
        assert key in by_key, f"the target holds {key!r}, which was never delivered"
        index = by_key[key]
        assert payload == delivered[index].payload, (
            f"{key}: {payload} != {delivered[index].payload}"
        )
        indexes.append(index)
    return indexes


async def assert_holds_exactly(harness: SinkHarness, delivered: Sequence[Outgoing]) -> None:
    """The target holds each delivered item once, in delivery order, and nothing else."""
    indexes = tally(await harness.received(), delivered)
    counts = Counter(indexes)
    duplicates = {delivered[i].idempotency_key: n for i, n in counts.items() if n > 1}
    assert not duplicates, f"duplicated in the target: {duplicates}"
    missing = [delivered[i].idempotency_key for i in range(len(delivered)) if i not in counts]
    assert not missing, f"missing from the target: {missing}"
    assert indexes == sorted(indexes), f"target order {indexes} is not the delivery order"


# -- the contract


async def check_delivers_in_order(harness: SinkHarness) -> None:
    run = items(6)
    sink = await new_sink(harness)
    try:
        outcomes = await send(sink, run)
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED] * len(run), outcomes
    await assert_holds_exactly(harness, run)


async def check_repeat_duplicates_nothing(harness: SinkHarness) -> None:
    run = items(5)
    sink = await new_sink(harness)
    try:
        first = await send(sink, run)
        again = await send(sink, run)
        partly = await send(sink, [run[1], run[3], *items(1, start=6)])
    finally:
        await sink.close()
    assert statuses(first) == [Delivery.DELIVERED] * 5, first
    assert statuses(again) == [Delivery.DELIVERED] * 5, f"a repeat must be DELIVERED: {again}"
    assert statuses(partly) == [Delivery.DELIVERED] * 3, partly
    await assert_holds_exactly(harness, [*run, *items(1, start=6)])


async def check_last_version_wins(harness: SinkHarness) -> None:
    key = "rec-versions"
    run = [
        outgoing(1, key=key, payload={"id": key, "n": 1, "amount": 10}),
        outgoing(2),
        outgoing(3, key=key, payload={"id": key, "n": 3, "amount": 30}),
        outgoing(4, key=key, payload={"id": key, "n": 4, "amount": 40}),
        outgoing(5),
    ]
    sink = await new_sink(harness)
    try:
        outcomes = await send(sink, run)
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED] * len(run), outcomes
    current = await harness.current()
    assert current.get(key) == run[3].payload, f"{key}: {current.get(key)} is not the last version"
    assert current.get("rec-0002") == run[1].payload
    assert current.get("rec-0005") == run[4].payload


async def _outage(harness: SinkHarness, sink: Sink) -> tuple[list[Outgoing], list[Outgoing]]:
    """Deliver run A, take the target away, send run B: B[0] ERRORED, the rest NOT_ATTEMPTED."""
    before, during = list(items(2)), list(items(3, start=3))
    assert statuses(await send(sink, before)) == [Delivery.DELIVERED] * 2
    held = await harness.received()
    await harness.set_available(False)
    outcomes = await send(sink, during)
    assert outcomes[0].status is Delivery.ERRORED, f"unreachable target: {outcomes[0]}"
    assert outcomes[0].detail, "an ERRORED outcome must say why"
    assert outcomes[0].target_down, "an unreachable target is Outcome.unavailable (target_down)"
    assert outcomes[1:] == [NOT_ATTEMPTED] * 2, f"after the first ERRORED: {outcomes[1:]}"
    assert await harness.received() == held, "something was delivered while unreachable"
    return before, during


async def check_unavailable_errors_first_and_stops(harness: SinkHarness) -> None:
    sink = await new_sink(harness)
    try:
        await _outage(harness, sink)
    finally:
        await harness.set_available(True)
        await sink.close()


async def check_recovery_delivers_once(harness: SinkHarness) -> None:
    sink = await new_sink(harness)
    try:
        before, during = await _outage(harness, sink)
        await harness.set_available(True)
        outcomes = await send(sink, during)  # the same sink: it must reconnect by itself
    finally:
        await harness.set_available(True)
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED] * len(during), outcomes
    await assert_holds_exactly(harness, [*before, *during])


async def check_rejected_item_does_not_stop_the_run(harness: SinkHarness) -> None:
    refused = harness.rejected_item(outgoing(2))
    if refused is None:
        pytest.skip(f"{harness.name}: this target cannot refuse an item")
    run = [outgoing(1), refused, outgoing(3), outgoing(4)]
    sink = await new_sink(harness)
    try:
        outcomes = await send(sink, run)
    finally:
        await sink.close()
    assert statuses(outcomes) == [
        Delivery.DELIVERED,
        Delivery.REJECTED,
        Delivery.DELIVERED,
        Delivery.DELIVERED,
    ], outcomes
    assert outcomes[1].detail, "a REJECTED outcome must say why (it goes to the dead-letter queue)"
    await assert_holds_exactly(harness, [run[0], run[2], run[3]])


async def check_close_then_new_sink_works(harness: SinkHarness) -> None:
    first, second = list(items(3)), list(items(3, start=4))
    sink = await new_sink(harness)
    try:
        assert statuses(await send(sink, first)) == [Delivery.DELIVERED] * 3
    finally:
        await sink.close()
    sink = await new_sink(harness)
    try:
        outcomes = await send(sink, second)
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED] * 3, outcomes
    await assert_holds_exactly(harness, [*first, *second])


async def check_secrets_never_shown(harness: SinkHarness, caplog: pytest.LogCaptureFixture) -> None:
    if not hasattr(harness, "secrets"):
        pytest.skip(f"{harness.name}: the sink is given no secret")
    caplog.set_level(logging.DEBUG)  # every logger, every level: aiohttp's included
    shown: list[str] = []
    sink = await new_sink(harness)
    try:
        shown += [repr(sink), str(sink)]
        outcomes = list(await send(sink, items(2)))
        await harness.set_available(False)
        outcomes += await send(sink, items(2, start=3))
        await harness.set_available(True)
        refused = harness.rejected_item(outgoing(5))
        outcomes += await send(sink, [refused] if refused else items(1, start=5))
        shown += [repr(sink), str(sink)]
    finally:
        await harness.set_available(True)
        await sink.close()
    shown += [o.detail for o in outcomes]
    for record in caplog.records:
        shown += [record.getMessage(), repr(vars(record))]
    secrets = [s for s in getattr(harness, "secrets", ()) if s]
    assert secrets, f"{harness.name}: `secrets` is empty after the scenario"
    for secret in secrets:
        leaks = [text for text in shown if secret in text]
        assert not leaks, f"a secret shows in: {leaks[0][:300]}"


# -- one test per check, for every harness


async def test_delivers_a_run_in_order_exactly_once(harness: SinkHarness) -> None:
    await check_delivers_in_order(harness)


async def test_repeating_a_run_duplicates_nothing(harness: SinkHarness) -> None:
    await check_repeat_duplicates_nothing(harness)


async def test_successive_versions_leave_the_last(harness: SinkHarness) -> None:
    await check_last_version_wins(harness)


async def test_unavailable_target_errors_the_first_item_and_stops(harness: SinkHarness) -> None:
    await check_unavailable_errors_first_and_stops(harness)


async def test_after_recovery_the_run_is_delivered_once(harness: SinkHarness) -> None:
    await check_recovery_delivers_once(harness)


async def test_a_rejected_item_does_not_stop_the_run(harness: SinkHarness) -> None:
    await check_rejected_item_does_not_stop_the_run(harness)


async def test_close_then_a_new_sink_works(harness: SinkHarness) -> None:
    await check_close_then_new_sink_works(harness)


async def test_secrets_never_in_repr_outcomes_or_logs(
    harness: SinkHarness, caplog: pytest.LogCaptureFixture
) -> None:
    await check_secrets_never_shown(harness, caplog)


def test_harnesses_are_registered() -> None:
    """The built-in HTTP and file sinks always take part (others join when their tests exist)."""
    assert {"webhook", "rest-apikey", "rest-oauth2", "files-jsonl", "files-csv"} <= set(HARNESSES)


# -- the checks themselves must be able to fail: run them against broken sinks


class _Broken:
    """A sink wrapper with one deliberate contract violation (see MUTANTS)."""

    kind: ClassVar[str] = "broken"
    closed_by_anyone: ClassVar[bool] = False

    def __init__(self, inner: Sink, flaw: str, secrets: Sequence[str]) -> None:
        self.inner, self.flaw, self.secrets = inner, flaw, secrets
        self.seen: set[str] = set()
        self.failed = False

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()
        if self.flaw == "close_breaks_later_sinks":
            _Broken.closed_by_anyone = True

    async def send(self, run: Sequence[Outgoing]) -> list[Outcome]:
        flaw = self.flaw
        outcomes: list[Outcome] = []
        if flaw == "close_breaks_later_sinks" and _Broken.closed_by_anyone:
            return [Outcome.errored("pool closed")] + [NOT_ATTEMPTED] * (len(run) - 1)
        if flaw == "reverses_order":
            return list(reversed(await self.inner.send(list(reversed(run)))))
        if flaw == "rekeys_repeats":  # a key derived from something else than the item
            fresh = [
                replace(i, idempotency_key=f"{i.idempotency_key}:{uuid.uuid4()}")
                if i.idempotency_key in self.seen
                else i
                for i in run
            ]
            self.seen.update(i.idempotency_key for i in run)
            return await self.inner.send(fresh)
        if flaw == "stays_broken":  # never reconnects after a failure
            if self.failed:
                return [Outcome.errored("connection lost")] + [NOT_ATTEMPTED] * (len(run) - 1)
            outcomes = await self.inner.send(run)
            self.failed = any(o.status is Delivery.ERRORED for o in outcomes)
            return outcomes
        if flaw == "ignores_errors":  # carries on after an ERRORED item
            for item in run:
                outcomes += await self.inner.send([item])
            return outcomes
        if flaw == "raises":
            outcomes = await self.inner.send(run)
            if outcomes and outcomes[0].status is Delivery.ERRORED:
                raise ConnectionError("target unreachable")
            return outcomes
        if flaw == "flat_errors":  # loses the target_down flag: outages would dead-letter data
            return [replace(o, target_down=False) for o in await self.inner.send(run)]
        if flaw == "claims_delivery":
            return [Outcome.delivered() for _ in await self.inner.send(run)]
        if flaw == "stops_at_rejected":
            outcomes = await self.inner.send(run)
            for i, outcome in enumerate(outcomes):
                if outcome.status is Delivery.REJECTED:
                    return outcomes[: i + 1] + [NOT_ATTEMPTED] * (len(run) - i - 1)
            return outcomes
        if flaw == "logs_secret":
            logging.getLogger("fieldsync.sinks.broken").debug("using %s", self.secrets)
            return await self.inner.send(run)
        if flaw == "drops_last_item":
            outcomes = await self.inner.send(run[:-1])
            return [*outcomes, Outcome.delivered()] if run else outcomes
        raise AssertionError(flaw)


class _BrokenHarness:
    def __init__(self, inner: SinkHarness, flaw: str) -> None:
        self.inner, self.flaw = inner, flaw
        self.name = f"{inner.name}+{flaw}"

    @property
    def secrets(self) -> Sequence[str]:
        return tuple(getattr(self.inner, "secrets", ()))

    async def make_sink(self) -> Sink:
        return _Broken(await self.inner.make_sink(), self.flaw, self.secrets)

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        return await self.inner.received()

    async def current(self) -> dict[str, dict[str, Any]]:
        return await self.inner.current()

    async def set_available(self, available: bool) -> None:
        await self.inner.set_available(available)

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        return self.inner.rejected_item(base)

    async def cleanup(self) -> None:
        await self.inner.cleanup()


Check = Callable[[SinkHarness], Awaitable[None]]
MUTANTS: list[tuple[str, Check]] = [
    ("reverses_order", check_delivers_in_order),
    ("reverses_order", check_last_version_wins),
    ("drops_last_item", check_delivers_in_order),
    ("rekeys_repeats", check_repeat_duplicates_nothing),
    ("ignores_errors", check_unavailable_errors_first_and_stops),
    ("raises", check_unavailable_errors_first_and_stops),
    ("claims_delivery", check_unavailable_errors_first_and_stops),
    ("flat_errors", check_unavailable_errors_first_and_stops),
    ("stays_broken", check_recovery_delivers_once),
    ("stops_at_rejected", check_rejected_item_does_not_stop_the_run),
    ("close_breaks_later_sinks", check_close_then_new_sink_works),
]


@pytest.fixture
def reference(request: pytest.FixtureRequest) -> SinkHarness:
    """The webhook harness (fast, and it can refuse items): the base the broken sinks wrap."""
    value: SinkHarness = request.getfixturevalue(HARNESSES["webhook"].fixture)
    return value


@pytest.mark.parametrize(("flaw", "check"), MUTANTS, ids=[f"{f}-{c.__name__}" for f, c in MUTANTS])
async def test_checks_catch_broken_sinks(reference: SinkHarness, flaw: str, check: Check) -> None:
    _Broken.closed_by_anyone = False
    with pytest.raises(AssertionError):
        await check(_BrokenHarness(reference, flaw))


async def test_secret_check_catches_a_leak(
    reference: SinkHarness, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(AssertionError, match="a secret shows"):
        await check_secrets_never_shown(_BrokenHarness(reference, "logs_secret"), caplog)
