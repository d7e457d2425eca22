"""Per-field merge of changes into a record, and the conflict policies: pure functions, the same on
agent and HQ.

A record's state is its visible field values, a stamp per field (HLC, origin node) and a tombstone
stamp. A write to a field wins when its stamp is higher (last writer wins, ties broken by node id);
a field whose stamp is not above the tombstone is dead. The state is therefore a pure function of the
set of changes applied -- any order, any number of repeats gives the same result.

The order of writes is total. One origin should never stamp two writes alike, but a node restored
from an old backup can; then the value whose canonical encoding (`value_rank`) is higher wins, the
same on every replica, and costs nothing per field (the values are there to compare). A delete and
an upsert stamped alike: the delete wins (a field at or below the tombstone is dead).

The policies of the collections config build on that without giving it up:

- `lww`: the visible value is the highest stamp; a concurrent loser is only logged.
- `review`: the visible value is *also* the highest stamp (the only choice every replica makes alike
  without talking to the others), and the field keeps its *heads*: the writes to it that no later
  write has seen. A write W has seen a write V when W's parent (the record version its writer saw)
  is at or above V's HLC. That relation is a strict partial order (a change's HLC is above its
  parent), so the heads -- its maximal elements -- are a function of the set of writes too, and
  every replica that applied the same changes holds the same heads. Two heads with different values
  are a conflict waiting for a person; a resolution is an ordinary write whose parent covers every
  head, so it is applied and propagated like any other change, and closes the conflict everywhere.
- `source_of_truth`: only the owner writes the field (`may_write`): the agent refuses other writes
  at the edge, and HQ reverts any that slip through with a change of its own. Among owners, lww.

Deletes are tombstones and race updates by stamp (lww) whatever the field policies.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from protocol.change import Change

Stamp = tuple[int, str]
NO_STAMP: Stamp = (0, "")


class Head(NamedTuple):
    """A write to a `review` field that no later write has seen."""

    hlc: int
    origin: str
    parent: int
    value: Any

    @property
    def stamp(self) -> Stamp:
        return (self.hlc, self.origin)

    def saw(self, hlc: int) -> bool:
        """True if this write's author had seen the record at or after `hlc`."""
        return self.parent >= hlc


