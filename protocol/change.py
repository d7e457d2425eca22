"""The change model and its compact columnar wire encoding.

A change is one write to one record. Its id is (origin node, origin sequence); `hlc` is the time of the
write; `parent` is the version of the record the writer saw (the highest field HLC then, 0 for a new
record). `fields` holds only the fields written. That is all the metadata a change carries: it is paid
on every record over links billed by the megabyte.

On the wire, changes are grouped by collection and laid out by column (keys together, each field's
values together, timestamps delta-encoded), which lets zstd find far more redundancy than in a list of
maps. See docs/protocol.md for the exact layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from protocol.errors import CorruptMessage
from protocol.hlc import MAX_HLC

Op = Literal["upsert", "delete"]
OPS: tuple[Op, Op] = ("upsert", "delete")
BODY_VERSION = 1
# Marks "this change does not write this field" in a column; distinct from an explicit null.
ABSENT = msgpack.ExtType(1, b"")


@dataclass(frozen=True, slots=True)
class Change:
    collection: str
    key: str
    op: Op
    fields: dict[str, Any]
    hlc: int
    parent: int
    origin: str
    seq: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def change_id(self) -> tuple[str, int]:
        return (self.origin, self.seq)


def _group(changes: Iterable[Change]) -> dict[str, list[Change]]:
    groups: dict[str, list[Change]] = {}
    for change in changes:
        groups.setdefault(change.collection, []).append(change)
    return groups


def _deltas(values: Sequence[int]) -> list[int]:
    out, prev = [], 0
    for v in values:
        out.append(v - prev)
        prev = v
    return out


def _undeltas(values: Sequence[Any], what: str, low: int) -> list[int]:
    """Running sums of delta-encoded integers, each checked to lie in [low, MAX_HLC]."""
    out, acc = [], 0
    for v in values:
        if type(v) is not int:
            raise CorruptMessage(f"body: {what} must be integers")
        acc += v
        if not low <= acc <= MAX_HLC:
            raise CorruptMessage(f"body: {what} out of range ({acc})")
        out.append(acc)
    return out


def _index(value: Any, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value < limit:
        raise CorruptMessage(f"body: {what} index {value!r} out of range")
    return value


def encode_changes(changes: Sequence[Change]) -> dict[str, Any]:
    """Columnar body (a msgpack-ready dict) for `changes`; decode_changes() reverses it."""
    origins: list[str] = []
    origin_index: dict[str, int] = {}
    groups = []
    for collection, members in _group(changes).items():
        names: list[str] = []
        seen: set[str] = set()
        for change in members:
            for name in change.fields:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        for change in members:
            if change.origin not in origin_index:
                origin_index[change.origin] = len(origins)
                origins.append(change.origin)
        origin_ids = [origin_index[c.origin] for c in members]
        hlcs = [c.hlc for c in members]
        group: dict[str, Any] = {
            "coll": collection,
            "origin": origin_ids[0] if len(set(origin_ids)) == 1 else origin_ids,
            "seq": _deltas([c.seq for c in members]),
            "key": [c.key for c in members],
            "hlc": _deltas(hlcs),
            "parent": [None if c.parent == 0 else c.hlc - c.parent for c in members],
            "fields": names,
            "cols": [[c.fields.get(n, ABSENT) for c in members] for n in names],
        }
        if any(c.op != "upsert" for c in members):
            group["op"] = [OPS.index(c.op) for c in members]
        groups.append(group)
    return {"v": BODY_VERSION, "origins": origins, "groups": groups}


def _list(group: dict[str, Any], name: str, length: int | None) -> list[Any]:
    value = group.get(name)
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise CorruptMessage(f"body: group field {name!r} must be a list of {length} items")
    return value


def decode_changes(body: Any) -> list[Change]:
    """Changes from a columnar body; CorruptMessage names what is malformed."""
    if not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != BODY_VERSION:
        raise CorruptMessage(f"body: expected a map with v={BODY_VERSION}")
    origins = body.get("origins")
    groups = body.get("groups")
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise CorruptMessage("body: 'origins' must be a list of node ids")
    if not isinstance(groups, list):
        raise CorruptMessage("body: 'groups' must be a list")
    changes: list[Change] = []
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("coll"), str):
            raise CorruptMessage("body: each group needs a collection name")
        keys = _list(group, "key", None)
        n = len(keys)
        if not all(isinstance(k, str) for k in keys):
            raise CorruptMessage("body: record keys must be strings")
        seqs = _undeltas(_list(group, "seq", n), "sequences", 1)
        hlcs = _undeltas(_list(group, "hlc", n), "timestamps", 0)
        parents = _list(group, "parent", n)
        names = _list(group, "fields", None)
        cols = _list(group, "cols", len(names))
        if not all(isinstance(name, str) for name in names):
            raise CorruptMessage("body: field names must be strings")
        for col in cols:
            if not isinstance(col, list) or len(col) != n:
                raise CorruptMessage(f"body: each column must hold {n} values")
        origin = group.get("origin")
        origin_ids = [origin] * n if isinstance(origin, int) else _list(group, "origin", n)
        ops = _list(group, "op", n) if "op" in group else [0] * n
        for i in range(n):
            who = origins[_index(origin_ids[i], len(origins), "origin")]
            op = OPS[_index(ops[i], len(OPS), "op")]
            parent = parents[i]
            if parent is not None and (
                type(parent) is not int or not 0 <= hlcs[i] - parent <= MAX_HLC
            ):
                raise CorruptMessage("body: parent must be nil or an HLC delta in range")
            fields = {
                name: col[i] for name, col in zip(names, cols, strict=True) if col[i] != ABSENT
            }
            changes.append(
                Change(
                    collection=group["coll"],
                    key=keys[i],
                    op=op,
                    fields=fields,
                    hlc=hlcs[i],
                    parent=0 if parent is None else hlcs[i] - parent,
                    origin=who,
                    seq=seqs[i],
                )
            )
    return changes
