"""Helpers for the agent tests (tests/test_agent_*.py): config, stores, records and a fake HQ.

Not a conftest: test modules import what they use (`from agent_fixtures import ...`), so these
helpers never collide with fixtures other suites define.

`FakeHQ` is a deliberately small stand-in for HQ's batch and feed endpoints, so the agent's
forwarder can be tested (including faults HQ would never produce on purpose) while the real HQ is
written in parallel. It verifies every batch with the agent's key exactly as the contract says,
deduplicates by batch sequence, counts every change id it applies and records any applied twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.config import AgentConfig
from agent.enrolment import Enrolment
from agent.store import AgentStore, Write
from protocol.change import Change, decode_changes, encode_changes
from protocol.config import build
from protocol.envelope import Codec, Kind, open_sealed, seal
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity
from protocol.transport import (
    BATCHES_PATH,
    CHANGES_PATH,
    SEALED_CONTENT_TYPE,
    ack_body,
    parse_signed_request,
    verify_request,
)

COLLECTION = "beneficiaries"
KEY_FIELD = "beneficiary_id"
COLLECTIONS = {
    "beneficiaries": {"key": "beneficiary_id"},
    "distributions": {"key": "distribution_id"},
}


def make_config(tmp_path: Path, **sync: Any) -> AgentConfig:
    """A valid AgentConfig rooted in tmp_path, built through the same checks as a TOML file."""
    table = {
        "agent": {"data_dir": str(tmp_path / "data")},
        "sync": sync,
        "collections": COLLECTIONS,
    }
    return build(AgentConfig, table, "test.toml")


def beneficiary(i: int, **extra: Any) -> dict[str, Any]:
    """A small beneficiary record with a stable key `b00042`."""
    return {
        KEY_FIELD: f"b{i:05d}",
        "name": f"Person {i}",
        "household_size": i % 7 + 1,
        "village": f"Village {i % 3}",
        **extra,
    }


def upsert(record: dict[str, Any], collection: str = COLLECTION) -> Write:
    key_field = COLLECTIONS[collection]["key"]
    return Write(collection, str(record[key_field]), "upsert", dict(record))


def delete(key: str, collection: str = COLLECTION) -> Write:
    return Write(collection, key, "delete", {})


@asynccontextmanager
async def open_store(path: Path, node_id: str = "nlocal") -> AsyncIterator[AgentStore]:
    store = await AgentStore.open(path, node_id)
    try:
        yield store
    finally:
        await store.close()


def key_of(identity: NodeIdentity) -> Callable[[str], bytes | None]:
    """The `public_key_of` callback open_sealed needs, knowing exactly one signer."""
    return lambda node_id: identity.public_key if node_id == identity.node_id else None


def sealed_feed(hq: NodeIdentity, changes: list[Change], cursor: int, more: bool = False) -> bytes:
    """A feed page as HQ sends it: a FEED message signed by HQ with cursor/more header extras."""
    return seal(
        hq,
        Kind.FEED,
        encode_changes(changes),
        count=len(changes),
        time=pack(system_ms()),
        extra={"cursor": cursor, "more": more},
    )


def sealed_ack(signer: NodeIdentity, node_id: str, acked_through: int) -> bytes:
    return seal(
        signer,
        Kind.ACK,
        ack_body(node_id, acked_through, system_ms()),
        time=pack(system_ms()),
        codec=Codec.NONE,
    )


@dataclass
class FakeHQ:
    """HQ's POST /v1/batches and GET /v1/changes for one enrolled agent, with fault switches."""

    agent: NodeIdentity
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate)
    acked_through: int = 0
    applied: dict[tuple[str, int], Change] = field(default_factory=dict)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    posts: int = 0
    duplicate_batches: int = 0
    batch_counts: list[int] = field(default_factory=list)  # changes per new batch, in order
    # Fault switches, each counting down once per request it affects.
    fail_503: int = 0  # answer 503 before looking at the request
    drop_after_commit: int = 0  # store the batch, then close the connection without an answer
    ack_signer: NodeIdentity | None = None  # sign acks with this key instead of HQ's (a forgery)
    ack_node: str | None = None  # ack for this node id instead of the sender's
    mangle_ack: Callable[[bytes], bytes] | None = None  # e.g. truncate the ack in flight
    gap_expected: int | None = None  # answer 409 expecting this batch
    refuse_status: int | None = None  # answer this 4xx, as HQ does for a revoked node
    # Downstream feed: pages served in order from cursor 0; page i answers cursor i.
    feed: list[list[Change]] = field(default_factory=list)
    pulls: list[int] = field(default_factory=list)
    on_post: Callable[[], Awaitable[None]] | None = None
    feed_status: int | None = None  # answer every pull with this status instead

    def enrolment(self, url: str) -> Enrolment:
        return Enrolment(
            url=url,
            node_id=self.agent.node_id,
            hq_node_id=self.identity.node_id,
            hq_public_key=self.identity.public_key,
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(BATCHES_PATH, self._batches)
        app.router.add_get(CHANGES_PATH, self._changes)
        return app

    async def _batches(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        if self.on_post is not None:
            await self.on_post()
        body = await request.read()
        if self.fail_503:
            self.fail_503 -= 1
            return web.json_response({"error": "unavailable", "message": "restarting"}, status=503)
        if self.refuse_status is not None:
            return web.json_response(
                {"error": "unknown_node", "message": "node is revoked"}, status=self.refuse_status
            )
        opened = open_sealed(body, key_of(self.agent))
        assert opened.kind == Kind.CHANGES
        seq = opened.header["seq"]
        if self.gap_expected is not None:
            return web.json_response({"error": "gap", "expected": self.gap_expected}, status=409)
        if seq <= self.acked_through:
            self.duplicate_batches += 1
        elif seq != self.acked_through + 1:
            return web.json_response(
                {"error": "gap", "expected": self.acked_through + 1}, status=409
            )
        else:
            changes = decode_changes(opened.body)
            assert len(changes) == opened.header["count"]
            assert [c.seq for c in changes] == list(
                range(opened.header["first"], opened.header["last"] + 1)
            )
            for change in changes:
                if change.change_id in self.applied:
                    self.duplicates.append(change.change_id)
                self.applied[change.change_id] = change
            self.acked_through = seq
            self.batch_counts.append(len(changes))
        if self.drop_after_commit:
            self.drop_after_commit -= 1
            assert request.transport is not None
            request.transport.close()  # committed here, but the agent never hears the ack
            return web.Response(status=200)
        signer = self.ack_signer or self.identity
        ack = sealed_ack(signer, self.ack_node or self.agent.node_id, self.acked_through)
        if self.mangle_ack is not None:
            ack = self.mangle_ack(ack)
        return web.Response(body=ack, content_type=SEALED_CONTENT_TYPE)

    async def _changes(self, request: web.Request) -> web.Response:
        signed = parse_signed_request(request.headers)
        assert signed.node_id == self.agent.node_id
        verify_request(signed, self.agent.public_key, "GET", request.path_qs, system_ms())
        cursor = int(request.query["cursor"])
        self.pulls.append(cursor)
        if self.feed_status is not None:
            return web.json_response(
                {"error": "refused", "message": "feed refused"}, status=self.feed_status
            )
        page = self.feed[cursor] if cursor < len(self.feed) else []
        next_cursor = cursor + 1 if cursor < len(self.feed) else cursor
        more = next_cursor < len(self.feed)
        return web.Response(
            body=sealed_feed(self.identity, page, next_cursor, more),
            content_type=SEALED_CONTENT_TYPE,
        )


@asynccontextmanager
async def serve(app: web.Application, **start: Any) -> AsyncIterator[TestServer]:
    """A real aiohttp server on 127.0.0.1, an ephemeral port (`ssl=` for HTTPS)."""
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server(**start)
    try:
        yield server
    finally:
        await server.close()


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
