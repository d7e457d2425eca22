"""The webhook sink against a real receiver on 127.0.0.1 (aiohttp), through a fault proxy.

The receiver behaves like a good webhook consumer: it checks the HMAC signature and the timestamp
with its own code (not the sink's), refuses what fails, and treats a repeated Idempotency-Key as
done. It also provides the `webhook` conformance harness.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sink_harness import items, outgoing
from sink_harness_registry import register_harness
from sink_proxy import FaultProxy

from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outcome, Outgoing
from hq_server.sinks.secrets import SecretError
from hq_server.sinks.webhook import WebhookSettings, WebhookSink, sign, verify_signature
from protocol.config import ConfigError, build, documented_keys

pytestmark = pytest.mark.timeout(30)
SECRET = "whsec-conformance-5f2b9c1e"
BODY_FIELDS = {"idempotency_key", "route", "collection", "key", "op", "record", "change_seq"}


@dataclass
class Receiver:
    """A webhook endpoint that verifies, deduplicates and records, and can be told to misbehave."""

    secret: bytes
    tolerance_s: int = 300
    accepted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (key, body)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)  # all of them
    answer_for: dict[str, tuple[int, str]] = field(default_factory=dict)  # target key -> answer
    answer_all: tuple[int, str] | None = None
    delay_s: float = 0.0
    redirected: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_get("/elsewhere", self.elsewhere)
        return app

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected = True
        return web.Response(status=204)

    def _signed(self, request: web.Request, body: bytes) -> bool:
        timestamp = request.headers.get("X-Fieldsync-Timestamp", "")
        signature = request.headers.get("X-Fieldsync-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.tolerance_s:
            return False
        mac = hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature, "sha256=" + mac)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not self._signed(request, body):
            return web.Response(status=401, text="bad signature")
        document = json.loads(body)
        if request.content_type != "application/json" or set(document) != BODY_FIELDS:
            return web.Response(status=400, text=f"bad body fields {sorted(document)}")
        key = document["idempotency_key"]
        if request.headers.get("Idempotency-Key") != key:
            return web.Response(status=400, text="Idempotency-Key header does not match the body")
        if request.headers.get("X-Fieldsync-Route") != document["route"]:
            return web.Response(status=400, text="X-Fieldsync-Route does not match the body")
        answer = self.answer_all or self.answer_for.get(document["key"])
        if answer is not None:
            status, text = answer
            if 300 <= status < 400:
                raise web.HTTPFound("/elsewhere")
            return web.Response(status=status, text=text)
        if any(known == key for known, _ in self.accepted):
            return web.json_response({"duplicate": True})  # done already: change nothing
        self.accepted.append((key, document))
        return web.Response(status=204)


class WebhookHarness:
    """The conformance harness: receiver + proxy; 'unavailable' resets every connection."""

    name = "webhook"

    def __init__(self, receiver: Receiver, proxy: FaultProxy, secret_file: Path) -> None:
        self.receiver, self.proxy, self.secret_file = receiver, proxy, secret_file
        self.secrets = (SECRET,)

    async def make_sink(self) -> WebhookSink:
        settings = WebhookSettings(
            url=self.proxy.url("/hook"), secret_file=self.secret_file, timeout_s=3
        )
        sink = WebhookSink(settings)
        await sink.open()
        return sink

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        return [(key, body["record"]) for key, body in self.receiver.accepted]

    async def current(self) -> dict[str, dict[str, Any]]:
        return {body["key"]: body["record"] for _, body in self.receiver.accepted}

    async def set_available(self, available: bool) -> None:
        self.proxy.set_mode("pass" if available else "reset")

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        key = f"{base.target_key}-refused"
        self.receiver.answer_for[key] = (400, "record refused: amount out of range")
        return replace(
            base, target_key=key, source_key=key, idempotency_key=base.idempotency_key + ":r"
        )

    async def cleanup(self) -> None:
        await self.proxy.stop()


def write_secret(path: Path, value: str = SECRET) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@register_harness("webhook")
@pytest.fixture
async def webhook_harness(tmp_path: Path) -> AsyncIterator[WebhookHarness]:
    receiver = Receiver(SECRET.encode())
    server = TestServer(receiver.app(), host="127.0.0.1", port=0)
    await server.start_server()
    proxy = await FaultProxy("127.0.0.1", server.port or 0).start()
    harness = WebhookHarness(receiver, proxy, write_secret(tmp_path / "webhook.secret"))
    try:
        yield harness
    finally:
        await harness.cleanup()
        await server.close()


@pytest.fixture
async def rig(webhook_harness: WebhookHarness) -> AsyncIterator[tuple[WebhookSink, Receiver]]:
    """A sink with a short timeout, straight at the receiver's proxy."""
    settings = WebhookSettings(
        url=webhook_harness.proxy.url("/hook"),
        secret_file=webhook_harness.secret_file,
        timeout_s=0.5,
    )
    sink = WebhookSink(settings)
    await sink.open()
    try:
        yield sink, webhook_harness.receiver
    finally:
        await sink.close()


