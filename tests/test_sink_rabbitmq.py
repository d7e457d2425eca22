"""RabbitMQ sink against a real RabbitMQ node (tests/services.py); plus `RabbitHarness` for the sink
conformance suite. Consumers in these tests dedup by message_id, as the sink's docs tell them to."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import pytest
from services import RabbitServer, rabbitmq_server
from sink_harness import outgoing
from sink_harness_registry import register_harness
from sink_proxy import FaultProxy

from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outcome, Outgoing, Sink
from hq_server.sinks.rabbitmq import (
    RabbitMQSettings,
    RabbitMQSink,
    parse_template,
    render_template,
)
from hq_server.sinks.secrets import SecretError
from protocol.config import ConfigError, build, documented_keys
from protocol.logfmt import JSONFormatter

PASSWORD_ENV = "FIELDSYNC_TEST_RMQ_PASSWORD"
BINDING = "fieldsync.grants.*"

pytestmark = pytest.mark.timeout(90)


# --- helpers ------------------------------------------------------------------------------------


def item(
    n: int, *, key: str | None = None, op: str = "upsert", collection: str = "grants"
) -> Outgoing:
    key = key or f"rec-{n:05d}"
    return Outgoing(
        idempotency_key=f"finance:n1:{n}:0",
        route="finance",
        collection=collection,
        source_key=key,
        target_key=key,
        op=op,  # type: ignore[arg-type]
        payload={"id": key, "n": n, "name": f"person {n}"},
        change_seq=n,
    )


def statuses(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.status.value for o in outcomes]


@dataclasses.dataclass
class Topology:
    exchange: str
    queue: str


@dataclasses.dataclass
class Received:
    message_id: str | None
    routing_key: str | None
    delivery_mode: int | None
    content_type: str | None
    headers: dict[str, Any]
    body: Any


async def declare_topology(server: RabbitServer, *, bind: bool = True) -> Topology:
    """A durable topic exchange and a durable queue bound to it with BINDING."""
    topo = Topology(f"fs-test-{uuid.uuid4().hex[:8]}", f"fs-test-q-{uuid.uuid4().hex[:8]}")
    conn = await aio_pika.connect(server.url)
    try:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(
            topo.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(topo.queue, durable=True)
        if bind:
            await queue.bind(exchange, BINDING)
    finally:
        await conn.close()
    return topo


async def drain(server: RabbitServer, queue_name: str) -> list[Received]:
    """Every message now in the queue, in queue order, acknowledged."""
    conn = await aio_pika.connect(server.url)
    got: list[Received] = []
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count or 0
        if count:
            async with queue.iterator() as messages:
                async for message in messages:
                    got.append(
                        Received(
                            message.message_id,
                            message.routing_key,
                            int(message.delivery_mode) if message.delivery_mode else None,
                            message.content_type,
                            dict(message.headers or {}),
                            json.loads(message.body),
                        )
                    )
                    await message.ack()
                    if len(got) >= count:
                        break
    finally:
        await conn.close()
    return got


def settings_for(server: RabbitServer, exchange: str, **overrides: Any) -> RabbitMQSettings:
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password_env": PASSWORD_ENV,
        "exchange": exchange,
        "declare": True,
        "confirm_timeout_s": 5.0,
        "connect_timeout_s": 5.0,
    }
    values.update(overrides)
    return RabbitMQSettings(**values)


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(JSONFormatter())
    names = ["", "fieldsync", "aio_pika", "aiormq"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def password_env(rabbitmq_server: RabbitServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PASSWORD_ENV, rabbitmq_server.password)
    return rabbitmq_server.password


@pytest.fixture
async def topology(rabbitmq_server: RabbitServer) -> Topology:
    return await declare_topology(rabbitmq_server)


@pytest.fixture
async def sink(
    rabbitmq_server: RabbitServer,
    topology: Topology,
    password_env: str,
) -> AsyncIterator[RabbitMQSink]:
    s = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --- settings, no broker ------------------------------------------------------------------------


def test_registered_like_any_sink_with_documented_settings() -> None:
    assert SINK_TYPES["rabbitmq"].settings is RabbitMQSettings
    docs = documented_keys(RabbitMQSettings)
    assert set(docs) == {
        "user",
        "exchange",
        "host",
        "port",
        "vhost",
        "password_env",
        "password_file",
        "tls",
        "declare",
        "exchange_type",
        "routing_key_template",
        "mandatory",
        "confirm_timeout_s",
        "connect_timeout_s",
        "heartbeat_s",
        "max_message_bytes",
    }
    assert all(text.strip() for text in docs.values())
    assert SINK_TYPES["rabbitmq"].factory is RabbitMQSink


def test_routing_key_template() -> None:
    it = item(1, key="K-1")
    assert render_template(parse_template("fieldsync.{collection}.{op}"), it) == (
        "fieldsync.grants.upsert"
    )
    assert render_template(parse_template("{route}/{key}/{{x}}"), it) == "finance/K-1/{x}"
    assert render_template(parse_template("static"), it) == "static"
    for bad, reason in [
        ("{payload}", "unknown placeholder"),
        ("{key.__class__}", "unknown placeholder"),
        ("{key!r}", "unknown placeholder"),
        ("{0}", "unknown placeholder"),
        ("{}", "unknown placeholder"),
        ("a{key", "unmatched"),
        ("a}b", "unmatched"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_template(bad)


@pytest.mark.parametrize(
    ("values", "key", "reason"),
    [
        ({}, "x.user", "is required"),
        ({"user": "u", "routing_key_template": "{nope}"}, "x.routing_key_template", "unknown"),
        ({"user": "u", "exchange": "a b"}, "x.exchange", "at most 255"),
        ({"user": "u", "exchange_type": "fanoutt"}, "x.exchange_type", "must be one of"),
        ({"user": "u", "password": "x"}, "x.password", "unknown setting"),
    ],
)
def test_config_errors_name_the_key(values: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as e:
        build(RabbitMQSettings, {"password_env": "E", **values}, "routes.toml", "x.")
    assert e.value.key == key


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"user": "u"}, "password_env"),  # a password is required
        ({"user": "u", "password_env": "E", "password_file": "/f"}, "password_env"),
        ({"user": "u", "password_env": "E", "declare": True}, "declare"),  # default exchange
        ({"user": "u", "password_env": "E", "declare": True, "exchange": "amq.topic"}, "declare"),
    ],
)
def test_cross_key_settings_errors(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(RabbitMQSettings, values, "routes.toml", "x.")
    assert e.value.key == key


# --- against the broker ---------------------------------------------------------------------------


async def test_messages_arrive_in_order_persistent_with_ids_and_headers(
    rabbitmq_server: RabbitServer,
    sink: RabbitMQSink,
    topology: Topology,
) -> None:
    run = [item(n, key=f"k{n % 3}", op="delete" if n % 5 == 0 else "upsert") for n in range(1, 31)]
    assert statuses(await sink.send(run)) == ["delivered"] * 30
    got = await drain(rabbitmq_server, topology.queue)
    assert [m.message_id for m in got] == [i.idempotency_key for i in run]
    for m, sent in zip(got, run, strict=True):
        assert m.delivery_mode == 2  # persistent
        assert m.content_type == "application/json"
        assert m.routing_key == f"fieldsync.grants.{sent.op}"
        assert m.body == sent.payload
        assert m.headers == {
            "route": "finance",
            "collection": "grants",
            "key": sent.target_key,
            "op": sent.op,
            "change_seq": sent.change_seq,
        }


async def test_unroutable_is_rejected_and_the_run_goes_on(
    rabbitmq_server: RabbitServer,
    sink: RabbitMQSink,
    topology: Topology,
    password_env: str,
) -> None:
    run = [item(1), item(2, collection="unbound"), item(3)]
    out = await sink.send(run)
    assert statuses(out) == ["delivered", "rejected", "delivered"]
    assert "unroutable" in out[1].detail and "fieldsync.unbound.upsert" in out[1].detail
    assert topology.exchange in out[1].detail and "NO_ROUTE" in out[1].detail
    got = await drain(rabbitmq_server, topology.queue)
    assert [m.message_id for m in got] == [run[0].idempotency_key, run[2].idempotency_key]

    # mandatory = false: the broker drops it and confirms it, so it counts as delivered
    lax = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange, mandatory=False))
    await lax.open()
    try:
        assert statuses(await lax.send([item(4, collection="unbound")])) == ["delivered"]
    finally:
        await lax.close()


async def test_missing_exchange_without_declare_waits_for_it(
    rabbitmq_server: RabbitServer,
    password_env: str,
) -> None:
    name = f"fs-missing-{uuid.uuid4().hex[:8]}"
    sink = RabbitMQSink(settings_for(rabbitmq_server, name, declare=False))
    await sink.open()  # logs, does not raise: the broker side may be fixed later
    try:
        out = await sink.send([item(1), item(2)])
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert "does not exist" in out[0].detail and name in out[0].detail
        assert out[1] == NOT_ATTEMPTED
        topo = await declare_topology(rabbitmq_server)
        fixed = RabbitMQSink(settings_for(rabbitmq_server, topo.exchange, declare=False))
        await fixed.open()
        assert statuses(await fixed.send([item(1)])) == ["delivered"]
        await fixed.close()
    finally:
        await sink.close()


async def test_password_sources_and_secrecy(
    rabbitmq_server: RabbitServer,
    topology: Topology,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = rabbitmq_server.password
    secret_file = tmp_path / "rmq.secret"
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    texts: list[str] = []
    with captured_logs() as lines:
        by_file = settings_for(
            rabbitmq_server, topology.exchange, password_env=None, password_file=secret_file
        )
        sink = RabbitMQSink(by_file)
        await sink.open()
        assert statuses(await sink.send([item(1)])) == ["delivered"]
        texts += [repr(sink), repr(sink.settings)]
        await sink.close()

        monkeypatch.setenv(PASSWORD_ENV, password)
        sink = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange))
        await sink.open()
        assert statuses(await sink.send([item(2)])) == ["delivered"]
        await sink.close()

        monkeypatch.setenv(PASSWORD_ENV, "wrong-" + password)
        sink = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange))
        await sink.open()
        out = await sink.send([item(3), item(4)])
        await sink.close()
        assert out[0].status is Delivery.ERRORED and out[0].target_down and out[1] == NOT_ATTEMPTED
        texts += [o.detail for o in out]

        secret_file.chmod(0o644)
        with pytest.raises(SecretError, match="chmod 600") as e:
            await RabbitMQSink(by_file).open()
        texts.append(str(e.value))
    assert lines
    for text in texts + lines:
        assert password not in text


async def test_broker_down_is_errored_then_recovers(
    rabbitmq_server: RabbitServer,
    sink: RabbitMQSink,
    topology: Topology,
) -> None:
    assert statuses(await sink.send([item(1)])) == ["delivered"]
    rabbitmq_server.stop_app()
    try:
        out = await sink.send([item(2), item(3)])
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert out[1] == NOT_ATTEMPTED
    finally:
        rabbitmq_server.start_app()
    assert statuses(await sink.send([item(2), item(3)])) == ["delivered", "delivered"]
    got = await drain(rabbitmq_server, topology.queue)
    assert [m.message_id for m in got] == [item(n).idempotency_key for n in (1, 2, 3)]


async def test_connection_killed_between_runs_reconnects_transparently(
    rabbitmq_server: RabbitServer,
    sink: RabbitMQSink,
    topology: Topology,
) -> None:
    assert statuses(await sink.send([item(1)])) == ["delivered"]
    rabbitmq_server.close_all_connections()
    await wait_until(lambda: not sink.connected)
    assert statuses(await sink.send([item(2)])) == ["delivered"]
    got = await drain(rabbitmq_server, topology.queue)
    assert [m.message_id for m in got] == [item(1).idempotency_key, item(2).idempotency_key]


async def test_connection_killed_mid_stream_is_at_least_once(
    rabbitmq_server: RabbitServer,
    sink: RabbitMQSink,
    topology: Topology,
) -> None:
    """Kill every connection while runs are being published: the run in flight is ERRORED (or the
    sink reconnects between two items), the router's retry re-sends what was not DELIVERED, and a
    consumer deduplicating by message_id sees exactly the sent set, in order."""
    killed = threading.Event()

    def kill() -> None:
        time.sleep(0.2)
        try:
            rabbitmq_server.close_all_connections()
        finally:
            killed.set()

    killer = threading.Thread(target=kill)
    killer.start()
    sent: list[Outgoing] = []
    errored = 0
    first_connection = sink._connection
    n = 0
    try:
        while (not killed.is_set() or n < 200) and n < 20_000:
            run = [item(n + i) for i in range(20)]
            n += 20
            for _attempt in range(50):  # the router's retry loop, bounded
                out = await sink.send(run)
                assert len(out) == len(run)
                done = 0
                for outcome in out:
                    if outcome.status is not Delivery.DELIVERED:
                        break
                    done += 1
                assert all(o.status is Delivery.ERRORED for o in out[done:])
                errored += len(out) - done
                sent += run[:done]
                run = run[done:]
                if not run:
                    break
                await asyncio.sleep(0.05)
            assert not run, "the sink did not recover"
            await asyncio.sleep(0)  # let the killer's effect be noticed between runs too
    finally:
        killer.join()
    assert errored > 0 or sink._connection is not first_connection, "the kill went unnoticed"
    got = await drain(rabbitmq_server, topology.queue)
    ids = [m.message_id for m in got]
    deduped = list(dict.fromkeys(ids))  # a consumer keeping the first of each message_id
    assert deduped == [i.idempotency_key for i in sent]
    assert len(ids) - len(deduped) <= errored  # at most one duplicate per ERRORED publish


async def test_unconfirmed_publish_is_errored(
    rabbitmq_server: RabbitServer,
    topology: Topology,
    password_env: str,
) -> None:
    """A memory alarm blocks publishers: no confirm arrives, the item is ERRORED after
    confirm_timeout_s (target down), and delivery resumes once the alarm clears."""
    sink = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange, confirm_timeout_s=0.5))
    await sink.open()
    try:
        rabbitmq_server.ctl("set_vm_memory_high_watermark", "0.0000001")
        try:
            out = await sink.send([item(1), item(2)])
        finally:
            rabbitmq_server.ctl("set_vm_memory_high_watermark", "0.4")
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert "no publisher confirm" in out[0].detail and out[1] == NOT_ATTEMPTED
        assert statuses(await sink.send([item(1), item(2)])) == ["delivered", "delivered"]
    finally:
        await sink.close()
    ids = list(dict.fromkeys(m.message_id for m in await drain(rabbitmq_server, topology.queue)))
    assert ids == [item(1).idempotency_key, item(2).idempotency_key]


async def test_oversized_and_non_json_payloads_are_rejected(
    rabbitmq_server: RabbitServer,
    topology: Topology,
    password_env: str,
) -> None:
    sink = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange, max_message_bytes=1000))
    await sink.open()
    try:
        big = dataclasses.replace(item(2), payload={"blob": "x" * 2000})
        not_json = dataclasses.replace(item(3), payload={"set": {1, 2}})
        long_key = item(4, key="k" * 300)
        tmpl = RabbitMQSink(
            settings_for(rabbitmq_server, topology.exchange, routing_key_template="{key}")
        )
        out = await sink.send([item(1), big, not_json])
        assert statuses(out) == ["delivered", "rejected", "rejected"]
        assert "max_message_bytes" in out[1].detail and "JSON" in out[2].detail
        out = await tmpl.send([long_key])
        assert statuses(out) == ["rejected"] and "255 bytes" in out[0].detail
        await tmpl.close()
    finally:
        await sink.close()


async def test_missing_write_permission_is_rejected(
    rabbitmq_server: RabbitServer,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user that may read and configure but not write: each publish is refused (403) and
    REJECTED with the reason; the channel the broker closed is replaced for the next item."""
    user, password = f"ro-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    rabbitmq_server.ctl("add_user", user, password)
    rabbitmq_server.ctl("set_permissions", "-p", "/", user, ".*", "^$", ".*")
    monkeypatch.setenv(PASSWORD_ENV, password)
    sink = RabbitMQSink(settings_for(rabbitmq_server, topology.exchange, user=user))
    await sink.open()
    try:
        out = await sink.send([item(1), item(2)])
    finally:
        await sink.close()
    assert statuses(out) == ["rejected", "rejected"]
    assert "access refused" in out[0].detail and user in out[0].detail
    assert "write permission" in out[0].detail
    assert await drain(rabbitmq_server, topology.queue) == []


