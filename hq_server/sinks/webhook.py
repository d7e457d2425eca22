"""Webhook sink: one signed HTTP POST of JSON per item, to one URL, in order.

The body (UTF-8 JSON, compact) is::

    {
      "idempotency_key": "route:n...:42:0",  # the same for every repeat of this item: dedup on it
      "route": "finance",                    # the route that produced the item
      "collection": "beneficiaries",         # the source collection
      "key": "BEN-0042",                     # the record's key in the target (Outgoing.target_key)
      "op": "upsert",                        # "upsert" or "delete"
      "record": {...},                       # the mapped record (for a delete, what the mapping left)
      "change_seq": 42                       # HQ's sequence of the change (grows with each change)
    }

Headers::

    Content-Type:          application/json; charset=utf-8
    Idempotency-Key:       the body's idempotency_key
    X-Fieldsync-Route:     the body's route
    X-Fieldsync-Timestamp: Unix time in whole seconds when the request was signed
    X-Fieldsync-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body bytes>")>

With `signature = "standard-webhooks"` the request is signed per the Standard Webhooks
specification (https://www.standardwebhooks.com) instead, so off-the-shelf verifiers (the
`standardwebhooks` packages, Svix) accept it; the secret is then `whsec_<base64 key>`::

    webhook-id:        the body's idempotency_key (the same on every repeat: dedup on it)
    webhook-timestamp: Unix time in whole seconds when the request was signed
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>

(Content-Type, Idempotency-Key and X-Fieldsync-Route are sent as well.)

A receiver recomputes the HMAC over the exact bytes it received, compares in constant time
(`verify_signature` does both) and refuses timestamps older than a few minutes, so a captured
request cannot be replayed later. Delivery is at least once: a receiver must treat a second request
with an Idempotency-Key it has already processed as done (answer 2xx, change nothing).

Answers: 2xx delivered; 408, 429, 5xx, 3xx and transport failures errored (retried later; all but
500-like answers as "target down", which spends no retry budget); any other 4xx rejected
(dead-lettered), with the status and the first 200 characters of the answer. See
`hq_server.sinks.http` for the table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yarl

from hq_server.logs import event
from hq_server.sinks.base import (
    Delivery,
    Outcome,
    Outgoing,
    register_sink,
    send_one_by_one,
)
from hq_server.sinks.http import (
    JSON_CONTENT_TYPE,
    HttpClient,
    RequestError,
    TransportError,
    classify,
    exactly_one_secret,
    http_plaintext,
    http_url,
    json_body,
    required_setting,
)
from hq_server.sinks.plaintext import Plaintext
from hq_server.sinks.secrets import Secret, SecretError, SecretMask, resolve_secret
from protocol.config import positive, setting

log = logging.getLogger("fieldsync.sinks.webhook")

SIGNATURE_HEADER = "X-Fieldsync-Signature"
TIMESTAMP_HEADER = "X-Fieldsync-Timestamp"
ROUTE_HEADER = "X-Fieldsync-Route"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_TOLERANCE_S = 300
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
STANDARD_SECRET_PREFIX = "whsec_"
MIN_STANDARD_KEY_BYTES = 24  # the specification's lower bound for a secret key


@dataclass(frozen=True)
class WebhookSettings:
    url: str = required_setting(
        "The http:// or https:// URL every item is POSTed to (required). HTTPS certificates are "
        "always verified; credentials do not belong in the URL.",
        http_url,
    )
    secret_env: str | None = setting(
        None,
        "Name of the environment variable holding the HMAC signing secret (shared with the "
        "receiver). Exactly one of secret_env and secret_file is required.",
    )
    secret_file: Path | None = setting(
        None,
        "File holding the HMAC signing secret (mode 0600 or stricter; surrounding whitespace is "
        "ignored). Exactly one of secret_env and secret_file is required.",
    )
    timeout_s: float = setting(
        10.0,
        "Seconds one request may take, connecting included; a slower answer is a transient "
        "failure and the item is retried later.",
        positive,
    )
    ca_bundle: Path | None = setting(
        None,
        "PEM file of extra certificate authorities to trust for https:// URLs (e.g. an "
        "internal CA). Verification itself cannot be turned off.",
    )
    signature: Literal["fieldsync", "standard-webhooks"] = setting(
        "fieldsync",
        'How requests are signed: "fieldsync" (X-Fieldsync-Timestamp and X-Fieldsync-Signature, '
        'hex HMAC-SHA256) or "standard-webhooks" (the Standard Webhooks webhook-id, '
        "webhook-timestamp and webhook-signature headers, verifiable with the standardwebhooks "
        "libraries; the secret must then be whsec_ followed by a base64 key of at least 24 bytes).",
    )

    def __post_init__(self) -> None:
        # build() checks keys one at a time; a combination can only be checked here.
        exactly_one_secret("the signing secret", "secret_env", self.secret_env, self.secret_file)

    def plaintext(self) -> list[Plaintext]:
        """The URL, if it is http:// to another machine (see `hq_server.sinks.plaintext`)."""
        return http_plaintext("url", self.url)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Fieldsync-Signature value: `sha256=` + hex HMAC-SHA256 of b"<timestamp>." + body."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify_signature(
    secret: bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """What a Python receiver does: constant-time HMAC check plus a freshness window (replays)."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret `whsec_<base64>`; ValueError naming the rule."""
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        raise ValueError(
            'signature = "standard-webhooks" needs a secret of the form whsec_<base64 key> '
            "(e.g. made with: python -c \"import base64, secrets; print('whsec_' + "
            'base64.b64encode(secrets.token_bytes(32)).decode())")'
        )
    encoded = secret[len(STANDARD_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("the whsec_ secret is not valid base64 after the prefix") from e
    if len(key) < MIN_STANDARD_KEY_BYTES:
        raise ValueError(
            f"the whsec_ key is {len(key)} bytes; Standard Webhooks keys are at least "
            f"{MIN_STANDARD_KEY_BYTES}"
        )
    return key


def standard_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The webhook-signature value: `v1,` + base64 HMAC-SHA256 of "<id>.<timestamp>." + body."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_body(item: Outgoing) -> dict[str, Any]:
    """The JSON document POSTed for `item` (the shape is documented in the module docstring)."""
    return {
        "idempotency_key": item.idempotency_key,
        "route": item.route,
        "collection": item.collection,
        "key": item.target_key,
        "op": item.op,
        "record": item.payload,
        "change_seq": item.change_seq,
    }


@register_sink("webhook", WebhookSettings, "HTTP POST of each item as signed JSON to one URL")
class WebhookSink:
    """Delivers each item with one signed POST, in order, stopping at the first transient failure.

    `clock` (Unix seconds) is injectable so tests can produce known signatures.
    """

    kind: ClassVar[str] = "webhook"

    def __init__(self, settings: WebhookSettings, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        secret = resolve_secret("webhook signing secret", settings.secret_env, settings.secret_file)
        if secret is None:  # __post_init__ guarantees one is configured; keep mypy and -O honest
            raise ValueError("webhook signing secret is not configured")
        self._secret: Secret = secret
        self._standard_key: bytes | None = None
        if settings.signature == "standard-webhooks":
            try:
                self._standard_key = standard_key(secret.value)
            except ValueError as e:
                raise SecretError(f"webhook signing secret: {e}") from e
        self._clock = clock
        self._url = yarl.URL(settings.url)
        self._http = HttpClient(
            timeout_s=settings.timeout_s,
            ca_bundle=settings.ca_bundle,
            secrets=(secret,),
            wall=clock,
        )
        if self._standard_key is not None:  # the key without its prefix is a secret too
            self._http.add_secret(Secret(secret.value[len(STANDARD_SECRET_PREFIX) :]))

    @property
    def mask(self) -> SecretMask:
        """Every form of the signing secret (for the router)."""
        return self._http.mask

    def __repr__(self) -> str:
        return f"WebhookSink(url={str(self._url)!r})"

    async def open(self) -> None:
        await self._http.open()

    async def close(self) -> None:
        await self._http.close()

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        return await send_one_by_one(items, self._deliver)

    async def _deliver(self, item: Outgoing) -> Outcome:
        try:
            body = json_body(webhook_body(item))
        except (TypeError, ValueError) as e:
            return self._report(item, Outcome.rejected(f"record cannot be sent as JSON: {e}"))
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": JSON_CONTENT_TYPE,
            IDEMPOTENCY_HEADER: item.idempotency_key,
            ROUTE_HEADER: item.route,
        }
        if self._standard_key is not None:
            headers[STANDARD_ID_HEADER] = item.idempotency_key
            headers[STANDARD_TIMESTAMP_HEADER] = timestamp
            headers[STANDARD_SIGNATURE_HEADER] = standard_signature(
                self._standard_key, item.idempotency_key, timestamp, body
            )
        else:
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self._secret.value.encode("utf-8"), timestamp, body)
        try:
            answer, _ = await self._http.exchange("POST", self._url, headers=headers, data=body)
        except TransportError as e:
            return self._report(item, Outcome.unavailable(str(e)))
        except RequestError as e:
            return self._report(item, Outcome.rejected(f"cannot send the request: {e}"))
        return self._report(item, classify(answer), status=answer.status)

    def _report(self, item: Outgoing, outcome: Outcome, status: int | None = None) -> Outcome:
        """Log a failed delivery with its identifiers (never the record or a header value)."""
        if outcome.status is not Delivery.DELIVERED:
            event(
                log,
                logging.WARNING,
                f"webhook delivery {outcome.status.value}",
                route=item.route,
                idempotency_key=item.idempotency_key,
                http_status=status,
                detail=outcome.detail,
            )
        return outcome