# -- signature


def test_signature_matches_a_known_vector() -> None:
    # printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
    expected = "sha256=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
    assert sign(b"whsec_test", "1700000000", b'{"a":1}') == expected


def test_verify_signature_refuses_tampering_staleness_and_other_secrets() -> None:
    body, stamp = b'{"a":1}', "1700000000"
    good = sign(b"whsec_test", stamp, body)
    assert verify_signature(b"whsec_test", stamp, body, good, now=1700000100)
    assert not verify_signature(b"whsec_test", stamp, b'{"a":2}', good, now=1700000100)
    assert not verify_signature(b"other", stamp, body, good, now=1700000100)
    assert not verify_signature(b"whsec_test", stamp, body, good, now=1700000000 + 301)
    assert not verify_signature(b"whsec_test", "17e8", body, good, now=1700000000)


async def test_request_body_headers_and_signature(webhook_harness: WebhookHarness) -> None:
    settings = WebhookSettings(url=webhook_harness.proxy.url("/hook"), secret_env="WH_SECRET")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WH_SECRET", SECRET)
        sink = WebhookSink(settings, clock=lambda: 1_700_000_000.9)
    webhook_harness.receiver.tolerance_s = 10**10  # the injected clock is far in the past
    item = outgoing(7, payload={"id": "rec-0007", "nested": {"a": [1, 2]}, "text": "é\u2028"})
    try:
        assert await sink.send([item]) == [Outcome.delivered()]
    finally:
        await sink.close()
    headers, body = webhook_harness.receiver.requests[-1]
    assert headers["X-Fieldsync-Timestamp"] == "1700000000"
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert headers["X-Fieldsync-Signature"] == "sha256=" + expected
    assert headers["Idempotency-Key"] == item.idempotency_key
    assert headers["X-Fieldsync-Route"] == item.route
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {
        "idempotency_key": item.idempotency_key,
        "route": item.route,
        "collection": item.collection,
        "key": item.target_key,
        "op": "upsert",
        "record": item.payload,
        "change_seq": 7,
    }


async def test_a_wrong_secret_is_rejected_by_the_receiver(webhook_harness: WebhookHarness) -> None:
    wrong = write_secret(webhook_harness.secret_file.with_name("wrong.secret"), "not-the-secret")
    sink = WebhookSink(WebhookSettings(url=webhook_harness.proxy.url("/hook"), secret_file=wrong))
    try:
        (outcome,) = await sink.send([outgoing(1)])
    finally:
        await sink.close()
    # A wrong secret is the route's problem, not the item's: the route waits, nothing is dead-lettered.
    assert outcome.status is Delivery.ERRORED and outcome.target_down
    assert "401" in outcome.detail and "bad signature" in outcome.detail


# -- classification


