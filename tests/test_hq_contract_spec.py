"""docs/protocol.md against a live HQ (issue 9, defect 8): each point where the spec, the vectors
and HQ disagreed, checked on the wire.

Every refusal also proves that HQ's state did not move.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import zstandard
from hq_fixtures import FakeWall, Harness, make_changes, raw_header, running_hq, seal_batch

from protocol.change import decode_changes, encode_changes
from protocol.envelope import DEFAULT_ZSTD_LEVEL, MAGIC, VERSION, Kind, packb
from protocol.hlc import system_ms
from protocol.identity import NodeIdentity
from protocol.transport import (
    ENROLL_PATH,
    HEADER_SIGNATURE,
    HEADER_TIME,
    REQUEST_WINDOW_MS,
    b64,
    sign_request,
)

COLL = "beneficiaries"


async def refused(hq: Harness, data: bytes, status: int, error: str) -> str:
    before = hq.snapshot()
    response = await hq.post(data)
    body = await response.json()
    assert (response.status, body["error"]) == (status, error), body
    assert hq.snapshot() == before
    message: str = body["message"]
    return message


# --- 7.1: values are JSON values --------------------------------------------------------------


async def test_every_value_type_of_7_1_is_stored_as_sent(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "nil": None,
        "yes": True,
        "low": -(2**63),
        "high": 2**64 - 1,
        "pi": 3.141592653589793,
        "text": "Ünïcode ✓",
        "list": [1, "two", [3.5, None]],
        "map": {"any key, even ../ or _x": {"deep": [False]}},
    }
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        change = replace(make_changes(node, 1, 1)[0], fields=values)
        assert await hq.acked(await hq.post(seal_batch(node, 1, [change]))) == 1
        stored = await hq.store.get_record(COLL, change.key)
        assert stored is not None and stored.data == values


async def test_byte_strings_are_not_values(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        change = replace(make_changes(node, 1, 1)[0], fields={"photo": b"\x89PNG"})
        message = await refused(hq, seal_batch(node, 1, [change]), 422, "invalid_change")
        assert "[value_type]" in message and "byte string" in message


# --- 7.1 / 12: map keys that are byte strings -------------------------------------------------


async def test_byte_string_map_keys_are_refused_by_the_decoder(tmp_path: Path) -> None:
    """The spec said both "refused" (7.1) and "accepted" (12); the decoder took them. A byte-string
    key in the header (an extra) or anywhere in the body is now malformed msgpack: 400."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 1)
        message = await refused(hq, seal_batch(node, 1, changes, extra={b"x": 1}), 400, "corrupt")
        assert "byte-string key" in message
        nested = [replace(changes[0], fields={"m": {b"k": 1}})]
        await refused(hq, seal_batch(node, 1, nested), 400, "corrupt")
        assert await hq.acked(await hq.post(seal_batch(node, 1, changes))) == 1


# --- 3 step 7: a key twice in a map ------------------------------------------------------------


def _with_duplicate(header_bytes: bytes, key: str, value: Any) -> bytes:
    count = header_bytes[0] & 0x0F
    assert header_bytes[0] == 0x80 | count
    return bytes([0x80 | (count + 1)]) + header_bytes[1:] + packb(key) + packb(value)


