"""One contract for agent and HQ (issue 9, defect 6): what the agent refuses, HQ refuses too.

Each bad change below is sent to a live HQ inside an otherwise good batch of three: HQ must answer
422 `invalid_change` naming the batch, the change sequence and the rule, and store nothing (change
log, records, nodes and tokens compared before and after). The same record handed to the agent's
capture gate (agent.capture.records) is refused with the same rule. Before the fix HQ stored them
all (200 and an ack).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hq_fixtures import Harness, make_changes, running_hq, seal_batch

from agent.capture.records import RejectedInput, record_to_write
from hq_server.ingest import validate_batch
from protocol.change import Change
from protocol.collections import load_collections
from protocol.errors import InvalidChange
from protocol.identity import NodeIdentity
from protocol.limits import MAX_CHANGE_BYTES, MAX_KEY_BYTES, MAX_VALUE_DEPTH

COLL = "beneficiaries"
KEY_FIELD = "id"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class Bad:
    """One bad change: what differs from a good one, and the rule that refuses it."""

    name: str
    rule: str
    collection: str = COLL
    key: str = "b1"
    fields: dict[str, Any] | None = None
    json_ok: bool = True  # whether the agent can be handed it as JSON at all

    def change(self, good: Change) -> Change:
        fields = good.fields if self.fields is None else self.fields
        return replace(good, collection=self.collection, key=self.key, fields=fields)


BAD = [
    Bad("empty field name", "field_name", fields={"": 1}),
    Bad("field name starting with _", "field_name", fields={"_secret": 1}),
    Bad("NUL in a field name", "field_name", fields={"a\x00b": 1}),
    Bad("space in a field name", "field_name", fields={"a b": 1}),
    Bad("65-character field name", "field_name", fields={"a" * 65: 1}),
    Bad("empty key", "key_required", key=""),
    Bad("whitespace key", "key_required", key="  \t"),
    Bad("NUL in a key", "key_chars", key="b\x001"),
    Bad("newline in a key", "key_chars", key="b\n1"),
    Bad("DEL in a key", "key_chars", key="b\x7f1"),
    Bad("line separator in a key", "key_chars", key="b\u20281"),
    Bad("1 MB key", "key_length", key="k" * (1 << 20)),
    Bad("key one byte over", "key_length", key="é" * (MAX_KEY_BYTES // 2) + "x"),
    Bad("../ collection", "collection_name", collection="../etc"),
    Bad("slash in a collection", "collection_name", collection="a/b"),
    Bad("empty collection", "collection_name", collection=""),
    Bad("reserved collection", "collection_reserved", collection="_references"),
    Bad("oversize value", "record_size", fields={"notes": "x" * MAX_CHANGE_BYTES}),
    Bad("nesting too deep", "value_depth", fields={"tree": nested(MAX_VALUE_DEPTH + 1)}),
    Bad("byte string", "value_type", fields={"photo": b"\x89PNG"}, json_ok=False),
    Bad("NaN", "value_type", fields={"score": float("nan")}, json_ok=False),
]


async def assert_refused(hq: Harness, data: bytes, rule: str, seq: int) -> dict[str, Any]:
    before = hq.snapshot()
    response = await hq.post(data)
    body = await response.json()
    assert response.status == 422, body
    assert body["error"] == "invalid_change", body
    message = body["message"]
    assert f"batch 1, change {seq} " in message and f"[{rule}]" in message, message
    assert len(message) < 600 and "Traceback" not in message
    # The same, as data a node or an operator's tool can read.
    assert (body["batch"], body["change"], body["rule"]) == (1, seq, rule), body
    assert hq.snapshot() == before
    return body


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
async def test_hq_refuses_what_the_agent_refuses(tmp_path: Path, bad: Bad) -> None:
    async with running_hq(tmp_path, max_batch_bytes=4 << 20) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 3, size=200)
        changes[1] = bad.change(changes[1])
        await assert_refused(hq, seal_batch(node, 1, changes), bad.rule, seq=2)
        # Nothing was consumed: the same batch numbers, with good content, are taken.
        good = make_changes(node, 1, 3, size=200)
        assert await hq.acked(await hq.post(seal_batch(node, 1, good))) == 1
    if bad.json_ok:
        record = {KEY_FIELD: bad.key, **(bad.fields or {"name": "x"})}
        with pytest.raises(RejectedInput) as refused:
            record_to_write(record, bad.collection, KEY_FIELD)
        assert refused.value.errors[0].rule == bad.rule


async def test_limits_themselves_are_accepted(tmp_path: Path) -> None:
    """The bounds are inclusive: a key of MAX_KEY_BYTES, fields of MAX_CHANGE_BYTES and values
    MAX_VALUE_DEPTH deep are stored, by HQ as by the agent."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        base = make_changes(node, 1, 3, size=200)
        overhead = len('{"id":"b1","notes":""}')
        edge = [
            replace(base[0], key="é" * (MAX_KEY_BYTES // 2)),
            replace(base[1], fields={"id": "b1", "notes": "x" * (MAX_CHANGE_BYTES - overhead)}),
            replace(base[2], fields={"tree": nested(MAX_VALUE_DEPTH), "Z9_": None}),
        ]
        assert await hq.acked(await hq.post(seal_batch(node, 1, edge))) == 1
        assert await hq.store.get_record(COLL, "é" * (MAX_KEY_BYTES // 2)) is not None
    for change in edge:
        record_to_write({KEY_FIELD: change.key, **change.fields}, COLL, KEY_FIELD)


TYPES_TOML = """
[collections.beneficiaries]
key = "id"
allow_unknown_fields = true

[collections.beneficiaries.fields]
id = { type = "string" }
household_size = { type = "integer", max = 30 }
registered = { type = "boolean" }
gps = { type = "object", fields = { lat = { type = "decimal" } } }
born = { type = "date" }
"""

TYPE_BREAKS = [
    ("household_size", "five"),
    ("registered", 1),
    ("gps", {"lat": "north"}),
    ("born", "yesterday"),
]


def collections_file(tmp_path: Path) -> Path:
    path = tmp_path / "collections.toml"
    path.write_text(TYPES_TOML)
    return path


@pytest.mark.parametrize(("name", "value"), TYPE_BREAKS, ids=[n for n, _ in TYPE_BREAKS])
def test_declared_types_are_checked_with_the_collections_file(
    tmp_path: Path, name: str, value: Any
) -> None:
    collections = load_collections(collections_file(tmp_path))
    identity = NodeIdentity.generate()
    changes = make_changes(identity, 1, 2)
    changes[1] = replace(changes[1], fields={name: value})
    header = {"node": identity.node_id, "seq": 4, "first": 1, "last": 2, "count": 2}
    with pytest.raises(InvalidChange) as refused:
        validate_batch(header, changes, collections)
    error = refused.value
    assert (error.batch, error.change, error.rule) == (4, 2, "field_type")
    assert error.details["field"].startswith(name)
    # Without the file, or for a constraint that is not a type (max = 30), HQ takes it.
    validate_batch(header, changes)
    changes[1] = replace(changes[1], fields={"household_size": 99, "undeclared": [1]})
    validate_batch(header, changes, collections)


async def test_live_hq_refuses_a_value_breaking_its_declared_type(tmp_path: Path) -> None:
    async with running_hq(tmp_path, collections_file=str(collections_file(tmp_path))) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 3, size=200)
        changes[1] = replace(changes[1], fields={"household_size": "five"})
        await assert_refused(hq, seal_batch(node, 1, changes), "field_type", seq=2)