@pytest.mark.parametrize(
    ("status", "down"), [(408, True), (429, True), (500, False), (502, True), (503, True)]
)
async def test_busy_or_failing_receiver_is_errored(
    rig: tuple[WebhookSink, Receiver], status: int, down: bool
) -> None:
    sink, receiver = rig
    receiver.answer_all = (status, "try later")
    outcomes = await sink.send(items(3))
    assert outcomes[0].status is Delivery.ERRORED and str(status) in outcomes[0].detail
    assert outcomes[0].target_down is down  # a 500 may be this item's fault: retries count
    assert outcomes[1:] == [NOT_ATTEMPTED, NOT_ATTEMPTED]
    assert len(receiver.requests) == 1, "nothing is sent after the first ERRORED item"


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 422])
async def test_refused_items_are_rejected_and_the_run_goes_on(
    rig: tuple[WebhookSink, Receiver], status: int
) -> None:
    sink, receiver = rig
    answer = "x" * 150 + " the rest of a long answer that the detail cuts off " + "y" * 300
    receiver.answer_for["rec-0002"] = (status, answer)
    outcomes = await sink.send(items(3))
    assert [o.status for o in outcomes] == [
        Delivery.DELIVERED,
        Delivery.REJECTED,
        Delivery.DELIVERED,
    ]
    assert outcomes[1].detail == f"HTTP {status}: {answer[:200]}"
    assert [key for key, _ in receiver.accepted] == [
        items(3)[0].idempotency_key,
        items(3)[2].idempotency_key,
    ]


async def test_redirects_are_not_followed(rig: tuple[WebhookSink, Receiver]) -> None:
    sink, receiver = rig
    receiver.answer_for["rec-0001"] = (302, "")
    outcomes = await sink.send(items(2))
    assert outcomes[0].status is Delivery.ERRORED and "302" in outcomes[0].detail
    assert outcomes[0].target_down
    assert outcomes[1] == NOT_ATTEMPTED
    assert not receiver.redirected


async def test_a_slow_receiver_times_out_as_errored(rig: tuple[WebhookSink, Receiver]) -> None:
    sink, receiver = rig
    receiver.delay_s = 2.0  # timeout_s is 0.5
    started = time.monotonic()
    outcomes = await sink.send(items(2))
    assert time.monotonic() - started < 1.5
    assert outcomes[0].status is Delivery.ERRORED and "timed out" in outcomes[0].detail
    assert outcomes[0].target_down
    assert outcomes[1] == NOT_ATTEMPTED
    receiver.delay_s = 0
    assert [o.status for o in await sink.send(items(2))] == [Delivery.DELIVERED] * 2


async def test_unencodable_record_is_rejected(rig: tuple[WebhookSink, Receiver]) -> None:
    sink, receiver = rig
    receiver.answer_for.clear()
    bad = outgoing(2, payload={"amount": float("nan")})
    outcomes = await sink.send([outgoing(1), bad, outgoing(3)])
    assert [o.status for o in outcomes] == [
        Delivery.DELIVERED,
        Delivery.REJECTED,
        Delivery.DELIVERED,
    ]
    assert "JSON" in outcomes[1].detail


async def test_a_header_injection_attempt_is_rejected(rig: tuple[WebhookSink, Receiver]) -> None:
    sink, receiver = rig
    bad = replace(outgoing(2), idempotency_key="k2\r\nX-Injected: 1")
    outcomes = await sink.send([outgoing(1), bad, outgoing(3)])
    assert [o.status for o in outcomes] == [
        Delivery.DELIVERED,
        Delivery.REJECTED,
        Delivery.DELIVERED,
    ]
    assert all("X-Injected" not in headers for headers, _ in receiver.requests)


@pytest.mark.parametrize("mode", ["refuse", "reset", "blackhole"])
async def test_network_faults_are_errored_then_recovered(
    webhook_harness: WebhookHarness, rig: tuple[WebhookSink, Receiver], mode: Any
) -> None:
    sink, receiver = rig
    assert [o.status for o in await sink.send(items(1))] == [Delivery.DELIVERED]
    webhook_harness.proxy.set_mode("reset")  # drop the pooled connection first
    webhook_harness.proxy.set_mode(mode)
    outcomes = await sink.send(items(2, start=2))
    assert outcomes[0].status is Delivery.ERRORED and outcomes[0].detail
    assert outcomes[0].target_down
    assert outcomes[1] == NOT_ATTEMPTED
    webhook_harness.proxy.set_mode("pass")
    assert [o.status for o in await sink.send(items(2, start=2))] == [Delivery.DELIVERED] * 2
    assert len(receiver.accepted) == 3