def _canonical(value: Any) -> Any:
    """`value` with every map's entries in key order (by their encoding), so equal values encode
    alike however they were built."""
    if isinstance(value, dict):
        items = [(_canonical(k), _canonical(v)) for k, v in value.items()]
        items.sort(key=lambda kv: value_rank(kv[0]))
        return dict(items)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def value_rank(value: Any) -> bytes:
    """The tie-break between two values written with the same stamp: their canonical msgpack
    encoding, compared as bytes (a total order, computed alike on agent and HQ). Only ever
    computed on a stamp tie."""
    try:
        packed: bytes = msgpack.packb(_canonical(value), use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        # Not encodable (e.g. an integer beyond 64 bits): its repr still orders it the same way
        # everywhere, after every encodable value.
        packed = b"\xff" + repr(value).encode("utf-8", "backslashreplace")
    return packed


def outranks(stamp: Stamp, value: Any, current: Stamp, current_value: Any) -> bool:
    """True if a write of `value` at `stamp` beats the field's `current_value` at `current`:
    the higher stamp, and on a tie the higher `value_rank`."""
    if stamp != current:
        return stamp > current
    return value_rank(value) > value_rank(current_value)


@dataclass(slots=True)
class RecordState:
    values: dict[str, Any] = field(default_factory=dict)
    stamps: dict[str, Stamp] = field(default_factory=dict)
    tombstone: Stamp = NO_STAMP
    # Only for `review` fields that have been written: their heads, highest stamp first.
    heads: dict[str, list[Head]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        """The highest HLC in the record: the parent a writer who saw this state declares."""
        return max((s[0] for s in self.stamps.values()), default=self.tombstone[0])

    @property
    def alive(self) -> bool:
        return bool(self.stamps)

    def to_storage(self) -> tuple[dict[str, Any], dict[str, list[Any]], list[Any] | None]:
        tomb = list(self.tombstone) if self.tombstone != NO_STAMP else None
        return self.values, {k: list(v) for k, v in self.stamps.items()}, tomb

    def heads_to_storage(self) -> dict[str, list[list[Any]]] | None:
        """The heads of `review` fields for storage (None when there are none)."""
        return {k: [list(h) for h in v] for k, v in self.heads.items()} or None

    @classmethod
    def from_storage(
        cls,
        values: dict[str, Any],
        stamps: dict[str, list[Any]],
        tombstone: list[Any] | None,
        heads: Mapping[str, Iterable[Iterable[Any]]] | None = None,
    ) -> RecordState:
        return cls(
            values,
            {k: (int(v[0]), str(v[1])) for k, v in stamps.items()},
            (int(tombstone[0]), str(tombstone[1])) if tombstone else NO_STAMP,
            {k: [Head(*h) for h in v] for k, v in (heads or {}).items()},
        )

    def conflict(self, name: str) -> list[Head] | None:
        """The heads of field `name` if they disagree (an open `review` conflict), else None."""
        heads = self.heads.get(name)
        if not heads or len(heads) < 2:
            return None
        first = heads[0].value
        return heads if any(h.value != first for h in heads[1:]) else None

    def conflicts(self) -> dict[str, list[Head]]:
        """Every `review` field of the record in conflict, with its heads."""
        return {name: heads for name in self.heads if (heads := self.conflict(name)) is not None}


def concurrent_fields(state: RecordState, change: Change) -> list[str]:
    """Fields the change writes that someone else wrote (or deleted) after the version the writer
    saw. An update racing another node's delete makes every field it writes concurrent."""
    tomb_hlc, tomb_origin = state.tombstone
    if change.op == "upsert" and tomb_hlc > change.parent and tomb_origin != change.origin:
        return list(change.fields)
    return [
        name
        for name in change.fields
        if name in state.stamps
        and state.stamps[name][0] > change.parent
        and state.stamps[name][1] != change.origin
    ]


def apply_change(state: RecordState, change: Change, review: Collection[str] = ()) -> bool:
    """Merge `change` into `state` in place; True if anything visible changed.

    `review` names the record's fields under the `review` policy: their heads are kept.
    """
    stamp: Stamp = (change.hlc, change.origin)
    changed = False
    if change.op == "delete":
        if stamp > state.tombstone:
            state.tombstone = stamp
            for name in [n for n, s in state.stamps.items() if s <= stamp]:
                del state.stamps[name]
                del state.values[name]
                changed = True
            _bury_heads(state)
        return changed
    if stamp <= state.tombstone:
        return False
    for name, value in change.fields.items():
        current = state.stamps.get(name, NO_STAMP)
        if name in review:
            _add_head(state, name, Head(change.hlc, change.origin, change.parent, value), current)
        # `outranks`, inlined: this runs for every field of every change.
        if stamp > current or (
            stamp == current and value_rank(value) > value_rank(state.values.get(name))
        ):
            if name not in state.values or state.values[name] != value:
                changed = True
            state.values[name] = value
            state.stamps[name] = stamp
    return changed


def _add_head(state: RecordState, name: str, new: Head, current: Stamp) -> None:
    heads = state.heads.get(name)
    if heads is None:
        # A field written before it came under `review` (or a new one): its last write is the only
        # head known, and what its author saw is not, so it is taken to have seen nothing.
        heads = (
            [Head(current[0], current[1], 0, state.values.get(name))] if current != NO_STAMP else []
        )
    if any(_same_write(h, new) or h.saw(new.hlc) for h in heads):
        if name not in state.heads and heads:
            state.heads[name] = heads
        return  # a re-delivery, or a write some head's author had already seen
    # Heads stamped alike (one origin reissued a stamp) have seen neither the other: both stay.
    kept = [h for h in heads if not new.saw(h.hlc)]
    kept.append(new)
    if len({h.stamp for h in kept}) < len(kept):
        kept.sort(key=lambda h: (h.stamp, value_rank(h.value)), reverse=True)
    else:
        kept.sort(key=lambda h: h.stamp, reverse=True)
    state.heads[name] = kept


def _same_write(head: Head, new: Head) -> bool:
    """A re-delivery of a head: same stamp and same value (by `value_rank`: True is not 1)."""
    return head.stamp == new.stamp and value_rank(head.value) == value_rank(new.value)


def _bury_heads(state: RecordState) -> None:
    """Drop heads a delete outranks (lww between deletes and updates, whatever the policy)."""
    for name in list(state.heads):
        alive = [h for h in state.heads[name] if h.stamp > state.tombstone]
        if alive:
            state.heads[name] = alive
        else:
            del state.heads[name]


# ---- source_of_truth: who may write a field -------------------------------------------------


def may_write(owner: str | None, writer: Collection[str], *, creating: bool) -> bool:
    """May a writer with the principals `writer` (e.g. {"group:kakuma"} for a node in that group,
    {"hq:case-management"} for an HQ system) write a `source_of_truth` field owned by `owner`?

    The initial value of a new record is anyone's to set (a registration carries its status); every
    later write belongs to the owner.
    """
    return creating or owner is None or owner in writer


def conflict_transition(before: list[Head] | None, after: list[Head] | None) -> str | None:
    """What a change did to a `review` field's conflict, from `RecordState.conflict` before and
    after it: "opened", "updated" (other heads), "closed", or None. A queue that acts on these
    holds exactly one open entry per field in conflict, in any order of arrival."""
    if before is None:
        return None if after is None else "opened"
    if after is None:
        return "closed"
    return None if before == after else "updated"


# ---- the policies of a collection, as merge needs them -----------------------------------------


@dataclass(frozen=True, slots=True)
class FieldPolicies:
    """One collection's fields by policy (fields not named are lww)."""

    review: frozenset[str] = frozenset()
    owners: Mapping[str, str] = field(default_factory=dict)  # source_of_truth field -> owner
    reviewers: Mapping[str, str] = field(default_factory=dict)  # review field -> group:NAME
    append_only: bool = False

    def policy(self, name: str) -> str:
        if name in self.review:
            return "review"
        return "source_of_truth" if name in self.owners else "lww"


NO_POLICIES = FieldPolicies()


def field_policies(collections: Any) -> dict[str, FieldPolicies]:
    """`FieldPolicies` per collection of a `protocol.collections.CollectionsConfig` (or None)."""
    out: dict[str, FieldPolicies] = {}
    for name, collection in collections.collections.items() if collections else ():
        # Records hold a renamed field under its wire name (edge transform): so do the policies.
        transform = getattr(collection, "transform", None)
        rename = transform.rename if transform is not None else {}
        specs = {rename.get(n, n): s for n, s in collection.fields.items()}
        out[name] = FieldPolicies(
            review=frozenset(n for n, s in specs.items() if s.policy == "review"),
            owners={n: s.owner for n, s in specs.items() if s.policy == "source_of_truth"},
            reviewers={n: s.owner for n, s in specs.items() if s.policy == "review" and s.owner},
            append_only=collection.append_only,
        )
    return out
