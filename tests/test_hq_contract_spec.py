"""docs/protocol.md against a live HQ (issue 9, defect 8): each point where the spec, the vectors
and HQ disagreed, checked on the wire.

Every refusal also proves that HQ's state did not move.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hq_fixtures import Harness, make_changes, running_hq, seal_batch

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
