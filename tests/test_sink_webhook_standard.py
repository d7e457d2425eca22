"""Issue 9, defect 9: webhooks verifiable with an off-the-shelf Standard Webhooks library.

The receiver is a real aiohttp server on 127.0.0.1 whose only check is the `standardwebhooks`
package's `Webhook(secret).verify(body, headers)`; the sender is the real webhook sink, driven by
the real router over HQ's SQLite store for the retry case.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sink_harness import outgoing
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from test_sink_retry_after import deliver_all
from test_sink_secret_masking import write_records

from hq_server.routing.config import routes_from_dict
from hq_server.routing.router import Router, RouteRunner, RouteSetupError
from hq_server.routing.state import RouterStore
from hq_server.sinks.base import Delivery
from hq_server.sinks.webhook import SIGNATURE_HEADER, WebhookSettings, WebhookSink
from hq_server.store import SQLiteHQStore

pytestmark = pytest.mark.timeout(30)
DOC = Path(__file__).resolve().parent.parent / "docs" / "routing.md"
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class StandardReceiver:
    """Verifies each request with the standardwebhooks package; 401 if it does not verify."""

    secret: str
    fail_first: int = 0  # answer 503 to this many verified requests first
    verified: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers.items())
        try:
            document = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError as e:
            self.refused.append(str(e))
            return web.Response(status=401, text="bad signature")
        self.verified.append((headers, document))
        if len(self.verified) <= self.fail_first:
            return web.Response(status=503, text="try again")
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[StandardReceiver, str]]:
    standard = StandardReceiver(SECRET)
    app = web.Application()
    app.router.add_post("/hook", standard.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield standard, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDARD_SECRET", SECRET)


def standard_sink(url: str, **overrides: Any) -> WebhookSink:
    options = {"secret_env": "STANDARD_SECRET", "signature": "standard-webhooks"} | overrides
    return WebhookSink(WebhookSettings(url=url, **options))


async def test_the_standardwebhooks_package_verifies_every_request(
    receiver: tuple[StandardReceiver, str],
) -> None:
    standard, url = receiver
    sink = standard_sink(url)
    batch = [outgoing(1, payload={"name": "Amina", "note": "ü ✓"}), outgoing(2)]
    try:
        assert [o.status for o in await sink.send(batch)] == [Delivery.DELIVERED] * 2
    finally:
        await sink.close()
    assert standard.refused == []
    (headers, document), _ = standard.verified
    assert headers["webhook-id"] == batch[0].idempotency_key == document["idempotency_key"]
    assert headers["webhook-signature"].startswith("v1,")
    assert document["record"] == {"name": "Amina", "note": "ü ✓"}
    assert SIGNATURE_HEADER not in headers  # one scheme per route


async def test_a_receiver_with_another_secret_refuses_and_the_route_waits(
    receiver: tuple[StandardReceiver, str],
) -> None:
    standard, url = receiver
    standard.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    sink = standard_sink(url)
    try:
        (outcome,) = await sink.send([outgoing(1)])
    finally:
        await sink.close()
    assert standard.refused == ["No matching signature found"]
    assert outcome.status is Delivery.ERRORED and outcome.target_down


async def test_the_webhook_id_is_the_idempotency_key_on_every_retry(
    tmp_path: Path, receiver: tuple[StandardReceiver, str]
) -> None:
    standard, url = receiver
    standard.fail_first = 2
    table = {
        "sources": ["beneficiaries"],
        "retry": {"initial_s": 0.02, "max_s": 0.05, "attempts": 5},
        "sink": {
            "type": "webhook",
            "url": url,
            "secret_env": "STANDARD_SECRET",
            "signature": "standard-webhooks",
        },
    }
    route = routes_from_dict({"routes": {"standard": table}}).routes["standard"]
    async with SQLiteHQStore(tmp_path / "hq.db") as store:
        await write_records(store, 1)
        router_store = RouterStore(store)
        await router_store.open()
        runner = RouteRunner(route, router_store, route.sink_type.factory(route.sink_settings))
        await deliver_all(runner, router_store, 1)
    ids = [headers["webhook-id"] for headers, _ in standard.verified]
    assert len(ids) == 3 and len(set(ids)) == 1, ids  # two 503s, then delivered
    assert ids[0] == standard.verified[0][1]["idempotency_key"]
    assert standard.refused == []


async def test_the_default_scheme_is_unchanged(receiver: tuple[StandardReceiver, str]) -> None:
    standard, url = receiver
    sink = WebhookSink(WebhookSettings(url=url, secret_env="STANDARD_SECRET"))
    try:
        (outcome,) = await sink.send([outgoing(1)])
    finally:
        await sink.close()
    assert standard.refused == ["Missing required headers"]  # not signed the standard way
    assert outcome.status is Delivery.ERRORED


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("plain-shared-secret-0123456789", "whsec_<base64 key>"),
        ("whsec_!!!not-base64!!!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "at least 24"),
    ],
)
async def test_a_secret_that_is_not_whsec_base64_stops_the_route_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str, reason: str
) -> None:
    monkeypatch.setenv("STANDARD_SECRET", secret)
    sink = {
        "type": "webhook",
        "url": "https://hooks.example.org/in",
        "secret_env": "STANDARD_SECRET",
        "signature": "standard-webhooks",
    }
    routes = routes_from_dict({"routes": {"standard": {"sources": ["b"], "sink": sink}}})
    async with SQLiteHQStore(tmp_path / "hq.db") as store:
        with pytest.raises(RouteSetupError) as raised:
            Router(routes, RouterStore(store))
    assert "route standard" in str(raised.value) and reason in str(raised.value)
    assert secret not in str(raised.value)


async def test_the_receiver_example_in_the_docs_verifies_the_sink(
    receiver: tuple[StandardReceiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = DOC.read_text("utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", doc, re.M | re.S)
    (block,) = [b for b in blocks if "standardwebhooks" in b]
    monkeypatch.setenv("DASHBOARD_WEBHOOK_SECRET", SECRET)
    applied: dict[str, Any] = {}
    namespace: dict[str, Any] = {"os": os, "apply_once": applied.setdefault}
    exec(compile(block, "docs/routing.md", "exec"), namespace)
    app = web.Application()
    app.router.add_post("/in", namespace["fieldsync_standard_hook"])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sink = standard_sink(f"http://127.0.0.1:{runner.addresses[0][1]}/in")
    try:
        item = outgoing(1)
        assert [o.status for o in await sink.send([item, item])] == [Delivery.DELIVERED] * 2
    finally:
        await sink.close()
        await runner.cleanup()
    assert list(applied) == [item.idempotency_key]
