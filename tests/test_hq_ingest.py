"""POST /v1/batches against a real HQ: exactly-once ingest, signed acks, and every refusal.

Every "bad input" test checks the promise that a refused batch changes nothing: change log,
records, nodes (acked_through, flags) and tokens are compared before and after.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from hq_fixtures import (
    Harness,
    make_changes,
    raw_header,
    running_hq,
    seal_batch,
    seal_raw,
)

from hq_server.store import IngestStatus
from protocol.change import Change, encode_changes
from protocol.envelope import Codec, Kind, packb, seal
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity

COLL = "beneficiaries"


async def refused(
    hq: Harness, data: bytes, status: int, error: str, content_type: str | None = None
) -> None:
    """POST `data`, expect `status` + JSON error `error`, and prove HQ's state did not move."""
    before = hq.snapshot()
    if content_type is None:
        response = await hq.post(data)
    else:
        response = await hq.client.post(
            "/v1/batches", data=data, headers={"Content-Type": content_type}
        )
    body = await response.json()
    assert response.status == status, body
    assert body["error"] == error, body
    assert body["message"]
    assert "Traceback" not in body["message"]
    assert hq.snapshot() == before


async def test_happy_path_stores_records_and_acks_signed(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 25)
        response = await hq.post(seal_batch(node, 1, changes))
        assert await hq.acked(response) == 1
        assert await hq.store.count_records(COLL) == 25
        assert await hq.store.changelog_count() == 25
        record = await hq.store.get_record(COLL, "b7")
        assert record is not None
        assert record.data == changes[7].fields
        assert record.version == changes[7].hlc
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert stored.acked_through == 1
        assert stored.last_contact is not None
        assert stored.flagged_reason is None

        # The next batch updates one record, deletes another and adds one.
        b7 = await hq.store.get_record(COLL, "b7")
        assert b7 is not None
        hlc = pack(system_ms()) + 100
        update = Change(
            COLL, "b7", "upsert", {"village": "Moved"}, hlc, b7.version, node.node_id, 26
        )
        delete = Change(COLL, "b8", "delete", {}, hlc + 1, b7.version, node.node_id, 27)
        other = make_changes(node, 28, 1, collection="distributions", key_prefix="d")
        response = await hq.post(seal_batch(node, 2, [update, delete, *other]))
        assert await hq.acked(response) == 2
        record = await hq.store.get_record(COLL, "b7")
        assert record is not None
        assert record.data["village"] == "Moved"
        assert record.data["name"] == changes[7].fields["name"]
        deleted = await hq.store.get_record(COLL, "b8")
        assert deleted is not None
        assert deleted.deleted
        assert await hq.store.count_records(COLL) == 24
        assert await hq.store.count_records("distributions") == 1


