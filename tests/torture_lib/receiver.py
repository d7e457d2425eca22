"""A webhook receiver for the torture run: verifies fieldsync's signature and records every
delivery it answered 2xx, repeats included, so the checker can count them by idempotency key.

It runs in the torture process's event loop (aiohttp on 127.0.0.1, an ephemeral port) and lives
as long as the run, across HQ's deaths: what HQ's router delivered is only what arrived here.
"""

from __future__ import annotations

import json

from aiohttp import web

from hq_server.sinks.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)
from torture_lib.checker import Delivery


class Receiver:
    def __init__(self, route: str, secret: bytes) -> None:
        self.route = route
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.bad_signatures = 0
        self.mismatched_keys = 0  # Idempotency-Key header != the body's idempotency_key
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not verify_signature(
            self.secret, timestamp, body, request.headers.get(SIGNATURE_HEADER, "")
        ):
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        doc = json.loads(body)
        if request.headers.get(IDEMPOTENCY_HEADER) != doc["idempotency_key"]:
            self.mismatched_keys += 1
        self.deliveries.append(
            Delivery(
                route=self.route,
                idempotency_key=doc["idempotency_key"],
                collection=doc["collection"],
                key=doc["key"],
                op=doc["op"],
                record=doc.get("record") or {},
                change_seq=int(doc["change_seq"]),
            )
        )
        return web.json_response({"ok": True})