# --- conformance harness --------------------------------------------------------------------------


class RabbitHarness:
    """The rabbitmq sink, through a FaultProxy, on a fresh durable topic exchange with one durable
    queue bound to "fieldsync.grants.*" (the default routing_key_template gives
    fieldsync.{collection}.{op}); the password is in a 0600 file.

    received(): what a consumer keeps that deduplicates by message_id as the docs say: the first of
    each message_id, in queue order, as (message_id, JSON body). current(): the last body per `key`
    header, a delete removing the key. rejected_item: the same item from another collection is
    unroutable (REJECTED). set_available: the proxy resets every connection and refuses new ones,
    or passes again (the queue is read straight from the broker)."""

    name = "rabbitmq"

    def __init__(self, server: RabbitServer, proxy: FaultProxy, secret_dir: Path) -> None:
        self.server = server
        self.proxy = proxy
        self.secret_dir = secret_dir
        self.secrets = [server.password]
        self._sinks: list[RabbitMQSink] = []
        self._messages: list[Received] = []

    async def setup(self) -> RabbitHarness:
        self.topology = await declare_topology(self.server)
        secret = self.secret_dir / "rmq-harness.secret"
        secret.write_text(self.server.password)
        secret.chmod(0o600)
        self.settings = RabbitMQSettings(
            host="127.0.0.1",
            port=self.proxy.port,
            user=self.server.user,
            password_file=secret,
            exchange=self.topology.exchange,
            declare=True,
            confirm_timeout_s=5.0,
            connect_timeout_s=5.0,
        )
        return self

    async def make_sink(self) -> Sink:
        sink = RabbitMQSink(self.settings)
        await sink.open()
        self._sinks.append(sink)
        return sink

    async def _kept(self) -> list[Received]:
        self._messages += await drain(self.server, self.topology.queue)
        seen: set[str | None] = set()
        kept = []
        for m in self._messages:
            if m.message_id not in seen:
                seen.add(m.message_id)
                kept.append(m)
        return kept

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m.message_id or "", m.body) for m in await self._kept()]

    async def current(self) -> dict[str, dict[str, Any]]:
        state: dict[str, dict[str, Any]] = {}
        for m in await self._kept():
            if m.headers.get("op") == "delete":
                state.pop(str(m.headers.get("key")), None)
            else:
                state[str(m.headers.get("key"))] = m.body
        return state

    async def set_available(self, available: bool) -> None:
        self.proxy.set_mode("pass" if available else "reset")

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        return dataclasses.replace(base, collection="unrouted")

    async def cleanup(self) -> None:
        for sink in self._sinks:
            await sink.close()
        self.proxy.set_mode("pass")
        conn = await aio_pika.connect(self.server.url)
        try:
            channel = await conn.channel()
            await channel.queue_delete(self.topology.queue)
            await channel.exchange_delete(self.topology.exchange)
        finally:
            await conn.close()


