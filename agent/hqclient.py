"""The agent's HTTP client for HQ: push sealed batches, pull the downstream feed, enrol.

Errors are split the way the forwarder must react to them::

    HQError
    ├── TransientError   network down, timeout, reset, truncated reply, HTTP 5xx/429: retry later
    └── RejectedError    HQ refused the request for good (4xx): retrying the same bytes cannot help

TLS certificates are always verified (the system store, or a CA bundle given in the config).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.enrolment import Enrolment
from protocol.change import Change, decode_changes
from protocol.envelope import Kind, open_sealed
from protocol.errors import ProtocolError
from protocol.hlc import physical_ms, system_ms
from protocol.identity import NodeIdentity
from protocol.transport import (
    BATCHES_PATH,
    CHANGES_PATH,
    ENROLL_PATH,
    SEALED_CONTENT_TYPE,
    Ack,
    b64,
    parse_ack,
    sign_request,
    unb64,
)


class HQError(Exception):
    pass


class TransientError(HQError):
    pass


class RejectedError(HQError):
    pass


@dataclass(frozen=True)
class Gap:
    """HQ answered 409: it expects batch `expected` next."""

    expected: int


@dataclass(frozen=True)
class Diverged:
    """HQ answered 409 "diverged": the batch reuses batch or change sequence numbers HQ holds from
    this node with other content (this agent's database was restored from a backup). HQ's marks
    say where this node's numbering and clock must continue (agent.store.recover_from_restore)."""

    message: str
    batch: int
    seqs: tuple[int, int]
    hq_acked_through: int
    hq_change_seq: int
    hq_max_hlc: int


@dataclass(frozen=True)
class FeedPage:
    changes: list[Change]
    cursor: int
    more: bool
    hq_time_ms: int
    groups: list[str] | None = None  # this node's groups as HQ states them (None: not said)


def ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Verifying TLS context; a CA bundle adds trust, nothing ever removes verification."""
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)


def _session(ca_bundle: Path | None, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=ssl_context(ca_bundle), limit=4)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        return str(body.get("message") or body.get("error") or body)
    except (ValueError, aiohttp.ClientError):
        return (await response.text(errors="replace"))[:300]


async def _raise_for(response: aiohttp.ClientResponse, what: str) -> None:
    if response.status < 400:
        return
    text = await _error_text(response)
    if response.status >= 500 or response.status == 429:
        raise TransientError(f"{what}: HQ answered {response.status}: {text}")
    raise RejectedError(f"{what}: HQ refused with {response.status}: {text}")


def _diverged(answer: dict[str, Any]) -> Diverged:
    """A 409 "diverged" answer; without HQ's marks no recovery is possible: RejectedError."""
    message = str(answer.get("message") or "batch diverges from what HQ holds")
    try:
        first, last = answer["seqs"]
        return Diverged(
            message,
            int(answer["batch"]),
            (int(first), int(last)),
            int(answer["hq_acked_through"]),
            int(answer["hq_change_seq"]),
            int(answer["hq_max_hlc"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RejectedError(f"push: HQ refused the batch as diverged: {message}") from e


class HQClient:
    """One HTTP session to HQ; use as an async context manager."""

    def __init__(
        self,
        enrolment: Enrolment,
        identity: NodeIdentity,
        *,
        url: str | None = None,
        ca_bundle: Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.enrolment = enrolment
        self.identity = identity
        self.base_url = (url or enrolment.url).rstrip("/")
        self._ca_bundle = ca_bundle
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.clock_offset_ms: int | None = None

    async def __aenter__(self) -> HQClient:
        self._session = _session(self._ca_bundle, self._timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _key_of(self, node_id: str) -> bytes | None:
        return self.enrolment.hq_public_key if node_id == self.enrolment.hq_node_id else None

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes, int]:
        """(status, body, local time at the midpoint) or TransientError for any transport fault."""
        assert self._session is not None, "use HQClient as an async context manager"
        started = system_ms()
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as response:
                if response.status >= 400 and response.status != 409:
                    await _raise_for(response, f"{method} {path}")
                body = await response.read()
                return response.status, body, (started + system_ms()) // 2
        except HQError:
            raise
        except aiohttp.ClientConnectorCertificateError as e:
            raise TransientError(
                f"{method} {path}: HQ's TLS certificate did not verify ({e.certificate_error}); "
                "check hq.ca_bundle"
            ) from e
        except aiohttp.ClientConnectorError as e:
            reason = e.os_error.strerror or type(e.os_error).__name__
            raise TransientError(
                f"{method} {path}: HQ unreachable at {self.base_url}: {reason}"
            ) from e
        except TimeoutError as e:
            raise TransientError(f"{method} {path}: no answer from HQ in time") from e
        except (aiohttp.ClientError, OSError) as e:
            raise TransientError(f"{method} {path}: {type(e).__name__}: {e}") from e

    def _learn_time(self, hq_time_ms: int, local_ms: int) -> None:
        self.clock_offset_ms = hq_time_ms - local_ms

    async def push(self, sealed: bytes) -> Ack | Gap | Diverged:
        status, body, local_ms = await self._request(
            "POST", BATCHES_PATH, data=sealed, headers={"Content-Type": SEALED_CONTENT_TYPE}
        )
        if status == 409:
            try:
                answer = json.loads(body)
                if answer.get("error") == "diverged":
                    return _diverged(answer)
                return Gap(int(answer["expected"]))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TransientError(f"push: malformed 409 answer from HQ: {body[:200]!r}") from e
        try:
            opened = open_sealed(body, self._key_of)
            if opened.kind != Kind.ACK:
                raise ProtocolError(f"expected an ack, got {opened.kind.name}")
            ack = parse_ack(opened.body)
        except ProtocolError as e:
            # A truncated or garbled answer is a transport fault: resend, HQ deduplicates.
            raise TransientError(f"push: HQ's ack did not verify: {e}") from e
        if ack.node_id != self.identity.node_id:
            raise TransientError(f"push: ack is for node {ack.node_id}, not this node")
        self._learn_time(ack.hq_time_ms, local_ms)
        return ack

    async def pull(self, cursor: int, limit: int) -> FeedPage:
        path_qs = f"{CHANGES_PATH}?cursor={cursor}&limit={limit}"
        headers = sign_request(
            self.identity, "GET", path_qs, system_ms() + (self.clock_offset_ms or 0)
        )
        _, body, local_ms = await self._request("GET", path_qs, headers=headers)
        try:
            opened = open_sealed(body, self._key_of)
            if opened.kind != Kind.FEED:
                raise ProtocolError(f"expected a feed page, got {opened.kind.name}")
            changes = decode_changes(opened.body)
            next_cursor, more = opened.header.get("cursor"), opened.header.get("more")
            if not isinstance(next_cursor, int) or not isinstance(more, bool):
                raise ProtocolError("feed header lacks cursor/more")
            groups = opened.header.get("groups")
            if groups is not None and (
                not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)
            ):
                raise ProtocolError("feed header: groups must be a list of strings")
        except ProtocolError as e:
            raise TransientError(f"pull: HQ's feed page did not verify: {e}") from e
        hq_time_ms = physical_ms(opened.header["time"])
        self._learn_time(hq_time_ms, local_ms)
        return FeedPage(changes, next_cursor, more, hq_time_ms, groups)


async def enroll(
    url: str,
    token: str,
    identity: NodeIdentity,
    name: str,
    *,
    ca_bundle: Path | None = None,
    timeout_s: float = 60.0,
) -> Enrolment:
    """Register this node's public key with HQ using a one-time token; pin HQ's key."""
    base = url.rstrip("/")
    payload = {"token": token, "public_key": b64(identity.public_key), "name": name}
    async with _session(ca_bundle, timeout_s) as session:
        try:
            async with session.post(base + ENROLL_PATH, json=payload) as response:
                await _raise_for(response, "enroll")
                answer = await response.json()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransientError(f"enroll: cannot reach {base}: {e}") from e
    try:
        enrolment = Enrolment(
            url=base,
            node_id=str(answer["node_id"]),
            hq_node_id=str(answer["hq_node_id"]),
            hq_public_key=unb64(str(answer["hq_public_key"]), "hq_public_key"),
            groups=tuple(str(g) for g in answer.get("groups", ())),
            name=str(answer.get("name", "")),
        )
    except (KeyError, TypeError, ProtocolError) as e:
        raise RejectedError(f"enroll: malformed answer from HQ: {e}") from e
    if enrolment.node_id != identity.node_id:
        raise RejectedError(
            f"enroll: HQ registered node {enrolment.node_id}, this key is {identity.node_id}"
        )
    return enrolment
