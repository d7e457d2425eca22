"""Helpers for the HQ tests (tests/test_hq_*.py): a real HQ on 127.0.0.1, batch builders, snapshots.

Not a conftest: test modules import what they use (`from hq_fixtures import ...`), so these helpers
never collide with fixtures other suites define.
"""

from __future__ import annotations

import base64
import random
import sqlite3
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from hq_server.app import STATE, HQState, create_app
from hq_server.config import HQConfig, config_from_dict
from hq_server.store import HQStore
from protocol.change import Change, encode_changes
from protocol.envelope import MAGIC, VERSION, Codec, Kind, Opened, open_sealed, packb, seal
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity
from protocol.transport import (
    BATCHES_PATH,
    ENROLL_PATH,
    SEALED_CONTENT_TYPE,
    b64,
    parse_ack,
)

DAY_MS = 24 * 3600 * 1000
_WORDS = [
    "water",
    "food",
    "shelter",
    "visit",
    "household",
    "child",
    "school",
    "clinic",
    "seed",
    "tools",
    "cash",
    "voucher",
    "follow-up",
    "referral",
    "latrine",
    "blanket",
    "kit",
    "village",
    "river",
    "road",
    "market",
    "harvest",
    "rain",
    "malaria",
    "nutrition",
    "vaccine",
    "registered",
    "moved",
    "returned",
    "absent",
    "pregnant",
    "elderly",
]


class FakeWall:
    """An injectable millisecond clock: starts at the real time, moves only when told."""

    def __init__(self, start: int | None = None) -> None:
        self.now = system_ms() if start is None else start

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def make_config(tmp_path: Path, **settings: Any) -> HQConfig:
    table = {"data_dir": str(tmp_path / "hq"), "listen": "127.0.0.1:0", **settings}
    return config_from_dict({"hq": table}, tmp_path / "hq.toml")


