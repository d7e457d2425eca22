"""A well-behaved webhook receiver for end-to-end routing tests: a real aiohttp server on
127.0.0.1, in a thread of its own, that verifies fieldsync's HMAC signature, keeps each
Idempotency-Key once (a repeat is answered 2xx and changes nothing), and can be told to fail."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hq_server.sinks.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify_signature,
)


@dataclass
class Receiver:
    secret: bytes
    port: int = 0
    unavailable: bool = False  # answer 503 to everything
    reject_keys: set[str] = field(default_factory=set)  # answer 400 for these record keys
    delay_s: float = 0.0
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # idempotency key -> body
    accepted_order: list[dict[str, Any]] = field(default_factory=list)
    arrivals: int = 0
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            self.arrivals += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not verify_signature(
            self.secret,
            request.headers.get(TIMESTAMP_HEADER, ""),
            body,
            request.headers.get(SIGNATURE_HEADER, ""),
        ):
            with self.lock:
                self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        if self.unavailable:
            return web.json_response({"error": "maintenance"}, status=503)
        document = json.loads(body)
        if document["key"] in self.reject_keys:
            return web.json_response({"error": "amount must be positive"}, status=400)
        key = request.headers[IDEMPOTENCY_HEADER]
        with self.lock:
            if key not in self.held:
                self.held[key] = document
                self.accepted_order.append(document)
        return web.json_response({"ok": True})

    def snapshot(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        with self.lock:
            return dict(self.held), list(self.accepted_order)

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.held) >= count:
                    return
            time.sleep(0.05)
        raise AssertionError(f"receiver holds {len(self.held)} deliveries, expected {count}")


@contextmanager
def running_receiver(secret: bytes) -> Iterator[Receiver]:
    receiver = Receiver(secret)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver.port = runner.addresses[0][1]
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    ready.wait(10)
    try:
        yield receiver
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
