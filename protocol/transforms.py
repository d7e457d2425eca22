"""Edge transforms: how a validated record is shaped before the agent stores and forwards it.

    fields, local_only, problems = transform(collection, record, references)

A collection's `[collections.NAME.transform]` (compiled into `protocol.collections.Transform`) is
applied in a fixed order, each step reading the record as validated (its declared field names):

1. `lookup`: each new field holds the value a reference table maps the field's code to (a missing
   code gives null; an unknown code is a problem unless the lookup has a `default`);
2. `derive`: each new field is text rendered from a template (`{given_name} {family_name}`; a
   placeholder may also name a lookup's new field); a missing placeholder value gives null;
3. `rename`: fields take their wire names;
4. `drop`: the named fields are returned in `local_only`: the agent keeps them in its local
   record and never puts them in a batch.

The agent stores the transformed record (so its replica and HQ's hold the same fields, and changes
HQ sends down merge by the same names) plus the device-only fields. `original` inverts the shape
for a partial write: a PATCH names fields by their declared names, and the derived fields are
computed again from the whole record.

Pure and total: bad input never raises; problems come back as `Violation(stage="transform")`
naming the field, the lookup and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.collections import Collection, PathStep, ReferenceTable, Transform
from protocol.validation import TRANSFORM, Violation

__all__ = ["original", "transform"]


def transform(
    collection: Collection,
    record: dict[str, Any],
    references: Mapping[str, ReferenceTable],
) -> tuple[dict[str, Any], frozenset[str], list[Violation]]:
    """The record as stored and sent, the fields that must stay on the device, and what went
    wrong (empty: the record is ready). Without a transform the record comes back as it is."""
    shape = collection.transform
    if shape is None:
        return record, frozenset(), []
    out = dict(record)
    problems: list[Violation] = []
    for lookup in shape.lookups:
        value = _at(record, lookup.path)
        if value is None:
            out[lookup.name] = None
            continue
        table = references.get(lookup.table)
        values = table.values if table is not None else None
        code = _code(value)
        if values is not None and code is not None and code in values:
            out[lookup.name] = values[code]
        elif lookup.has_default:
            out[lookup.name] = lookup.default
        else:
            where = "is not loaded" if values is None else "has no such code"
            problems.append(
                Violation(
                    lookup.field,
                    lookup.name,
                    f"{lookup.field} {_short(value)} cannot be looked up: the table "
                    f"{lookup.table} {where} (it fills {lookup.name})",
                    TRANSFORM,
                )
            )
    for derived in shape.derive:
        text: list[str] = []
        for part in derived.parts:
            if isinstance(part, str):
                text.append(part)
                continue
            value = out.get(part[0]) if len(part) == 1 else _dotted(record, part)
            if value is None:
                text = []
                break
            text.append(_text(value))
        else:
            out[derived.name] = "".join(text)
            continue
        out[derived.name] = None
    for name, wire in shape.rename.items():
        if name in out:
            out[wire] = out.pop(name)
    return out, shape.drop, problems


def original(collection: Collection, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (transformed) record back in its declared shape: renamed fields under their own
    names; the fields the transform and the forwarding mode add are left out."""
    shape: Transform | None = collection.transform
    out = dict(stored)
    if collection.forward == "exceptions":
        out.pop(collection.flags_field, None)
    if shape is None:
        return out
    for name in shape.added:
        out.pop(name, None)
    for name, wire in shape.rename.items():
        if wire in out:
            out[name] = out.pop(wire)
    return out


def _at(record: dict[str, Any], path: tuple[PathStep, ...]) -> Any:
    value: Any = record
    for name, _ in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _dotted(record: dict[str, Any], names: tuple[str, ...]) -> Any:
    return _at(record, tuple((name, False) for name in names))


def _code(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int):
        return str(value)
    return None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"
