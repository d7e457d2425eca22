"""RabbitMQ sink: publish each record as one persistent, confirmed message on an exchange.

Each message: body = the payload as JSON (`content_type` application/json), `delivery_mode` 2
(persistent), `message_id` = the item's idempotency key, `app_id` "fieldsync", `type` the op, and
headers `route`, `collection`, `key` (target key), `op` ("upsert" or "delete") and `change_seq`. The
routing key comes from `routing_key_template`, a tiny formatter over {collection}, {op}, {route} and
{key} only ("{{" and "}}" are literal braces), e.g. "fieldsync.{collection}.{op}".

Delivery is AT LEAST ONCE: an item whose confirm was lost (connection dropped after the broker
stored it) is ERRORED and published again later with the same `message_id`. Consumers MUST
deduplicate by `message_id` (and may order by the `change_seq` header, which grows per record).

Each item is published and its publisher confirm awaited before the next one, so nothing after an
ERRORED item reaches the broker (per-key order holds) -- at the cost of one round trip per message.

    DELIVERED  the broker confirmed (basic.ack): the message is routed to at least one queue
               (with `mandatory = true`) and persisted by the queues that are durable.
    DOWN       ERRORED with `target_down` (`Outcome.unavailable`: the router waits it out without
               spending the items' retries): cannot connect, credentials refused, connection or
               channel lost, no confirm within `confirm_timeout_s` (e.g. a broker blocking
               publishers on a memory or disk alarm), a missing exchange with `declare = false`
               (checked when connecting: create it and the route resumes). The next `send`
               reconnects.
    ERRORED    basic.nack (the broker could not take this message): retried later.
    REJECTED   unroutable: with `mandatory = true` the broker returned it (312 NO_ROUTE) because no
               queue is bound for its routing key. That is a topology/configuration problem, not a
               transient one: retrying would drop nothing into a queue either, so it is dead-lettered
               with the exchange and routing key in the detail (bind a queue, fix the template, and
               replay the dead letters); the run goes on. Also: access refused (403: the user may
               not write to the exchange), a payload that is not JSON, a body over
               `max_message_bytes`, a routing key over 255 bytes.

Connections are plain (not aio-pika's "robust" ones): the sink checks its connection before each
item and reconnects itself, so a loss shows as one ERRORED run instead of publishes hanging while a
background task reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import orjson

from hq_server.logs import event
from hq_server.sinks.base import NOT_ATTEMPTED, Delivery, Outcome, Outgoing, register_sink
from hq_server.sinks.http import exactly_one_secret, required_setting, settings_error
from hq_server.sinks.plaintext import Plaintext, is_loopback
from hq_server.sinks.secrets import SecretError, SecretMask, resolve_secret
from protocol.config import at_least, between, positive, setting

log = logging.getLogger("fieldsync.sinks.rabbitmq")

TEMPLATE_FIELDS = ("collection", "op", "route", "key")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_EXCHANGE = re.compile(r"[A-Za-z0-9_.:\-]{0,255}")
_DETAIL_MAX = 500


def parse_template(template: str) -> list[str | tuple[str]]:
    """The template as literal strings and (field,) placeholders; ValueError if malformed."""
    parts: list[str | tuple[str]] = []
    literal: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        literal.append(template[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif m.group(1) is None:
            raise ValueError(f"unmatched {token!r} at {m.start()} (write {token * 2} for a brace)")
        elif m.group(1) not in TEMPLATE_FIELDS:
            raise ValueError(
                f"unknown placeholder {{{m.group(1)}}} (known: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                + ")"
            )
        else:
            parts += ["".join(literal), (m.group(1),)]
            literal = []
    literal.append(template[pos:])
    parts.append("".join(literal))
    return [p for p in parts if p != ""]


def render_template(parts: Sequence[str | tuple[str]], item: Outgoing) -> str:
    values = {
        "collection": item.collection,
        "op": item.op,
        "route": item.route,
        "key": item.target_key,
    }
    return "".join(p if isinstance(p, str) else values[p[0]] for p in parts)


def check_template(value: Any) -> str | None:
    try:
        parse_template(str(value))
    except ValueError as e:
        return str(e)
    return None


def check_exchange(value: Any) -> str | None:
    if not _EXCHANGE.fullmatch(str(value)):
        return "must be at most 255 letters, digits, '-', '_', '.' or ':' (empty: default exchange)"
    return None


@dataclasses.dataclass(frozen=True)
class RabbitMQSettings:
    """`type = "rabbitmq"`: persistent messages on a RabbitMQ exchange (see rabbitmq.py)."""

    user: str = required_setting("User to log in as (required).")
    exchange: str = setting(
        "",
        "Exchange to publish to; empty: the default exchange (the routing key names the queue).",
        check_exchange,
    )
    host: str = setting("localhost", "Broker host name or address.")
    port: int = setting(
        5672, "Broker AMQP port (5671 is usual with tls = true).", between(1, 65535)
    )
    vhost: str = setting("/", "Virtual host.")
    password_env: str | None = setting(
        None, "Environment variable holding the user's password (set this or password_file)."
    )
    password_file: Path | None = setting(
        None, "File holding the user's password, mode 0600 or stricter."
    )
    tls: bool = setting(False, "Connect with TLS (amqps), checking the broker's certificate.")
    declare: bool = setting(
        False,
        "Declare the exchange (durable, of exchange_type) when connecting. False: it must exist "
        "(checked when connecting; a missing one makes runs ERRORED).",
    )
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = setting(
        "topic", "Type of the exchange when declare = true."
    )
    routing_key_template: str = setting(
        "fieldsync.{collection}.{op}",
        "Routing key of each message; placeholders {collection}, {op}, {route}, {key} only, "
        "'{{' and '}}' for literal braces.",
        check_template,
    )
    mandatory: bool = setting(
        True,
        "Ask the broker to return a message no queue is bound for: it is then REJECTED "
        "(dead-lettered). False: such a message is dropped by the broker and counts as DELIVERED.",
    )
    confirm_timeout_s: float = setting(
        10.0, "Seconds to wait for the broker's publisher confirm before ERRORED.", positive
    )
    connect_timeout_s: float = setting(10.0, "Seconds to connect and open the channel.", positive)
    heartbeat_s: int = setting(
        30,
        "AMQP heartbeat, seconds: a dead connection is noticed within about twice this.",
        at_least(0),
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024,
        "Largest message body; a larger payload is REJECTED (RabbitMQ's own limit is 128 MiB).",
        between(1, 128 * 1024 * 1024),
    )

    def __post_init__(self) -> None:
        # build() checks keys one at a time; combinations (and direct construction) are checked here.
        if not self.user:
            raise settings_error("user", "must not be empty")
        exactly_one_secret("the password", "password_env", self.password_env, self.password_file)
        if (reason := check_exchange(self.exchange)) is not None:
            raise settings_error("exchange", reason)
        if self.declare and (not self.exchange or self.exchange.startswith("amq.")):
            raise settings_error("declare", "needs a named exchange outside amq.*")
        if (reason := check_template(self.routing_key_template)) is not None:
            raise settings_error("routing_key_template", reason)

    def plaintext(self) -> list[Plaintext]:
        """amqp:// (tls = false) to a host that is not this machine (see `sinks.plaintext`)."""
        if self.tls or is_loopback(self.host):
            return []
        return [
            Plaintext(
                "tls",
                f"amqp:// without TLS to {self.host}",
                "set tls = true (and port = 5671, the usual amqps port)",
            )
        ]


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_short(str(error) or repr(error))}"