async def test_a_header_key_twice_is_refused(tmp_path: Path) -> None:
    """The header says seq 2, then seq 1: msgpack-python keeps the last and HQ acked it as batch 1,
    where a decoder keeping the first sees batch 2 (a gap). Now refused, in header and body."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 1)
        header = raw_header(node, seq=2, raw=len(packb(encode_changes(changes))), codec=0)
        twice = _with_duplicate(packb(header), "seq", 1)
        body = packb(encode_changes(changes))
        message = await refused(hq, frame_bytes(node, twice, body), 400, "corrupt")
        assert "same key twice" in message
        # The same key twice inside a value's map, in the body: refused the same way.
        valued = [replace(changes[0], fields={"m": {"a": 1}})]
        body = packb(encode_changes(valued))
        inner = packb({"a": 1})
        dup_body = body.replace(inner, _with_duplicate(inner, "a", 2))
        assert dup_body.count(b"\xa1a") == 2
        header = raw_header(node, raw=len(dup_body), codec=0)
        await refused(hq, frame_bytes(node, packb(header), dup_body), 400, "corrupt")
        assert await hq.acked(await hq.post(seal_batch(node, 1, changes))) == 1


def frame_bytes(identity: NodeIdentity, header_bytes: bytes, payload: bytes) -> bytes:
    signed = b"".join(
        (
            struct.pack(">4sBBH", MAGIC, VERSION, Kind.CHANGES, len(header_bytes)),
            header_bytes,
            struct.pack(">I", len(payload)),
            payload,
        )
    )
    return signed + identity.sign(signed)


# --- 9.2: signed request headers ---------------------------------------------------------------


async def _get_changes(hq: Harness, headers: dict[str, str]) -> tuple[int, str]:
    before = hq.snapshot()
    response = await hq.client.get(FEED, headers=headers)
    body = await response.json() if response.status != 200 else {"error": "ok"}
    if response.status != 200:
        assert hq.snapshot() == before
    return response.status, body["error"]


FEED = "/v1/changes?cursor=0&limit=10"


async def test_signed_request_headers_parse_as_the_spec_says(tmp_path: Path) -> None:
    """Malformed headers are 400 (a malformed request), a missing one or a wrong signature 401.
    Before: a signature that was not base64 answered 401, and a time with a leading zero that
    still parsed was accepted."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        now = system_ms()
        good = sign_request(node, "GET", FEED, now)
        assert await _get_changes(hq, good) == (200, "ok")
        cases: list[tuple[dict[str, str], int, str]] = [
            ({**good, HEADER_SIGNATURE: "not base64!"}, 400, "corrupt"),
            ({**good, HEADER_SIGNATURE: good[HEADER_SIGNATURE].rstrip("=")}, 400, "corrupt"),
            ({**good, HEADER_SIGNATURE: b64(bytes(10))}, 400, "corrupt"),
            ({**good, HEADER_TIME: "0" + good[HEADER_TIME]}, 400, "corrupt"),
            ({**good, HEADER_TIME: "+" + good[HEADER_TIME]}, 400, "corrupt"),
            (
                {**good, HEADER_TIME: good[HEADER_TIME][:3] + "_" + good[HEADER_TIME][3:]},
                400,
                "corrupt",
            ),
            ({**good, HEADER_TIME: "1e12"}, 400, "corrupt"),
            ({**good, HEADER_TIME: "²"}, 400, "corrupt"),
            ({k: v for k, v in good.items() if k != HEADER_SIGNATURE}, 401, "bad_signature"),
            ({k: v for k, v in good.items() if k != HEADER_TIME}, 401, "bad_signature"),
            ({**good, HEADER_SIGNATURE: b64(bytes(64))}, 401, "bad_signature"),
            (sign_request(node, "GET", FEED, now + REQUEST_WINDOW_MS + 1000), 400, "clock_drift"),
            (sign_request(NodeIdentity.generate(), "GET", FEED, now), 403, "unknown_node"),
        ]
        for headers, status, error in cases:
            assert await _get_changes(hq, headers) == (status, error), headers


# --- 9.4 and 2.1: the feed's cursor and limit, the feed and ack headers ------------------------


async def _page(hq: Harness, node: NodeIdentity, query: str) -> tuple[int, Any]:
    path = f"/v1/changes?{query}"
    response = await hq.client.get(path, headers=sign_request(node, "GET", path, system_ms()))
    if response.status != 200:
        return response.status, (await response.json())["error"]
    return 200, hq.open_from_hq(await response.read())


