"""Reference tables sent from HQ: newer admin codes, site lists or lookup tables reach every agent
as ordinary records, so they travel with the same durability, signatures and ordering as data.

HQ writes a table as one record of the reserved collection `_references`, keyed by the table's
name (`fieldsync-hq references push`). Agents receive it in their feed like any change; their edge
checks then use it instead of the copy in the collections file, for tables that file defines (a
record for an unknown name is kept but not used). Offline agents keep checking against the newest
table they hold.

Record fields: `name`, `codes` (list), `values` (code -> value, or null for a plain code list),
`source` (where HQ read it) and `pushed_by`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from protocol.collections import ReferenceTable, read_lookup_file, read_reference_file

# Collections whose names start with "_" (RESERVED_PREFIX) are HQ's: nodes may not write them (HQ
# refuses such changes at ingest, agents refuse such collections in their config).
from protocol.limits import RESERVED_PREFIX

__all__ = [
    "REFERENCES_COLLECTION",
    "RESERVED_PREFIX",
    "newer_tables",
    "read_table",
    "table_from_record",
    "table_record",
]

REFERENCES_COLLECTION = RESERVED_PREFIX + "references"


def read_table(
    name: str, path: Path, *, column: str | None = None, value_column: str | None = None
) -> ReferenceTable:
    """A table from a CSV or JSON file (codes in `column`; with `value_column`, a lookup table).
    OSError if unreadable, ValueError (naming the row) if malformed."""
    if value_column is not None:
        values = read_lookup_file(path, column, value_column)
        return ReferenceTable(name, frozenset(values), str(path.name), values)
    return ReferenceTable(name, read_reference_file(path, column), str(path.name))


def table_record(table: ReferenceTable, *, pushed_by: str) -> dict[str, Any]:
    """The `_references` record fields for `table`."""
    return {
        "name": table.name,
        "codes": sorted(table.codes, key=lambda c: (isinstance(c, str), c)),
        "values": dict(table.values) if table.values is not None else None,
        "source": table.source,
        "pushed_by": pushed_by,
    }


def newer_tables(
    declared: Mapping[str, ReferenceTable], records: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, ReferenceTable], list[str]]:
    """The tables of `_references` records that replace declared ones (same name, same kind:
    code list or lookup table), and why the others were not used. Agents and HQ both judge
    records against `declared` overridden by these."""
    used: dict[str, ReferenceTable] = {}
    skipped: list[str] = []
    for record in records:
        try:
            table = table_from_record(record)
        except ValueError as e:
            skipped.append(str(e))
            continue
        known = declared.get(table.name)
        if known is None:
            skipped.append(f"reference table {table.name}: no collection uses it")
        elif (known.values is None) != (table.values is None):
            kind = "a lookup table" if known.values is not None else "a code list"
            skipped.append(f"reference table {table.name}: the collections file has {kind}")
        else:
            used[table.name] = table
    return used, skipped


def table_from_record(record: Mapping[str, Any]) -> ReferenceTable:
    """The table a `_references` record holds; ValueError if it is not one."""
    name, codes, values = record.get("name"), record.get("codes"), record.get("values")
    if not isinstance(name, str) or not name:
        raise ValueError("reference record: 'name' must be a non-empty string")
    if not isinstance(codes, list) or not all(type(c) in (str, int) for c in codes):
        raise ValueError(f"reference table {name}: 'codes' must be a list of strings or integers")
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"reference table {name}: 'values' must be a map or null")
    source = str(record.get("source") or "hq")
    return ReferenceTable(name, frozenset(codes), f"hq:{source}", values)
