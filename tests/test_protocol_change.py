"""The change model's columnar body: exact layout, round trips, and decoding of hostile bodies.

`decode_changes` runs on the body of any message that passed signature verification, so a buggy
(not only a malicious) enrolled node can hand it anything msgpack can express: it must return
changes or raise CorruptMessage, nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import canon, changes, examples, grouped

from protocol.change import ABSENT, BODY_VERSION, OPS, Change, decode_changes, encode_changes
from protocol.envelope import packb, unpackb
from protocol.errors import CorruptMessage


def change(
    key: str = "k",
    fields: dict[str, Any] | None = None,
    *,
    collection: str = "people",
    op: str = "upsert",
    hlc: int = 1000,
    parent: int = 0,
    origin: str = "nA",
    seq: int = 1,
) -> Change:
    return Change(collection, key, op, fields or {}, hlc, parent, origin, seq)  # type: ignore[arg-type]


def wire(body: Any) -> Any:
    """Through msgpack and back, as a receiver sees it."""
    return unpackb(packb(body), "body")


# -- layout ----------------------------------------------------------------------------------------


def test_exact_layout() -> None:
    """The body documented in docs/protocol.md, key for key."""
    batch = [
        change("a", {"x": 1, "y": None}, hlc=1000, parent=0, seq=5),
        change("b", {"y": "two"}, hlc=1010, parent=900, origin="nB", seq=6),
        change("c", op="delete", hlc=1011, parent=1010, seq=9),
        change("s", {"z": [1, {"k": 2}]}, collection="sites", hlc=2000, seq=10),
    ]
    assert encode_changes(batch) == {
        "v": 1,
        "origins": ["nA", "nB"],
        "groups": [
            {
                "coll": "people",
                "origin": [0, 1, 0],
                "seq": [5, 1, 3],
                "key": ["a", "b", "c"],
                "hlc": [1000, 10, 1],
                "parent": [None, 110, 1],
                "fields": ["x", "y"],
                "cols": [[1, ABSENT, ABSENT], [None, "two", ABSENT]],
                "op": [0, 0, 1],
            },
            {
                "coll": "sites",
                "origin": 0,
                "seq": [10],
                "key": ["s"],
                "hlc": [2000],
                "parent": [None],
                "fields": ["z"],
                "cols": [[[1, {"k": 2}]]],
            },
        ],
    }


def test_absent_is_ext_type_1_with_empty_data() -> None:
    assert packb(ABSENT) == b"\xc7\x00\x01"
    assert wire([ABSENT, None]) == [ABSENT, None]


def test_empty_batch() -> None:
    assert encode_changes([]) == {"v": BODY_VERSION, "origins": [], "groups": []}
    assert decode_changes(wire(encode_changes([]))) == []


def test_explicit_null_and_absent_are_distinct() -> None:
    batch = [change("a", {"phone": None}), change("b", {"name": "x"}, seq=2, hlc=1001)]
    decoded = decode_changes(wire(encode_changes(batch)))
    assert decoded[0].fields == {"phone": None}
    assert decoded[1].fields == {"name": "x"}


def test_extra_is_not_on_the_wire() -> None:
    with_extra = Change("c", "k", "upsert", {"a": 1}, 5, 0, "n", 1, extra={"note": "local"})
    (decoded,) = decode_changes(wire(encode_changes([with_extra])))
    assert decoded.extra == {}
    assert decoded == with_extra  # extra is not part of equality


# -- round trips ---------------------------------------------------------------------------------


@examples(100)
@given(batch=changes())
def test_round_trip(batch: list[Change]) -> None:
    """Decoding returns every change, grouped by collection (first appearance), in sending order."""
    assert canon(decode_changes(wire(encode_changes(batch)))) == canon(grouped(batch))


@examples(50)
@given(batch=changes())
def test_encoding_invariants(batch: list[Change]) -> None:
    body = encode_changes(batch)
    assert sorted(body["origins"]) == sorted({c.origin for c in batch})
    for group in body["groups"]:
        members = [c for c in batch if c.collection == group["coll"]]
        assert len(group["key"]) == len(members)
        assert isinstance(group["origin"], int) == (len({c.origin for c in members}) == 1)
        assert ("op" in group) == any(c.op == "delete" for c in members)
        assert [p is None for p in group["parent"]] == [c.parent == 0 for c in members]
        assert all(len(col) == len(members) for col in group["cols"])
    assert [g["coll"] for g in body["groups"]] == list(dict.fromkeys(c.collection for c in batch))


# -- hostile bodies ------------------------------------------------------------------------------

wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=4)
    | st.just(ABSENT),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
GROUP_KEYS = ["coll", "origin", "seq", "key", "hlc", "parent", "fields", "cols", "op"]


def must_decode_or_refuse(body: Any) -> None:
    try:
        decoded = decode_changes(body)
    except CorruptMessage:
        return
    for c in decoded:
        assert isinstance(c.collection, str)
        assert isinstance(c.key, str)
        assert c.op in OPS
        assert isinstance(c.origin, str)
        assert isinstance(c.hlc, int)
        assert isinstance(c.parent, int)
        assert isinstance(c.seq, int)
        assert ABSENT not in c.fields.values()


@examples(200)
@given(body=wire_values)
def test_arbitrary_values_decode_or_refuse(body: Any) -> None:
    must_decode_or_refuse(body)


@examples(200)
@given(
    batch=changes(max_size=4),
    edits=st.lists(
        st.tuples(st.sampled_from([*GROUP_KEYS, "v", "origins", "groups"]), wire_values),
        min_size=1,
        max_size=3,
    ),
    position=st.integers(0, 50),
)
def test_mutated_bodies_decode_or_refuse(
    batch: list[Change], edits: list[tuple[str, Any]], position: int
) -> None:
    """A real body with one to three keys replaced, dropped or an element overwritten."""
    body = encode_changes(batch)
    for name, value in edits:
        target, groups = body, body.get("groups")
        if name in GROUP_KEYS and isinstance(groups, list) and groups:
            group = groups[position % len(groups)]
            target = group if isinstance(group, dict) else body
        current = target.get(name)
        if value is None:
            target.pop(name, None)
        elif isinstance(current, list) and current and position % 2:
            current[position % len(current)] = value
        else:
            target[name] = value
    must_decode_or_refuse(wire(body))


def base_body() -> dict[str, Any]:
    return encode_changes(
        [
            change("a", {"x": 1}, seq=1, hlc=100),
            change("b", {"y": 2}, seq=2, hlc=101, origin="nB", op="delete", parent=50),
        ]
    )


def edited(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(base_body())
    target: Any = body
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "map"),
        ({"v": 2, "origins": [], "groups": []}, "v=1"),
        ({"origins": [], "groups": []}, "v=1"),
        (edited("origins", "nA"), "origins"),
        (edited("origins", [1]), "origins"),
        (edited("groups", {}), "groups"),
        (edited("groups.0", []), "collection"),
        (edited("groups.0.coll", 5), "collection"),
        (edited("groups.0.key", ["a", 2]), "keys"),
        (edited("groups.0.key", "ab"), "'key'"),
        (edited("groups.0.seq", [1]), "'seq'"),
        (edited("groups.0.seq", [1, "2"]), "sequences"),
        (edited("groups.0.hlc", [100, True]), "timestamps"),
        (edited("groups.0.hlc", [100, 1.0]), "timestamps"),
        (edited("groups.0.parent", [None]), "'parent'"),
        (edited("groups.0.parent", [None, "50"]), "parent"),
        (edited("groups.0.parent", [None, 1.5]), "parent"),
        (edited("groups.0.fields", ["x", 2]), "field names"),
        (edited("groups.0.fields", ["x", "y", "z"]), "'cols'"),
        (edited("groups.0.cols", [[1, ABSENT]]), "'cols'"),
        (edited("groups.0.cols", [[1], [ABSENT, 2]]), "column"),
        (edited("groups.0.cols", ["ab", [ABSENT, 2]]), "column"),
        (edited("groups.0.origin", [0, 2]), "out of range"),
        (edited("groups.0.origin", [0, "1"]), "out of range"),
        (edited("groups.0.origin", 2), "out of range"),
        (edited("groups.0.origin", "0"), "'origin'"),
        (edited("groups.0.op", [0, 2]), "out of range"),
        (edited("groups.0.op", [0, None]), "out of range"),
        (edited("groups.0.op", [0]), "'op'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_bodies_name_the_problem(body: Any, reason: str) -> None:
    with pytest.raises(CorruptMessage, match=reason):
        decode_changes(body)


def test_unknown_body_and_group_keys_are_ignored() -> None:
    body = base_body()
    body["future"] = 1
    body["groups"][0]["future"] = [1, 2]
    assert decode_changes(body) == decode_changes(base_body())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("groups.0.origin", [0, -1]),
        ("groups.0.origin", [0, True]),
        ("groups.0.op", [0, -1]),
        ("groups.0.op", [True, 0]),
    ],
    ids=["origin -1", "origin true", "op -1", "op true"],
)
def test_negative_or_boolean_indices_are_refused(path: str, value: Any) -> None:
    with pytest.raises(CorruptMessage):
        decode_changes(edited(path, value))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("groups.0.hlc", [-1, 1]),
        ("groups.0.hlc", [2**64 - 1, 2**64 - 1]),
        ("groups.0.seq", [0, 0]),
        ("groups.0.parent", [None, 2**63]),
    ],
    ids=["negative hlc", "hlc over 2**64", "seq 0", "negative parent"],
)
def test_decoded_numbers_are_bounded(path: str, value: Any) -> None:
    with pytest.raises(CorruptMessage):
        decode_changes(edited(path, value))


def test_hlc_deltas_must_fit_msgpack_integers() -> None:
    """Documented limit: a drop of more than 2**63 between neighbouring HLCs cannot be encoded."""
    batch = [change("a", hlc=2**64 - 1), change("b", hlc=0, seq=2)]
    with pytest.raises(OverflowError):
        packb(encode_changes(batch))


def test_ext_values_inside_fields_decode_as_absent_marker() -> None:
    """ABSENT nested inside a value is kept as-is (only a top-level column cell means 'absent')."""
    body = wire(encode_changes([change("a", {"x": [1, 2]})]))
    body["groups"][0]["cols"][0][0] = [ABSENT]
    (decoded,) = decode_changes(body)
    assert decoded.fields == {"x": [msgpack.ExtType(1, b"")]}