async def test_feed_cursor_and_limit_semantics(tmp_path: Path) -> None:
    async with running_hq(tmp_path, feed_page_size=3) as hq:
        a, b = await hq.enroll(name="a"), await hq.enroll(name="b")
        await hq.post(seal_batch(a, 1, make_changes(a, 1, 2, key_prefix="a")))  # log 1..2
        await hq.post(seal_batch(b, 1, make_changes(b, 1, 5, key_prefix="b")))  # log 3..7
        await hq.post(seal_batch(a, 2, make_changes(a, 3, 1, key_prefix="a", key_offset=2)))  # 8
        # limit caps the page; `cursor` is the log sequence of its last change; `more` is true.
        status, page = await _page(hq, a, "cursor=0&limit=2")
        assert status == 200 and page.header["count"] == 2
        assert (page.header["cursor"], page.header["more"]) == (4, True)
        # A limit above hq.feed_page_size is cut to it; the cursor is exclusive; the node's own
        # trailing change (log 8) is skipped and the cursor moves past it.
        status, page = await _page(hq, a, "cursor=4&limit=1000")
        assert [c.key for c in decode_changes(page.body)] == ["b2", "b3", "b4"]
        assert (page.header["cursor"], page.header["more"]) == (8, False)
        status, page = await _page(hq, b, "cursor=0&limit=1000")
        assert [c.key for c in decode_changes(page.body)] == ["a0", "a1", "a2"]
        assert (page.header["cursor"], page.header["more"]) == (8, False)
        status, page = await _page(hq, a, "cursor=8")
        assert (page.header["count"], page.header["cursor"], page.header["more"]) == (0, 8, False)
        # A cursor beyond the log comes back unchanged, with an empty page.
        status, page = await _page(hq, a, "cursor=99")
        assert (page.header["count"], page.header["cursor"], page.header["more"]) == (0, 99, False)
        for query in ("limit=0", "limit=-1", "limit=x", "cursor=-1", "cursor=1.5", "cursor="):
            assert await _page(hq, a, query) == (400, "bad_request"), query
        assert await _page(hq, a, f"cursor={2**63}") == (400, "bad_request")


