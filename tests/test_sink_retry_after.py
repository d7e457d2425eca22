"""Issue 9, defect 9: the webhook and REST sinks honour Retry-After on 429 and 503.

A real aiohttp target on 127.0.0.1 throttles the first request with `Retry-After` and records when
each request arrives; the real router (RouteRunner over HQ's SQLite store) with the real sink
delivers. The seconds form is measured in real time (about a second per test); the HTTP-date form
and the cap are checked against the router's injected clock, so no test sleeps long.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hq_fixtures import FakeWall
from test_sink_secret_masking import write_records

from hq_server.routing.config import Route, routes_from_dict
from hq_server.routing.router import RouteRunner
from hq_server.routing.state import RouterStore
from hq_server.sinks.http import parse_retry_after
from hq_server.store import SQLiteHQStore

pytestmark = pytest.mark.timeout(30)


@dataclass
class Throttling:
    """Answers the first `throttle` requests with `status` and `retry_after`, then 200."""

    status: int = 429
    retry_after: str | None = None
    throttle: int = 1
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each request

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= self.throttle:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.Response(status=self.status, text="slow down", headers=headers)
        return web.Response(status=200, text="ok")


@pytest.fixture
async def target() -> AsyncIterator[tuple[Throttling, int]]:
    throttling = Throttling()
    app = web.Application()
    app.router.add_post("/hook", throttling.handle)
    app.router.add_put("/api/{key}", throttling.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield throttling, runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteHQStore]:
    async with SQLiteHQStore(tmp_path / "hq.db") as opened:
        await write_records(opened, 2)
        yield opened


def route(kind: str, port: int, *, max_s: float) -> Route:
    sinks: dict[str, dict[str, Any]] = {
        "webhook": {
            "type": "webhook",
            "url": f"http://127.0.0.1:{port}/hook",
            "secret_env": "HOOK_SECRET",
        },
        "rest": {
            "type": "rest",
            "url_template": f"http://127.0.0.1:{port}/api/{{key}}",
            "api_key_header": "X-API-Key",
            "api_key_env": "API_KEY",
        },
    }
    table = {
        "sources": ["beneficiaries"],
        "retry": {"initial_s": 0.02, "max_s": max_s, "attempts": 5},
        "sink": sinks[kind],
    }
    return routes_from_dict({"routes": {"throttled": table}}).routes["throttled"]


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-for-retry-after")
    monkeypatch.setenv("API_KEY", "api-key-for-retry-after")


async def deliver_all(runner: RouteRunner, router_store: RouterStore, total: int) -> None:
    """The route's own loop, until it has delivered `total` items (bounded by the timeout)."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async with asyncio.timeout(15):
            while (await router_store.state(runner.route.name)).delivered < total:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize(("kind", "status"), [("webhook", 429), ("rest", 503)])
async def test_the_retry_comes_when_retry_after_seconds_says(
    target: tuple[Throttling, int], store: SQLiteHQStore, kind: str, status: int
) -> None:
    throttling, port = target
    throttling.status, throttling.retry_after = status, "1"
    router_store = RouterStore(store)
    await router_store.open()
    sink_route = route(kind, port, max_s=30)
    runner = RouteRunner(
        sink_route, router_store, sink_route.sink_type.factory(sink_route.sink_settings)
    )
    await deliver_all(runner, router_store, 2)
    gap = throttling.arrivals[1] - throttling.arrivals[0]
    assert 0.95 <= gap < 1.6, f"retried after {gap:.2f} s, Retry-After said 1 s"
    state = await router_store.state("throttled")
    assert state.dead_lettered == 0 and state.attempts == 0  # throttling spends no attempts


async def test_retry_after_is_capped_by_the_routes_backoff_maximum(
    target: tuple[Throttling, int], store: SQLiteHQStore
) -> None:
    throttling, port = target
    throttling.retry_after = "2"
    router_store = RouterStore(store)
    await router_store.open()
    sink_route = route("webhook", port, max_s=0.4)
    runner = RouteRunner(
        sink_route, router_store, sink_route.sink_type.factory(sink_route.sink_settings)
    )
    await deliver_all(runner, router_store, 2)
    gap = throttling.arrivals[1] - throttling.arrivals[0]
    assert 0.38 <= gap < 1.0, f"retried after {gap:.2f} s; the cap is 0.4 s"


@pytest.mark.parametrize(
    ("kind", "status", "ahead_s", "max_s", "expected_s"),
    [
        ("webhook", 429, 30, 600, 30),  # an HTTP-date 30 s ahead
        ("rest", 503, 30, 600, 30),
        ("rest", 429, 3600, 120, 120),  # an hour ahead, capped at retry.max_s
    ],
)
async def test_an_http_date_retry_after_sets_the_next_attempt(
    target: tuple[Throttling, int],
    store: SQLiteHQStore,
    kind: str,
    status: int,
    ahead_s: int,
    max_s: float,
    expected_s: float,
) -> None:
    throttling, port = target
    throttling.status = status
    throttling.retry_after = email.utils.formatdate(time.time() + ahead_s, usegmt=True)
    router_store = RouterStore(store)
    await router_store.open()
    wall = FakeWall()
    sink_route = route(kind, port, max_s=max_s)
    sink = sink_route.sink_type.factory(sink_route.sink_settings)
    runner = RouteRunner(sink_route, router_store, sink, wall=wall)
    try:
        await runner.step()
        state = await router_store.state("throttled")
        wait_s = (state.next_attempt_at - wall.now) / 1000
        # the date has whole seconds: up to one less than asked
        assert expected_s - 1.5 <= wait_s <= expected_s, wait_s
        assert "Retry-After" in (state.last_error or "")
        wall.advance(int(wait_s * 1000) - 50)
        assert not await runner.step()  # not yet
        wall.advance(100)
        assert await runner.step()  # now: delivered
        assert len(throttling.arrivals) == 3  # first batch errored at item 1, then both
    finally:
        await sink.close()


def test_parse_retry_after_forms() -> None:
    now = 1_750_000_000.0
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 120 ", now) == 120.0
    date = email.utils.formatdate(now + 45, usegmt=True)
    assert parse_retry_after(date, now) == 45.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now) is None, bad
