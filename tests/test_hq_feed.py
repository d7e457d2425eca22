"""GET /v1/changes: signed requests, HQ-signed feed pages, own echoes excluded, cursor semantics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hq_fixtures import FakeWall, Harness, make_changes, running_hq, seal_batch

from protocol.change import decode_changes
from protocol.envelope import Kind
from protocol.hlc import system_ms
from protocol.identity import NodeIdentity
from protocol.transport import HEADER_NODE, HEADER_SIGNATURE, b64, sign_request


async def pull(
    hq: Harness, node: NodeIdentity, cursor: int = 0, limit: int | None = None, **kw: Any
) -> tuple[list[Any], int, bool]:
    """Fetch one page as an agent would, verify it with HQ's pinned key, decode it."""
    path_qs = f"/v1/changes?cursor={cursor}" + (f"&limit={limit}" if limit else "")
    headers = sign_request(node, "GET", path_qs, kw.get("time_ms", system_ms()))
    response = await hq.client.get(path_qs, headers=headers)
    assert response.status == 200, await response.text()
    opened = hq.open_from_hq(await response.read())
    assert opened.kind == Kind.FEED
    changes = decode_changes(opened.body)
    assert opened.header["count"] == len(changes)
    return changes, opened.header["cursor"], opened.header["more"]


async def push(
    hq: Harness, node: NodeIdentity, batch: int, first: int, n: int, prefix: str
) -> None:
    changes = make_changes(node, first, n, key_prefix=prefix, key_offset=first - 1)
    assert await hq.acked(await hq.post(seal_batch(node, batch, changes))) == batch


async def test_feed_excludes_own_changes_and_advances_past_them(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        a = await hq.enroll(name="a")
        b = await hq.enroll(name="b")
        await push(hq, a, 1, 1, 3, "a")  # log seq 1..3
        await push(hq, b, 1, 1, 2, "b")  # log seq 4..5
        await push(hq, a, 2, 4, 3, "a")  # log seq 6..8: a's own, trailing

        changes, cursor, more = await pull(hq, a)
        assert [(c.origin, c.key) for c in changes] == [(b.node_id, "b0"), (b.node_id, "b1")]
        assert cursor == 8  # past a's own trailing entries
        assert more is False
        assert await pull(hq, a, cursor) == ([], 8, False)

        changes, cursor, more = await pull(hq, b)
        assert [c.key for c in changes] == ["a0", "a1", "a2", "a3", "a4", "a5"]
        assert all(c.origin == a.node_id for c in changes)
        assert (cursor, more) == (8, False)

        stored = await hq.store.get_node(a.node_id)
        assert stored is not None
        assert stored.last_contact is not None


async def test_feed_pages_with_limit(tmp_path: Path) -> None:
    async with running_hq(tmp_path, feed_page_size=4) as hq:
        a = await hq.enroll(name="a")
        b = await hq.enroll(name="b")
        await push(hq, b, 1, 1, 10, "b")
        seen: list[str] = []
        cursor, more, pages = 0, True, 0
        while more:
            changes, cursor, more = await pull(hq, a, cursor, limit=100)  # capped at 4
            assert len(changes) <= 4
            seen += [c.key for c in changes]
            pages += 1
        assert seen == [f"b{i}" for i in range(10)]
        assert pages == 3
        changes, cursor, more = await pull(hq, a, 0, limit=1)
        assert ([c.key for c in changes], cursor, more) == (["b0"], 1, True)


async def test_feed_changes_keep_their_identity(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        a = await hq.enroll(name="a")
        b = await hq.enroll(name="b")
        sent = make_changes(b, 1, 3)
        assert await hq.acked(await hq.post(seal_batch(b, 1, sent))) == 1
        changes, _, _ = await pull(hq, a)
        assert [(c.origin, c.seq, c.hlc, c.parent, c.fields) for c in changes] == [
            (c.origin, c.seq, c.hlc, c.parent, c.fields) for c in sent
        ]


async def refused_get(
    hq: Harness, headers: dict[str, str], path_qs: str, status: int, error: str
) -> None:
    before = hq.snapshot()
    response = await hq.client.get(path_qs, headers=headers)
    body = await response.json()
    assert response.status == status, body
    assert body["error"] == error
    assert hq.snapshot() == before


async def test_signed_get_refusals(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        a = await hq.enroll(name="a")
        path_qs = "/v1/changes?cursor=0"
        now = system_ms()

        # Signed by another key while claiming to be `a`.
        forged = sign_request(NodeIdentity.generate(), "GET", path_qs, now)
        forged[HEADER_NODE] = a.node_id
        await refused_get(hq, forged, path_qs, 401, "bad_signature")

        # Signature for a different query string (cursor tampered with).
        other = sign_request(a, "GET", "/v1/changes?cursor=5", now)
        await refused_get(hq, other, path_qs, 401, "bad_signature")

        # No signature headers at all.
        await refused_get(hq, {}, path_qs, 401, "bad_signature")

        # Stale request time (replay window is 15 minutes).
        stale = sign_request(a, "GET", path_qs, now - 16 * 60 * 1000)
        await refused_get(hq, stale, path_qs, 400, "clock_drift")

        # Unknown node.
        stranger = NodeIdentity.generate()
        await refused_get(
            hq, sign_request(stranger, "GET", path_qs, now), path_qs, 403, "unknown_node"
        )

        # Malformed queries, correctly signed.
        for bad_qs in (
            "/v1/changes?cursor=-1",
            "/v1/changes?cursor=%C2%B2",
            "/v1/changes?cursor=99999999999999999999",
            "/v1/changes?cursor=0&limit=0",
        ):
            headers = sign_request(a, "GET", bad_qs, now)
            await refused_get(hq, headers, bad_qs, 400, "bad_request")

        # Revoked node.
        await hq.store.revoke_node(a.node_id, actor="test")
        await refused_get(hq, sign_request(a, "GET", path_qs, now), path_qs, 403, "unknown_node")


async def test_garbled_signature_header_is_refused(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        a = await hq.enroll(name="a")
        path_qs = "/v1/changes?cursor=0"
        headers = sign_request(a, "GET", path_qs, system_ms())
        headers[HEADER_SIGNATURE] = b64(b"\0" * 64)
        await refused_get(hq, headers, path_qs, 401, "bad_signature")
        headers[HEADER_SIGNATURE] = b64(b"\0" * 10)
        await refused_get(hq, headers, path_qs, 400, "corrupt")
        headers[HEADER_SIGNATURE] = "not base64!"
        await refused_get(hq, headers, path_qs, 400, "corrupt")


async def test_feed_follows_an_injected_wall_clock(tmp_path: Path) -> None:
    wall = FakeWall()
    async with running_hq(tmp_path, wall=wall) as hq:
        a = await hq.enroll(name="a")
        wall.advance(20 * 60 * 1000)  # HQ is now 20 minutes later than the node's signature
        path_qs = "/v1/changes?cursor=0"
        headers = sign_request(a, "GET", path_qs, system_ms())
        await refused_get(hq, headers, path_qs, 400, "clock_drift")
        changes, _, _ = await pull(hq, a, time_ms=wall.now)
        assert changes == []