async def test_feed_and_ack_headers_hold_what_2_1_says(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        a, b = await hq.enroll(name="a"), await hq.enroll(name="b")
        before = system_ms()
        response = await hq.post(seal_batch(a, 1, make_changes(a, 1, 2)))
        after = system_ms()
        ack = hq.open_from_hq(await response.read())
        assert ack.kind == Kind.ACK
        header = dict(ack.header)
        assert before <= (header.pop("time") >> 16) <= after
        assert header == {
            "node": hq.state.identity.node_id,
            **{"seq": 0, "first": 0, "last": 0, "count": 0, "codec": 0, "dict": 0, "enc": 0},
            "raw": len(packb(ack.body)),
        }
        assert list(ack.body) == ["node", "acked_through", "hq_time"]
        assert ack.body["node"] == a.node_id and ack.body["acked_through"] == 1
        assert before <= ack.body["hq_time"] <= after  # milliseconds, not an HLC
        _, page = await _page(hq, b, "cursor=0")
        header = dict(page.header)
        assert before <= (header.pop("time") >> 16) <= system_ms()
        assert header.pop("raw") == len(packb(page.body))
        assert header == {
            "node": hq.state.identity.node_id,
            **{"seq": 0, "first": 0, "last": 0, "count": 2, "codec": 1, "dict": 0, "enc": 0},
            "cursor": 2,
            "more": False,
            "groups": [],
        }
        assert list(page.header)[-3:] == ["cursor", "more", "groups"]


# --- 9.5: the order of HQ's checks on a batch ---------------------------------------------------


async def test_batch_checks_come_in_the_documented_order(tmp_path: Path) -> None:
    """Each batch breaks two checks of 9.5; the earlier one is the answer."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        good = make_changes(node, 1, 2)
        bad_name = [good[0], replace(good[1], fields={"_x": 1})]
        response = await hq.client.post(
            "/v1/batches", data=b"garbage", headers={"Content-Type": "text/plain"}
        )
        assert response.status == 415  # 1 before 3
        stranger = NodeIdentity.generate()
        await refused(hq, seal_batch(stranger, 1, bad_name), 403, "unknown_node")  # 5 before 10
        forged = bytearray(seal_batch(node, 1, bad_name))
        forged[-1] ^= 1
        await refused(hq, bytes(forged), 401, "bad_signature")  # 6 before 10
        await refused(hq, seal_batch(node, 1, bad_name, count=3), 400, "corrupt")  # 9 before 10
        message = await refused(hq, seal_batch(node, 5, bad_name), 422, "invalid_change")
        assert "batch 5, change 2" in message  # 10 before 12 (a gap)
        assert await hq.acked(await hq.post(seal_batch(node, 1, good))) == 1
        await refused(hq, seal_batch(node, 3, good), 409, "gap")  # 12
        assert await hq.acked(await hq.post(seal_batch(node, 1, good))) == 1  # duplicate: 200


# --- 9.1: enrolment answers and error codes ----------------------------------------------------


async def test_enrolment_answers_and_error_codes(tmp_path: Path) -> None:
    wall = FakeWall()
    async with running_hq(tmp_path, wall=wall) as hq:

        async def enrol(doc: Any, **kw: Any) -> tuple[int, Any]:
            before = hq.snapshot()
            response = await hq.client.post(ENROLL_PATH, json=doc, **kw)
            body = await response.json()
            if response.status != 200:
                assert set(body) == {"error", "message"}, body
                assert hq.snapshot().changelog == before.changelog
                return response.status, body["error"]
            return 200, body

        key = NodeIdentity.generate()
        doc = {"token": await hq.token("f1"), "public_key": b64(key.public_key), "name": "f1"}
        status, body = await enrol(doc)
        assert status == 200
        assert list(body) == ["node_id", "name", "hq_node_id", "hq_public_key", "hq_time", "groups"]
        assert body["node_id"] == key.node_id and body["hq_time"] == wall.now  # ms, not an HLC
        assert body["hq_public_key"] == b64(hq.hq_public_key) and body["groups"] == []
        other = b64(NodeIdentity.generate().public_key)
        assert await enrol({**doc, "public_key": other}) == (403, "token_used")
        assert await enrol({**doc, "token": "nope", "public_key": other}) == (403, "token_invalid")
        expiring = await hq.token("f2", ttl_ms=1000)
        wall.advance(2000)
        assert await enrol({"token": expiring, "public_key": other}) == (403, "token_expired")
        await hq.store.revoke_node(key.node_id, actor="test")
        fresh = {"token": await hq.token("f3"), "public_key": b64(key.public_key)}
        assert await enrol(fresh) == (403, "key_revoked")
        token = await hq.token("f4")
        for bad in (
            [],
            {"public_key": other},
            {"token": "", "public_key": other},
            {"token": token, "public_key": 5},
            {"token": token, "public_key": other, "name": "x" * 201},
            {"token": token, "public_key": b64(bytes(31))},
        ):
            assert await enrol(bad) == (400, "bad_request"), bad
        assert await enrol({"token": token, "public_key": "not base64!"}) == (400, "corrupt")
        big = {"token": token, "public_key": other, "name": "x" * 20_000}
        assert await enrol(big) == (413, "oversize")
        status, body = await enrol({"token": token, "public_key": other})
        assert status == 200 and body["name"]  # a name is optional: HQ picks one


# --- 2.2: compression parameters ---------------------------------------------------------------


def _zstd_batch(node: NodeIdentity, changes: list[Any], payload: bytes, raw: bytes) -> bytes:
    first, last = changes[0].seq, changes[-1].seq
    header = raw_header(node, seq=2, raw=len(raw), codec=1, first=first, last=last)
    return frame_bytes(node, packb({**header, "count": len(changes)}), payload)


async def test_compression_parameters_are_the_documented_ones(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 300)
        sealed = seal_batch(node, 1, changes)
        hlen = struct.unpack_from(">H", sealed, 6)[0]
        raw = packb(encode_changes(changes))
        frame = zstandard.get_frame_parameters(sealed[12 + hlen : -64])
        assert (frame.content_size, frame.dict_id, frame.has_checksum) == (len(raw), 0, False)
        level = zstandard.ZstdCompressionParameters.from_level(
            DEFAULT_ZSTD_LEVEL, source_size=len(raw)
        )
        assert frame.window_size <= 1 << level.window_log
        assert await hq.acked(await hq.post(sealed)) == 1
        # A window over 8 MiB (and over the body) is refused before decompressing: 413.
        wide = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters(window_log=24)
        ).compressobj()  # streaming, size unknown: the frame keeps its 16 MiB window
        more = make_changes(node, 301, 300, key_offset=300)
        raw = packb(encode_changes(more))
        payload = wide.compress(raw) + wide.flush()
        assert zstandard.get_frame_parameters(payload).window_size == 1 << 24
        await refused(hq, _zstd_batch(node, more, payload, raw), 413, "oversize")
        # Other senders' choices that stay within the bounds are accepted: a checksum, no
        # content size, level 19.
        for compressor in (
            zstandard.ZstdCompressor(level=19, write_checksum=True),
            zstandard.ZstdCompressor(level=3, write_content_size=False),
        ):
            batch = _zstd_batch(node, more, compressor.compress(raw), raw)
            assert await hq.acked(await hq.post(batch)) == 2