async def test_a_slow_link_still_delivers(
    webhook_harness: WebhookHarness, rig: tuple[WebhookSink, Receiver]
) -> None:
    sink, receiver = rig
    webhook_harness.proxy.delay_ms = 50
    started = time.monotonic()
    assert [o.status for o in await sink.send(items(2))] == [Delivery.DELIVERED] * 2
    assert time.monotonic() - started >= 0.2  # two chunks each way per request, 50 ms each
    assert len(receiver.accepted) == 2


# -- TLS


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldsync test receiver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_is_verified_and_ca_bundle_adds_trust(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    receiver = Receiver(SECRET.encode())
    server = TestServer(receiver.app(), host="127.0.0.1", port=0)
    await server.start_server(ssl=context)
    secret = write_secret(tmp_path / "s")
    url = f"https://127.0.0.1:{server.port}/hook"
    try:
        untrusted = WebhookSink(WebhookSettings(url=url, secret_file=secret))
        try:
            (outcome,) = await untrusted.send([outgoing(1)])
        finally:
            await untrusted.close()
        assert outcome.status is Delivery.ERRORED and outcome.target_down
        assert "certificate" in outcome.detail.lower()
        assert receiver.requests == []
        trusted = WebhookSink(WebhookSettings(url=url, secret_file=secret, ca_bundle=cert))
        try:
            assert [o.status for o in await trusted.send([outgoing(1)])] == [Delivery.DELIVERED]
        finally:
            await trusted.close()
    finally:
        await server.close()


# -- settings


def test_registered_with_documented_settings() -> None:
    sink_type = SINK_TYPES["webhook"]
    assert sink_type.factory is WebhookSink and sink_type.settings is WebhookSettings
    docs = documented_keys(WebhookSettings)
    assert set(docs) == {"url", "secret_env", "secret_file", "timeout_s", "ca_bundle", "signature"}
    assert all(text.strip() for text in docs.values())


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"secret_env": "X"}, "url"),
        ({"url": "ftp://example.org/x", "secret_env": "X"}, "url"),
        ({"url": "https://user:pw@example.org/x", "secret_env": "X"}, "url"),
        ({"url": "https://example.org/x"}, "secret_env"),
        ({"url": "https://example.org/x", "secret_env": "X", "secret_file": "/s"}, "secret_env"),
        ({"url": "https://example.org/x", "secret_env": "X", "timeout_s": 0}, "timeout_s"),
        ({"url": "https://example.org/x", "secret_env": "X", "verify": False}, "verify"),
    ],
)
def test_bad_settings_are_refused(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(WebhookSettings, table, "routes.toml", "routes.crm.sink.")
    assert error.value.key.endswith(key)


def test_secret_problems_are_reported_without_the_secret(tmp_path: Path) -> None:
    loose = tmp_path / "loose.secret"
    loose.write_text(SECRET)
    loose.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600") as error:
        WebhookSink(WebhookSettings(url="https://example.org/x", secret_file=loose))
    assert SECRET not in str(error.value)
    with pytest.raises(SecretError, match="NOT_SET_ANYWHERE"):
        WebhookSink(WebhookSettings(url="https://example.org/x", secret_env="NOT_SET_ANYWHERE"))


def test_repr_shows_the_target_not_the_secret(tmp_path: Path) -> None:
    sink = WebhookSink(
        WebhookSettings(url="https://example.org/hook", secret_file=write_secret(tmp_path / "s"))
    )
    assert repr(sink) == "WebhookSink(url='https://example.org/hook')"
    assert SECRET not in repr(vars(sink))