def record_fields(i: int, size: int = 700) -> dict[str, Any]:
    """A beneficiary-like record of roughly `size` bytes of JSON."""
    fields: dict[str, Any] = {
        "name": f"Person {i}",
        "household_size": i % 9 + 1,
        "village": f"Village {i % 37}",
        "registered": True,
        "score": (i % 100) / 7,
    }
    pad = max(0, size - 120)
    rng = random.Random(i)
    words = " ".join(rng.choice(_WORDS) for _ in range(pad // 4 + 1))
    fields["notes"] = words[:pad]
    return fields


def make_changes(
    identity: NodeIdentity,
    first_seq: int,
    count: int,
    *,
    collection: str = "beneficiaries",
    key_prefix: str = "b",
    key_offset: int = 0,
    hlc_ms: int | None = None,
    size: int = 700,
) -> list[Change]:
    """`count` upserts of new records by `identity`, change sequences first_seq.., HLCs increasing."""
    base = pack(system_ms() if hlc_ms is None else hlc_ms)
    return [
        Change(
            collection=collection,
            key=f"{key_prefix}{key_offset + i}",
            op="upsert",
            fields=record_fields(key_offset + i, size),
            hlc=base + i,
            parent=0,
            origin=identity.node_id,
            seq=first_seq + i,
        )
        for i in range(count)
    ]


def seal_batch(
    identity: NodeIdentity,
    batch_seq: int,
    changes: Sequence[Change],
    *,
    time: int | None = None,
    **header: Any,
) -> bytes:
    """A sealed CHANGES batch as an agent would send it; `header` overrides computed header fields."""
    seqs = [c.seq for c in changes]
    fields: dict[str, Any] = {
        "seq": batch_seq,
        "first": min(seqs, default=0),
        "last": max(seqs, default=0),
        "count": len(changes),
        "time": pack(system_ms()) if time is None else time,
    }
    fields.update(header)
    return seal(identity, Kind.CHANGES, encode_changes(list(changes)), **fields)


def seal_raw(
    identity: NodeIdentity,
    header: dict[str, Any],
    payload: bytes,
    *,
    kind: int = Kind.CHANGES,
    version: int = VERSION,
    magic: bytes = MAGIC,
) -> bytes:
    """Frame and sign arbitrary header + payload bytes (bombs, lies): the signature is genuine."""
    header_bytes = packb(header)
    signed = b"".join(
        (
            struct.pack(">4sBBH", magic, version, kind, len(header_bytes)),
            header_bytes,
            struct.pack(">I", len(payload)),
            payload,
        )
    )
    return signed + identity.sign(signed)


def raw_header(identity: NodeIdentity, **fields: Any) -> dict[str, Any]:
    header = {
        "node": identity.node_id,
        "seq": 1,
        "first": 1,
        "last": 1,
        "count": 1,
        "codec": int(Codec.ZSTD),
        "dict": 0,
        "enc": 0,
        "raw": 0,
        "time": pack(system_ms()),
    }
    header.update(fields)
    return header


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused request must leave untouched."""

    changelog: list[tuple[Any, ...]]
    records: list[tuple[Any, ...]]
    nodes: list[tuple[Any, ...]]
    tokens: list[tuple[Any, ...]]


def snapshot(db_path: Path) -> Snapshot:
    with sqlite3.connect(db_path) as conn:
        return Snapshot(
            changelog=conn.execute("SELECT * FROM changelog ORDER BY seq").fetchall(),
            records=conn.execute("SELECT * FROM records ORDER BY collection, key").fetchall(),
            nodes=conn.execute(
                "SELECT node_id, name, public_key, enrolled_at, revoked_at, acked_through, "
                "flagged_reason, change_seq, max_hlc FROM nodes ORDER BY node_id"
            ).fetchall(),
            tokens=conn.execute("SELECT * FROM tokens ORDER BY token_hash").fetchall(),
        )


@dataclass
class Harness:
    """A running HQ (real aiohttp server on 127.0.0.1, real SQLite) and a client for it."""

    config: HQConfig
    app: web.Application
    client: TestClient[Any, Any]
    wall: FakeWall | None

    @property
    def state(self) -> HQState:
        return self.app[STATE]

    @property
    def store(self) -> HQStore:
        return self.state.store

    @property
    def hq_public_key(self) -> bytes:
        return self.state.identity.public_key

    def snapshot(self) -> Snapshot:
        return snapshot(self.config.hq.db_path)

    async def token(
        self,
        name: str = "field-1",
        ttl_ms: int = DAY_MS,
        *,
        groups: Sequence[str] = (),
        reenroll: bool = False,
    ) -> str:
        issued = await self.store.create_token(
            name, ttl_ms, actor="test", groups=groups, reenroll=reenroll
        )
        return issued.token

    async def enroll(
        self, identity: NodeIdentity | None = None, name: str = "field-1"
    ) -> NodeIdentity:
        identity = identity or NodeIdentity.generate()
        response = await self.client.post(
            ENROLL_PATH,
            json={"token": await self.token(name), "public_key": b64(identity.public_key)},
        )
        assert response.status == 200, await response.text()
        return identity

    async def post(self, data: bytes | AsyncIterator[bytes], **kwargs: Any) -> ClientResponse:
        headers = {"Content-Type": SEALED_CONTENT_TYPE}
        return await self.client.post(BATCHES_PATH, data=data, headers=headers, **kwargs)

    def open_from_hq(self, data: bytes) -> Opened:
        """Verify a sealed ack/feed with HQ's public key, as an agent that pinned it would."""
        hq_id = self.state.identity.node_id
        return open_sealed(data, lambda node: self.hq_public_key if node == hq_id else None)

    async def acked(self, response: ClientResponse) -> int:
        assert response.status == 200, await response.text()
        assert response.content_type == SEALED_CONTENT_TYPE
        opened = self.open_from_hq(await response.read())
        assert opened.kind == Kind.ACK
        return parse_ack(opened.body).acked_through


@asynccontextmanager
async def running_hq(
    tmp_path: Path, *, wall: FakeWall | None = None, **settings: Any
) -> AsyncIterator[Harness]:
    config = make_config(tmp_path, **settings)
    app = create_app(config, wall=wall or system_ms)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", port=0))
    try:
        await client.start_server()
        yield Harness(config, app, client, wall)
    finally:
        await client.close()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)