@register_harness("rabbitmq", uses=(rabbitmq_server,))
@pytest.fixture
async def rabbitmq_harness(
    rabbitmq_server: RabbitServer,
    tmp_path: Path,
) -> AsyncIterator[RabbitHarness]:
    """A RabbitHarness on a fresh exchange and queue of the session's node, behind its own proxy."""
    proxy = await FaultProxy(rabbitmq_server.host, rabbitmq_server.port).start()
    try:
        harness = await RabbitHarness(rabbitmq_server, proxy, tmp_path).setup()
        try:
            yield harness
        finally:
            await harness.cleanup()
    finally:
        await proxy.stop()


async def test_harness_self_check(rabbitmq_harness: RabbitHarness) -> None:
    harness = rabbitmq_harness
    sink = await harness.make_sink()
    first, second = outgoing(1), outgoing(2)
    bad = harness.rejected_item(outgoing(3))
    assert bad is not None
    out = await sink.send([first, bad, second])
    assert statuses(out) == ["delivered", "rejected", "delivered"]
    assert statuses(await sink.send([first])) == ["delivered"]  # a repeat: deduplicated below
    assert await harness.received() == [
        (first.idempotency_key, first.payload),
        (second.idempotency_key, second.payload),
    ]
    assert len(harness._messages) == 3  # the broker did get the repeat
    assert await harness.current() == {
        first.target_key: first.payload,
        second.target_key: second.payload,
    }
    await harness.set_available(False)
    out = await sink.send([outgoing(4), outgoing(5)])
    assert out[0].status is Delivery.ERRORED and out[0].target_down and out[1] == NOT_ATTEMPTED
    assert len(await harness.received()) == 2  # readable while the sink is cut off
    await harness.set_available(True)
    assert statuses(await sink.send([outgoing(4)])) == ["delivered"]
    assert [k for k, _ in await harness.received()][-1] == outgoing(4).idempotency_key