async def test_duplicate_batch_gets_the_same_ack_and_changes_nothing(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        first = seal_batch(node, 1, make_changes(node, 1, 10))
        second = seal_batch(node, 2, make_changes(node, 11, 10, key_offset=10))
        assert await hq.acked(await hq.post(first)) == 1
        assert await hq.acked(await hq.post(second)) == 2
        before = hq.snapshot()
        assert len(before.changelog) == 20
        for data in (first, second, first):
            assert await hq.acked(await hq.post(data)) == 2
        assert hq.snapshot() == before


async def test_gap_gets_409_with_expected_sequence(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        before = hq.snapshot()
        response = await hq.post(seal_batch(node, 3, make_changes(node, 1, 5)))
        assert response.status == 409
        body = await response.json()
        assert body["error"] == "gap"
        assert body["expected"] == 1
        assert hq.snapshot() == before
        assert await hq.acked(await hq.post(seal_batch(node, 1, make_changes(node, 1, 5)))) == 1
        response = await hq.post(seal_batch(node, 5, make_changes(node, 6, 5)))
        assert response.status == 409
        assert (await response.json())["expected"] == 2


async def test_change_ids_already_logged_are_not_applied_twice(tmp_path: Path) -> None:
    """An agent that re-batches after a crash may resend changes inside a new batch number."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 10)
        assert await hq.acked(await hq.post(seal_batch(node, 1, changes[:6]))) == 1
        assert await hq.acked(await hq.post(seal_batch(node, 2, changes[4:]))) == 2
        assert await hq.store.changelog_count() == 10
        assert await hq.store.count_records(COLL) == 10


async def test_interleaved_collections_are_accepted_and_logged_in_sequence_order(
    tmp_path: Path,
) -> None:
    """decode_changes groups by collection; HQ must not mistake that for disorder."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        a = make_changes(node, 1, 4, collection="a")
        b = make_changes(node, 1, 4, collection="b", key_prefix="x")
        mixed = []
        for i in range(4):
            mixed.append(replace(a[i], seq=2 * i + 1))
            mixed.append(replace(b[i], seq=2 * i + 2))
        assert await hq.acked(await hq.post(seal_batch(node, 1, mixed))) == 1
        origin_seqs = [row[2] for row in hq.snapshot().changelog]
        assert origin_seqs == list(range(1, 9))


async def test_forged_signature_is_401(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        attacker = NodeIdentity.generate()
        changes = make_changes(node, 1, 3)
        body = encode_changes(changes)
        raw = packb(body)
        header = raw_header(node, count=3, last=3, codec=int(Codec.NONE), raw=len(raw))
        forged = seal_raw(attacker, header, raw)  # claims `node`, signed by someone else
        await refused(hq, forged, 401, "bad_signature")
        genuine = bytearray(seal_batch(node, 1, changes))
        genuine[-1] ^= 0x01
        await refused(hq, bytes(genuine), 401, "bad_signature")


async def test_unknown_node_is_403(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        await hq.enroll()
        stranger = NodeIdentity.generate()
        await refused(
            hq, seal_batch(stranger, 1, make_changes(stranger, 1, 3)), 403, "unknown_node"
        )


async def test_revoked_node_is_403_and_keeps_its_data(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        assert await hq.acked(await hq.post(seal_batch(node, 1, make_changes(node, 1, 3)))) == 1
        await hq.store.revoke_node(node.node_id, actor="test")
        await refused(hq, seal_batch(node, 2, make_changes(node, 4, 3)), 403, "unknown_node")
        assert await hq.store.count_records(COLL) == 3


async def test_wrong_version_byte_is_400(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        data = bytearray(seal_batch(node, 1, make_changes(node, 1, 3)))
        data[4] = 2
        await refused(hq, bytes(data), 400, "unsupported_version")


async def test_bad_magic_and_garbage_are_400(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        data = bytearray(seal_batch(node, 1, make_changes(node, 1, 3)))
        data[0:4] = b"HTTP"
        await refused(hq, bytes(data), 400, "bad_magic")
        await refused(hq, b"", 400, "corrupt")
        await refused(hq, b"FSYN\x01", 400, "corrupt")
        truncated = seal_batch(node, 1, make_changes(node, 1, 3))[:-10]
        await refused(hq, truncated, 400, "corrupt")


async def test_oversize_header_is_413(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        data = bytearray(seal_batch(node, 1, make_changes(node, 1, 3)))
        data[6:8] = (2000).to_bytes(2, "big")
        await refused(hq, bytes(data), 413, "oversize")


async def test_body_over_max_batch_bytes_is_413(tmp_path: Path) -> None:
    async with running_hq(tmp_path, max_batch_bytes=64 * 1024) as hq:
        node = await hq.enroll()
        await refused(hq, b"\0" * (64 * 1024 + 1), 413, "oversize")

        async def chunks() -> AsyncIterator[
            bytes
        ]:  # no Content-Length: the cap applies while reading
            for _ in range(20):
                yield b"\0" * 8192

        before = hq.snapshot()
        response = await hq.post(chunks())
        assert response.status == 413
        assert (await response.json())["error"] == "oversize"
        assert hq.snapshot() == before
        # A batch under the cap still works on the same server.
        assert await hq.acked(await hq.post(seal_batch(node, 1, make_changes(node, 1, 3)))) == 1


async def test_decompression_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * 100_000_000)
    assert len(bomb) < 100_000
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        # Header claims a small body: decompression stops right after the declared size.
        small = seal_raw(node, raw_header(node, raw=1000), bomb)
        await refused(hq, small, 413, "oversize")
        # Header tells the truth (100 MB): refused before any decompression.
        honest = seal_raw(node, raw_header(node, raw=100_000_000), bomb)
        await refused(hq, honest, 413, "oversize")
        # A valid frame header with a corrupt zstd frame.
        corrupt = seal_raw(node, raw_header(node, raw=1000), bomb[:-50] + b"\xff" * 50)
        response = await hq.post(corrupt)
        assert response.status in (400, 413)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert (peak_after - peak_before) * 1024 < 50_000_000


async def test_changes_from_another_origin_are_400(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        other = await hq.enroll(name="field-2")
        theirs = make_changes(other, 1, 3)
        await refused(hq, seal_batch(node, 1, theirs), 400, "corrupt")
        mixed = [*make_changes(node, 1, 2), *make_changes(other, 3, 1)]
        await refused(hq, seal_batch(node, 1, mixed), 400, "corrupt")


async def test_inconsistent_headers_are_400(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 3)
        await refused(hq, seal_batch(node, 0, changes), 400, "corrupt")  # batch seq 0
        await refused(hq, seal_batch(node, 1, changes, count=4), 400, "corrupt")
        await refused(hq, seal_batch(node, 1, changes, first=2), 400, "corrupt")
        await refused(hq, seal_batch(node, 1, changes, last=2), 400, "corrupt")
        twice = [changes[0], changes[1], replace(changes[2], seq=2)]
        await refused(hq, seal_batch(node, 1, twice), 400, "corrupt")
        feed_kind = seal(node, Kind.FEED, encode_changes(changes), seq=1, first=1, last=3, count=3)
        await refused(hq, feed_kind, 400, "corrupt")


async def test_unstorable_values_are_refused(tmp_path: Path) -> None:
    """Values JSON cannot carry are a broken rule (422, protocol.limits); a map key that is not a
    string is malformed msgpack for this protocol (400, refused by the decoder)."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        base = make_changes(node, 1, 1)[0]
        for bad in (b"binary", float("nan"), {"nested": float("inf")}):
            change = replace(base, fields={"x": bad})
            await refused(hq, seal_batch(node, 1, [change]), 422, "invalid_change")
        change = replace(base, fields={"x": {b"k": 1}})
        await refused(hq, seal_batch(node, 1, [change]), 400, "corrupt")
        too_late = replace(base, hlc=1 << 63)
        await refused(hq, seal_batch(node, 1, [too_late]), 400, "corrupt")


async def test_wrong_content_type_is_415(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        data = seal_batch(node, 1, make_changes(node, 1, 3))
        before = hq.snapshot()
        response = await hq.client.post(
            "/v1/batches", data=data, headers={"Content-Type": "application/json"}
        )
        assert response.status == 415
        assert (await response.json())["error"] == "unsupported_media_type"
        assert hq.snapshot() == before


async def test_node_with_clock_two_years_ahead_is_flagged_but_its_data_accepted(
    tmp_path: Path,
) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        ahead_ms = system_ms() + 2 * 365 * 24 * 3600 * 1000
        changes = make_changes(node, 1, 5, hlc_ms=ahead_ms)
        data = seal_batch(node, 1, changes, time=pack(ahead_ms))
        response = await hq.post(data)
        body = await response.read()
        assert response.status == 200
        ack = hq.open_from_hq(body)
        # HQ's clock did not jump two years: its ack is stamped near the real time.
        assert ack.header["time"] < pack(system_ms() + 60_000)
        assert await hq.store.count_records(COLL) == 5
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert stored.acked_through == 1
        assert stored.flagged_reason is not None
        assert "ahead" in stored.flagged_reason
        assert stored.clock_offset_ms is not None
        assert stored.clock_offset_ms > 300 * 24 * 3600 * 1000


async def test_node_with_a_good_clock_is_not_flagged(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 5, hlc_ms=system_ms() + 60_000)  # 1 min ahead: fine
        assert await hq.acked(await hq.post(seal_batch(node, 1, changes))) == 1
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert stored.flagged_reason is None
        ack = hq.open_from_hq(await (await hq.post(seal_batch(node, 1, changes))).read())
        assert ack.header["time"] > changes[-1].hlc  # HQ's clock merged the node's stamps


async def test_concurrent_batches_from_several_nodes(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        nodes = [await hq.enroll(name=f"field-{i}") for i in range(4)]

        async def push(i: int, node: NodeIdentity) -> None:
            for b in range(5):
                changes = make_changes(node, b * 20 + 1, 20, key_prefix=f"n{i}-", key_offset=b * 20)
                response = await hq.post(seal_batch(node, b + 1, changes))
                assert await hq.acked(response) == b + 1

        await asyncio.gather(*(push(i, node) for i, node in enumerate(nodes)))
        assert await hq.store.changelog_count() == 400
        assert await hq.store.count_records(COLL) == 400


async def test_state_survives_restart(tmp_path: Path) -> None:
    node = NodeIdentity.generate()
    first = seal_batch(node, 1, make_changes(node, 1, 5))
    async with running_hq(tmp_path) as hq:
        await hq.enroll(node)
        hq_key = hq.hq_public_key
        assert await hq.acked(await hq.post(first)) == 1
    async with running_hq(tmp_path) as hq:
        assert hq.hq_public_key == hq_key
        result = await hq.post(first)  # the agent resends exactly what it sent
        assert await hq.acked(result) == 1
        assert await hq.store.changelog_count() == 5
        assert await hq.acked(await hq.post(seal_batch(node, 2, make_changes(node, 6, 5)))) == 2


async def test_store_ingest_reports_status(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 3)
        applied = await hq.store.ingest(node.node_id, 1, changes)
        assert (applied.status, applied.acked_through, applied.appended) == (
            IngestStatus.APPLIED,
            1,
            3,
        )
        duplicate = await hq.store.ingest(node.node_id, 1, changes)
        assert (duplicate.status, duplicate.acked_through) == (IngestStatus.DUPLICATE, 1)
        gap = await hq.store.ingest(node.node_id, 3, changes)
        assert (gap.status, gap.expected) == (IngestStatus.GAP, 2)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_is_503_and_loses_no_acknowledged_batch(small_disk: Path) -> None:
    async with running_hq(small_disk) as hq:
        node = await hq.enroll()
        acked = 0
        status = 200
        for batch in range(1, 200):
            changes = make_changes(node, (batch - 1) * 100 + 1, 100, key_offset=(batch - 1) * 100)
            response = await hq.post(seal_batch(node, batch, changes))
            status = response.status
            if status != 200:
                body = await response.json()
                break
            acked = await hq.acked(response)
        assert status == 503, "the disk never filled up"
        assert body["error"] == "unavailable"
        assert acked >= 1
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert stored.acked_through == acked
        assert await hq.store.changelog_count() == acked * 100
        assert await hq.store.count_records(COLL) == acked * 100
        # Retrying the refused batch is still refused or accepted -- never half-stored.
        response = await hq.post(
            seal_batch(
                node, acked + 1, make_changes(node, acked * 100 + 1, 100, key_offset=acked * 100)
            )
        )
        assert response.status in (200, 503)
        expected = acked + (1 if response.status == 200 else 0)
        assert await hq.store.changelog_count() == expected * 100