class _ConnectFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@register_sink(
    "rabbitmq",
    RabbitMQSettings,
    "Persistent, publisher-confirmed messages on a RabbitMQ exchange; consumers dedup by message_id.",
)
class RabbitMQSink:
    kind: ClassVar[str] = "rabbitmq"

    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings
        self._template = parse_template(settings.routing_key_template)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        # every form of each password read (a rotated file adds the new one), for the router
        self.mask = SecretMask()

    def __repr__(self) -> str:
        s = self.settings
        return f"RabbitMQSink({s.user}@{s.host}:{s.port} vhost={s.vhost!r} exchange={s.exchange!r})"

    def _fields(self, **extra: Any) -> dict[str, Any]:
        s = self.settings
        return {
            "sink": "rabbitmq",
            "host": s.host,
            "port": s.port,
            "vhost": s.vhost,
            "exchange": s.exchange,
            **extra,
        }

    def _password(self) -> str:
        s = self.settings
        secret = resolve_secret(f"rabbitmq sink {s.exchange!r}", s.password_env, s.password_file)
        if secret is None:
            return ""
        self.mask.add(secret, user=s.user)
        return secret.value

    async def open(self) -> None:
        """Check the credentials' source (SecretError if misconfigured) and try to connect; a
        broker that is down only makes the first runs ERRORED (send connects again)."""
        self._password()
        try:
            await self._ensure_connected()
        except _ConnectFailed as e:
            event(
                log,
                logging.WARNING,
                "rabbitmq sink: broker not reachable at open",
                **self._fields(reason=e.detail),
            )

    async def close(self) -> None:
        await self._disconnect()

    @property
    def connected(self) -> bool:
        return not (
            self._connection is None
            or self._connection.is_closed
            or self._channel is None
            or self._channel.is_closed
            or self._exchange is None
        )

    async def _ensure_connected(self) -> aio_pika.abc.AbstractExchange:
        if self.connected:
            assert self._exchange is not None
            return self._exchange
        await self._disconnect()
        s = self.settings
        try:
            password = self._password()
        except SecretError as e:
            raise _ConnectFailed(f"credentials: {e}") from e
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                self._connection = await aio_pika.connect(
                    host=s.host,
                    port=s.port,
                    login=s.user,
                    password=password,
                    virtualhost=s.vhost,
                    ssl=s.tls,
                    timeout=s.connect_timeout_s,
                    client_properties={"connection_name": f"fieldsync sink {s.exchange}"},
                    heartbeat=s.heartbeat_s,
                )
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                if s.declare:
                    self._exchange = await self._channel.declare_exchange(
                        s.exchange, aio_pika.ExchangeType(s.exchange_type), durable=True
                    )
                elif s.exchange:
                    self._exchange = await self._channel.get_exchange(s.exchange, ensure=True)
                else:
                    self._exchange = self._channel.default_exchange
        except Exception as e:
            await self._disconnect()
            detail = f"connect to {s.host}:{s.port} vhost {s.vhost!r}: {_describe(e)}"
            if isinstance(e, aiormq.exceptions.ChannelNotFoundEntity):
                detail = (
                    f"exchange {s.exchange!r} does not exist in vhost {s.vhost!r} (declare = false):"
                    f" create it or set declare = true ({_describe(e)})"
                )
            elif isinstance(e, aiormq.exceptions.ChannelPreconditionFailed):
                detail = (
                    f"exchange {s.exchange!r} exists with other settings than durable "
                    f"{s.exchange_type} ({_describe(e)})"
                )
            # aio-pika builds a URL holding the password: keep it out of whatever an error quotes
            raise _ConnectFailed(self.mask(detail)) from e
        event(log, logging.INFO, "rabbitmq sink: connected", **self._fields())
        return self._exchange

    async def _disconnect(self) -> None:
        connection = self._connection
        self._connection = self._channel = self._exchange = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await connection.close()

    def _message(self, item: Outgoing) -> aio_pika.Message | Outcome:
        try:
            body = orjson.dumps(item.payload)
        except TypeError as e:
            return Outcome.rejected(f"payload is not JSON-encodable: {_short(str(e))}")
        if len(body) > self.settings.max_message_bytes:
            return Outcome.rejected(
                f"message of {len(body)} bytes exceeds max_message_bytes "
                f"({self.settings.max_message_bytes})"
            )
        return aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=item.idempotency_key,
            app_id="fieldsync",
            type=item.op,
            headers={
                "route": item.route,
                "collection": item.collection,
                "key": item.target_key,
                "op": item.op,
                "change_seq": item.change_seq,
            },
        )

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            outcome = await self._send_one(item)
            outcomes.append(outcome)
            if outcome.status is Delivery.ERRORED:
                break
        return outcomes + [NOT_ATTEMPTED] * (len(items) - len(outcomes))

    async def _send_one(self, item: Outgoing) -> Outcome:
        s = self.settings
        routing_key = render_template(self._template, item)
        if len(routing_key.encode()) > 255:
            return Outcome.rejected(f"routing key longer than 255 bytes: {routing_key[:80]!r}…")
        message = self._message(item)
        if isinstance(message, Outcome):
            return message
        try:
            exchange = await self._ensure_connected()
        except _ConnectFailed as e:
            event(
                log,
                logging.WARNING,
                "rabbitmq sink: cannot connect",
                **self._fields(reason=e.detail),
            )
            return Outcome.unavailable(e.detail)
        try:
            await exchange.publish(
                message,
                routing_key=routing_key,
                mandatory=s.mandatory,
                timeout=s.confirm_timeout_s,
            )
        except aio_pika.exceptions.PublishError as e:  # basic.return: unroutable
            return Outcome.rejected(
                f"unroutable: no queue is bound to exchange {s.exchange!r} for routing key "
                f"{routing_key!r} ({_describe(e)}); bind a queue or fix routing_key_template"
            )
        except aio_pika.exceptions.DeliveryError as e:  # basic.nack
            return Outcome.errored(f"broker nacked the message: {_describe(e)}")
        except aiormq.exceptions.ChannelAccessRefused as e:
            await self._disconnect()  # the channel is closed: a fresh one for the next item
            return Outcome.rejected(
                f"access refused: user {s.user!r} may not publish to exchange {s.exchange!r} in "
                f"vhost {s.vhost!r} (check its write permission): {_describe(e)}"
            )
        except TimeoutError:
            await self._disconnect()  # a late confirm would land on a stale channel
            return Outcome.unavailable(f"no publisher confirm within {s.confirm_timeout_s} s")
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            OSError,
        ) as e:
            await self._disconnect()
            event(
                log,
                logging.WARNING,
                "rabbitmq sink: publish failed, will reconnect",
                **self._fields(reason=_describe(e)),
            )
            return Outcome.unavailable(f"publish failed, connection lost: {_describe(e)}")
        return Outcome.delivered()
