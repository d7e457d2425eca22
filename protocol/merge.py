"""Per-field merge of changes into a record: pure functions, the same on agent and HQ.

A record's state is its visible field values, a stamp per field (HLC, origin node) and a tombstone
stamp. A write to a field wins when its stamp is higher (last writer wins, ties broken by node id);
a field whose stamp is not above the tombstone is dead. The state is therefore a pure function of the
set of changes applied -- any order, any number of repeats gives the same result. The conflict
policies of the collection config (`review`, `source_of_truth`) build on `concurrent_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.change import Change

Stamp = tuple[int, str]
NO_STAMP: Stamp = (0, "")


@dataclass(slots=True)
class RecordState:
    values: dict[str, Any] = field(default_factory=dict)
    stamps: dict[str, Stamp] = field(default_factory=dict)
    tombstone: Stamp = NO_STAMP

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

    @classmethod
    def from_storage(
        cls, values: dict[str, Any], stamps: dict[str, list[Any]], tombstone: list[Any] | None
    ) -> RecordState:
        return cls(
            values,
            {k: (int(v[0]), str(v[1])) for k, v in stamps.items()},
            (int(tombstone[0]), str(tombstone[1])) if tombstone else NO_STAMP,
        )


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


def apply_change(state: RecordState, change: Change) -> bool:
    """Merge `change` into `state` in place; True if anything visible changed."""
    stamp: Stamp = (change.hlc, change.origin)
    changed = False
    if change.op == "delete":
        if stamp > state.tombstone:
            state.tombstone = stamp
            for name in [n for n, s in state.stamps.items() if s <= stamp]:
                del state.stamps[name]
                del state.values[name]
                changed = True
        return changed
    if stamp <= state.tombstone:
        return False
    for name, value in change.fields.items():
        current = state.stamps.get(name, NO_STAMP)
        if stamp > current:
            if name not in state.values or state.values[name] != value:
                changed = True
            state.values[name] = value
            state.stamps[name] = stamp
    return changed
