"""Collections in config: what a record of each collection holds, how concurrent edits of each field
are settled, and which business rules it must satisfy. Loaded by the agent and by HQ alike.

A collections file holds `[collections.NAME]` tables and named `[references.NAME]` code tables::

    [collections.beneficiaries]
    key = "beneficiary_id"              # a declared string or integer field, always required
    mode = "mutable"                    # or "append_only": records never change, never conflict
    allow_unknown_fields = false        # the default: a field not declared below is refused

    [collections.beneficiaries.fields]  # one entry per field, usually an inline table
    beneficiary_id = { type = "string", pattern = "BEN-[0-9]+-[0-9]+" }
    given_name = { type = "string", required = true, max_length = 100 }      # policy "lww"
    household_size = { type = "integer", min = 1, max = 30, policy = "review" }
    registration_status = { type = "enum", values = ["registered", "verified"],
                            policy = "source_of_truth", owner = "hq:case-management" }  # one line
    gps = { type = "object", fields = { lat = { type = "decimal", min = -90, max = 90 } } }
    vulnerability_flags = { type = "list", items = { type = "enum", values = ["disability"] } }

    [collections.beneficiaries.rules]   # business rules, by name (the name is what errors show)
    born_before_registration = { check = "compare", field = "birth_date", op = "<=",
                                 other = "registration_date" }                # (one line in TOML)
    size_matches_members = { check = "count_equals_length", field = "household_size",
                             list = "members", message = "household size must equal members" }

    [references.admin1]
    codes = ["KE01", "KE02"]            # inline, or:
    [references.admin3]
    file = "admin_codes.csv"            # CSV (with a header row) or JSON, relative to this file
    column = "admin3"                   # CSV/JSON-objects column; default: the first CSV column

Field settings (`FieldSection`): `type` (string, integer, decimal, boolean, date, datetime, enum,
list, object), `required`, `description`, and by type: string `min_length`, `max_length`, `pattern`
(a Python regex the *whole* value must match); integer `min`, `max`; decimal `min`, `max`, `scale`
(most digits after the point; accepts integers, floats and decimal strings like "12.50"); date and
datetime `min`, `max` (TOML dates / offset date-times; values are ISO `yyyy-mm-dd` and ISO 8601 with
a timezone); enum `values`; list `items` (a type name or a field table) with `min_length`,
`max_length`; object `fields`, `allow_unknown_fields`. Objects and lists nest up to MAX_NESTING deep.
A field that is absent or null counts as missing.

Conflict settings, top-level fields only: `policy` = "lww" (default: the later write wins, the
loser is logged), "source_of_truth" (`owner` required: "group:NAME" for a node group or "hq:NAME" for
an HQ system; others' writes are refused) or "review" (a person decides; an optional `owner` names
who reviews, e.g. a node group offline). `append_only` collections take "lww" only: they never
conflict.

Rules (`RuleSection`), checked after the schema, skipped when a field they read is missing or failed
the schema (so `required` alone reports absence). A `field` is a path: `gps.lat` into an object,
`members[].birth_date` for every item of a list (`[]` in `field` only: `other`, `list` and `when`
name one value). Every rule takes an optional `message`, shown after the path and the value in
place of the default text. (TOML inline tables are one line each; the wrapped ones above are not.)

    check = "not_in_future"        field (date or datetime), tolerance_days = 0
    check = "count_equals_length"  field (integer), list (a list field)
    check = "in_reference"         field (string, integer, enum, or a list of them), table
    check = "compare"              field, op (< <= > >= == !=), and other (a field) or value
    check = "required_if"          field is required when `when` has a value (or equals `equals`)

Every mistake fails the load with a ConfigError naming the file, the dotted key (e.g.
`collections.beneficiaries.fields.household_size.min`), the reason and, from `load_collections`,
the line (`CollectionsConfigError.line`).
"""

# setting() returns a dataclasses.field, which ruff's RUF009 cannot see (as in */config.py).
# ruff: noqa: RUF009

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protocol.config import ConfigError, at_least, between, build, setting
from protocol.templates import TemplatePart, parse_template

FIELD_TYPES = (
    "string",
    "integer",
    "decimal",
    "boolean",
    "date",
    "datetime",
    "enum",
    "list",
    "object",
)
POLICIES = ("lww", "source_of_truth", "review")
MODES = ("mutable", "append_only")
CHECKS = ("not_in_future", "count_equals_length", "in_reference", "compare", "required_if")
FORWARD_MODES = ("full", "summary", "exceptions")
WINDOWS = ("hour", "day", "week", "month")
AGGREGATE_OPS = ("count", "sum", "min", "max")
#: Fields every summary record holds besides its group values and aggregates.
SUMMARY_FIELDS = ("node", "window_start", "window_end")
OPERATORS = ("<", "<=", ">", ">=", "==", "!=")
#: Same shape as the agent's field names: letters, digits and _, starting with a letter.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
OWNER = re.compile(r"(group|hq):[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Deepest nesting of objects and lists in a field declaration.
MAX_NESTING = 4
MAX_TOLERANCE_DAYS = 3650

FieldType = Literal[
    "string", "integer", "decimal", "boolean", "date", "datetime", "enum", "list", "object"
]
Policy = Literal["lww", "source_of_truth", "review"]
Mode = Literal["mutable", "append_only"]
Check = Literal["not_in_future", "count_equals_length", "in_reference", "compare", "required_if"]
Forward = Literal["full", "summary", "exceptions"]
Window = Literal["hour", "day", "week", "month"]
AggregateOp = Literal["count", "sum", "min", "max"]
Scalar = str | int | float | bool | dt.date | dt.datetime


class CollectionsConfigError(ConfigError):
    """A ConfigError that also knows the line of the collections file where the key is (or None)."""

    def __init__(self, path: Path | str, key: str, reason: str, line: int | None = None) -> None:
        super().__init__(path, key, reason)
        self.line = line
        if line is not None:
            where = f"{self.path}:{line}: {key}: " if key else f"{self.path}:{line}: "
            self.args = (where + reason,)


# ------------------------------------------------------------------------------------------------
# What the TOML tables may hold (checked by protocol.config.build: unknown keys, types, ranges).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectionSection:
    key: str = field(metadata={"doc": "Field holding the record key (declared in fields)."})
    mode: Mode = setting("mutable", "mutable, or append_only (records never change or conflict).")
    description: str = setting("", "What the collection holds (for people).")
    allow_unknown_fields: bool = setting(False, "Accept fields that are not declared.")
    fields: dict[str, Any] = setting({}, "The fields, by name: [collections.NAME.fields].")
    rules: dict[str, Any] = setting({}, "Business rules, by name: [collections.NAME.rules].")
    transform: dict[str, Any] = setting({}, "Edge transform: [collections.NAME.transform].")
    forward: Forward = setting("full", "What goes to HQ: full, summary or exceptions.")
    summary: dict[str, Any] = setting({}, "forward = summary: [collections.NAME.summary].")
    flags: dict[str, Any] = setting({}, "forward = exceptions: flag rules, by name.")
    flags_field: str = setting("flags", "forward = exceptions: field naming the flags that fired.")


@dataclass(frozen=True)
class FieldSection:
    type: FieldType = field(metadata={"doc": "One of " + ", ".join(FIELD_TYPES) + "."})
    required: bool = setting(False, "The record must hold a non-null value.")
    description: str = setting("", "What the field holds (for people).")
    policy: Policy = setting("lww", "Concurrent edits: lww, source_of_truth or review.")
    owner: str = setting("", "group:NAME or hq:NAME: who owns (source_of_truth) or reviews.")
    values: list[str | int] = setting([], "enum: the allowed values.")
    min: int | float | dt.date | None = setting(None, "integer, decimal, date, datetime: lowest.")
    max: int | float | dt.date | None = setting(None, "integer, decimal, date, datetime: highest.")
    min_length: int | None = setting(None, "string, list: fewest characters or items.", at_least(0))
    max_length: int | None = setting(None, "string, list: most characters or items.", at_least(0))
    pattern: str = setting("", "string: a regular expression the whole value must match.")
    scale: int | None = setting(None, "decimal: most digits after the point.", between(0, 30))
    items: str | dict[str, Any] | None = setting(None, "list: the item type or field table.")
    fields: dict[str, Any] | None = setting(None, "object: its fields, by name.")
    allow_unknown_fields: bool = setting(False, "object: accept fields that are not declared.")


@dataclass(frozen=True)
class RuleSection:
    check: Check = field(metadata={"doc": "One of " + ", ".join(CHECKS) + "."})
    field: str = dataclasses.field(metadata={"doc": "The field checked (a path)."})
    message: str = setting("", "Shown instead of the default text (after the field's path).")
    tolerance_days: int = setting(
        0, "not_in_future: days a value may lie ahead.", between(0, MAX_TOLERANCE_DAYS)
    )
    list: str = setting("", "count_equals_length: the list whose length `field` must equal.")
    table: str = setting("", "in_reference: the reference table holding the valid codes.")
    op: str = setting("", "compare: one of < <= > >= == !=.")
    other: str = setting("", "compare: the field compared with (or give `value`).")
    value: Scalar | None = setting(None, "compare: the value compared with (or give `other`).")
    when: str = setting("", "required_if: `field` is required when this field has a value.")
    equals: Scalar | None = setting(None, "required_if: ... and only when it equals this.")


@dataclass(frozen=True)
class ReferenceSection:
    codes: list[str | int] | None = setting(None, "The codes, inline (or give `file`).")
    values: dict[str, Any] | None = setting(None, "Code -> value, inline: a lookup table.")
    file: str = setting("", "CSV or JSON file of codes, relative to the collections file.")
    column: str = setting("", "The column (CSV) or key (JSON objects) holding the codes.")
    value_column: str = setting("", "file: the column (or key) holding each code's value.")
    description: str = setting("", "What the table holds (for people).")


@dataclass(frozen=True)
class TransformSection:
    rename: dict[str, Any] = setting({}, "Field -> the name it has on the wire.")
    drop: list[str] = setting([], "Fields kept in the local record, never sent (device-only).")
    derive: dict[str, Any] = setting({}, "New field -> template over the record's fields.")
    lookup: dict[str, Any] = setting({}, "New field -> { field, table, default }.")


@dataclass(frozen=True)
class LookupSection:
    field: str = dataclasses.field(metadata={"doc": "The field whose value is looked up."})
    table: str = dataclasses.field(metadata={"doc": "A reference table with values."})
    default: str | int | float | bool | None = setting(None, "Used for a value not in the table.")


@dataclass(frozen=True)
class SummarySection:
    collection: str = dataclasses.field(metadata={"doc": "The derived collection forwarded."})
    time_field: str = dataclasses.field(metadata={"doc": "A required date or datetime field."})
    window: Window = setting("day", "hour, day, week (from Monday) or month, in UTC.")
    group_by: list[str] = setting([], "Field paths grouped by (items[].unit: per list item).")
    aggregates: dict[str, Any] = setting({}, "Output field -> { op, field }.")


@dataclass(frozen=True)
class AggregateSection:
    op: AggregateOp = dataclasses.field(metadata={"doc": "count, sum, min or max."})
    field: str = setting("", "sum, min, max: the field path aggregated.")


_COMMON_FIELD_KEYS = frozenset({"type", "required", "description", "policy", "owner"})
_FIELD_KEYS: dict[str, frozenset[str]] = {
    "string": frozenset({"min_length", "max_length", "pattern"}),
    "integer": frozenset({"min", "max"}),
    "decimal": frozenset({"min", "max", "scale"}),
    "boolean": frozenset(),
    "date": frozenset({"min", "max"}),
    "datetime": frozenset({"min", "max"}),
    "enum": frozenset({"values"}),
    "list": frozenset({"items", "min_length", "max_length"}),
    "object": frozenset({"fields", "allow_unknown_fields"}),
}
_RULE_KEYS: dict[str, frozenset[str]] = {
    "not_in_future": frozenset({"tolerance_days"}),
    "count_equals_length": frozenset({"list"}),
    "in_reference": frozenset({"table"}),
    "compare": frozenset({"op", "other", "value"}),
    "required_if": frozenset({"when", "equals"}),
}
_NUMERIC = frozenset({"integer", "decimal"})
_CODE_TYPES = frozenset({"string", "integer", "enum"})


# ------------------------------------------------------------------------------------------------
# The compiled model (what validation and merge read).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One declared field, compiled: regex compiled, enum values in a set, nested specs built."""

    name: str
    type: str
    required: bool = False
    description: str = ""
    policy: str = "lww"
    owner: str | None = None
    values: frozenset[str | int] = frozenset()
    minimum: Any = None
    maximum: Any = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: re.Pattern[str] | None = None
    scale: int | None = None
    items: Field | None = None
    fields: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    allow_unknown_fields: bool = False


#: One step of a rule's field path: the field's name and whether the rule looks into every item.
PathStep = tuple[str, bool]


@dataclass(frozen=True, slots=True)
class Rule:
    """One business rule, compiled: its paths resolved against the fields, its value typed."""

    name: str
    check: str
    field: str  # the path as written, e.g. "members[].birth_date"
    path: tuple[PathStep, ...]
    target: Field  # the spec of what `path` reaches (an item spec after "[]")
    message: str = ""
    tolerance_days: int = 0
    op: str = ""
    other: str = ""  # compare: other; count_equals_length: list; required_if: when
    other_path: tuple[PathStep, ...] = ()
    other_target: Field | None = None
    value: Any = None  # compare: value; required_if: equals (typed like the field)
    has_value: bool = False
    table: str = ""

    def fields_read(self) -> tuple[str, ...]:
        """Top-level fields this rule reads (for callers that validate partial writes)."""
        names = [self.path[0][0]]
        if self.other_path:
            names.append(self.other_path[0][0])
        return tuple(names)


@dataclass(frozen=True, slots=True)
class ReferenceTable:
    """A named set of valid codes (admin codes, sites...). HQ may send a newer one by name.

    With `values` it is also a lookup table (code -> value, codes as text), which transforms
    use to map a field's code to, e.g., a name or an HQ system's own code."""

    name: str
    codes: frozenset[str | int]
    source: str = "inline"
    values: Mapping[str, Any] | None = None

    def __contains__(self, code: object) -> bool:
        return code in self.codes

    def __len__(self) -> int:
        return len(self.codes)


@dataclass(frozen=True, slots=True)
class Lookup:
    """A transform output: the value `table` maps the field at `path` to."""

    name: str
    field: str
    path: tuple[PathStep, ...]
    table: str
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True, slots=True)
class Derived:
    """A transform output: text rendered from a template over the record's fields."""

    name: str
    template: str
    parts: tuple[TemplatePart, ...]


@dataclass(frozen=True, slots=True)
class Transform:
    """What a collection's records look like once shaped at the edge (protocol.transforms applies
    it): `lookups` and `derive` add fields, `rename` gives fields their wire names, `drop` keeps
    fields on the device. Every name here is a declared top-level field, or an added one."""

    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    derive: tuple[Derived, ...] = ()
    lookups: tuple[Lookup, ...] = ()

    @property
    def added(self) -> tuple[str, ...]:
        """Fields the transform adds to a record (they are not in the collection's schema)."""
        return tuple(x.name for x in self.lookups) + tuple(d.name for d in self.derive)


@dataclass(frozen=True, slots=True)
class GroupBy:
    """One grouping value of a summary: its output name and where it is read."""

    name: str
    field: str
    path: tuple[PathStep, ...]


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate of a summary: count (rows), or sum/min/max of the field at `path`."""

    name: str
    op: str
    field: str = ""
    path: tuple[PathStep, ...] = ()
    type: str = ""  # the aggregated field's type: integer, decimal, date or datetime


@dataclass(frozen=True, slots=True)
class Summary:
    """forward = "summary": records are aggregated per group and time window into records of the
    derived `collection`, which are forwarded instead of them (protocol.summary computes them).

    `each` is the top-level list whose items are the summary's rows when group_by or an
    aggregate reads a list path (`items[].unit`); without one, every record is one row."""

    collection: str
    time_field: str
    time_type: str  # date or datetime
    window: str
    group_by: tuple[GroupBy, ...]
    aggregates: tuple[Aggregate, ...]
    each: str | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        """Every field of a summary record, in order."""
        return (
            *(g.name for g in self.group_by),
            *SUMMARY_FIELDS,
            *(a.name for a in self.aggregates),
        )


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    key: str
    mode: str
    fields: Mapping[str, Field]
    rules: tuple[Rule, ...] = ()
    allow_unknown_fields: bool = False
    description: str = ""
    transform: Transform | None = None
    forward: str = "full"
    summary: Summary | None = None
    flags: tuple[Rule, ...] = ()
    flags_field: str = "flags"

    @property
    def append_only(self) -> bool:
        return self.mode == "append_only"

    def declared_name(self, name: str) -> str:
        """The name a field is declared under, given its own name or its wire name (rename)."""
        if name not in self.fields and self.transform is not None:
            for local, wire in self.transform.rename.items():
                if wire == name:
                    return local
        return name

    def _spec(self, name: str) -> Field | None:
        """The declaration of a top-level field, by its own name or its wire name."""
        return self.fields.get(self.declared_name(name))

    def policy(self, name: str) -> str:
        """The conflict policy of a top-level field ("lww" for undeclared fields). A renamed
        field keeps its policy under its wire name."""
        spec = self._spec(name)
        return spec.policy if spec is not None else "lww"

    def owner(self, name: str) -> str | None:
        """Who owns (source_of_truth) or reviews (review) a field, if anyone."""
        spec = self._spec(name)
        return spec.owner if spec is not None else None

    def reference_tables(self) -> frozenset[str]:
        """Names of the reference tables this collection's rules read."""
        return frozenset(r.table for r in self.rules if r.table)


@dataclass(frozen=True, slots=True)
class CollectionsConfig:
    source: str
    collections: Mapping[str, Collection]
    references: Mapping[str, ReferenceTable]

    def __getitem__(self, name: str) -> Collection:
        return self.collections[name]

    def __contains__(self, name: object) -> bool:
        return name in self.collections


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def load_collections(path: Path | str) -> CollectionsConfig:
    """Read and check a collections file; every mistake is a CollectionsConfigError naming the
    file, the dotted key, the reason and (when it can be found) the line."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as e:
        raise CollectionsConfigError(path, "", "file not found") from e
    except OSError as e:
        raise CollectionsConfigError(path, "", f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CollectionsConfigError(path, "", f"not UTF-8 text (byte {e.start})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"at line (\d+)", str(e))
        line = int(found.group(1)) if found else None
        raise CollectionsConfigError(path, "", f"not valid TOML: {e}", line) from e
    try:
        return collections_from_dict(data, str(path))
    except CollectionsConfigError:
        raise
    except ConfigError as e:
        line = line_of_key(text, e.key) if e.path == str(path) else None
        raise CollectionsConfigError(e.path, e.key, e.reason, line) from e


def collections_from_dict(
    data: Mapping[str, Any], source: str = "<memory>", base_dir: Path | str | None = None
) -> CollectionsConfig:
    """Check and compile parsed TOML. Reference files are read relative to `base_dir` (default:
    the folder of `source`). Raises ConfigError(source, dotted key, reason)."""
    unknown = sorted(set(data) - {"collections", "references"})
    if unknown:
        raise ConfigError(source, unknown[0], "unknown table (known: collections, references)")
    raw_refs = data.get("references", {})
    raw_collections = data.get("collections", {})
    for name, raw in (("references", raw_refs), ("collections", raw_collections)):
        if not isinstance(raw, dict):
            raise ConfigError(source, name, "must be a table")
    if not raw_collections:
        raise ConfigError(source, "collections", "declares no collection")
    base = Path(base_dir) if base_dir is not None else Path(source).parent
    references = {
        name: _reference(name, raw, source, base, f"references.{name}")
        for name, raw in raw_refs.items()
    }
    collections = {
        name: _collection(name, raw, source, references, f"collections.{name}")
        for name, raw in raw_collections.items()
    }
    derived: dict[str, str] = {}
    for name, collection in collections.items():
        if collection.summary is None:
            continue
        target = collection.summary.collection
        at = f"collections.{name}.summary.collection"
        if target in collections:
            raise ConfigError(source, at, f"{target!r} is a declared collection: name a new one")
        if target in derived:
            raise ConfigError(source, at, f"{target!r} already summarises {derived[target]}")
        derived[target] = name
    return CollectionsConfig(source, collections, references)


def _table(raw: Any, source: str, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"must be a table, got {raw!r}")
    return raw


def _check_name(name: str, source: str, key: str, what: str) -> None:
    if NAME.fullmatch(name) is None:
        raise ConfigError(
            source,
            key,
            f"{what} names start with a letter and hold letters, digits and _ (64 at most)",
        )


def _collection(
    name: str, raw: Any, source: str, references: Mapping[str, ReferenceTable], key: str
) -> Collection:
    _check_name(name, source, key, "collection")
    section = build(CollectionSection, _table(raw, source, key), source, key + ".")
    if not section.fields:
        raise ConfigError(source, key + ".fields", "declares no field")
    fields = {
        fname: _field(fname, spec, source, f"{key}.fields.{fname}", depth=1)
        for fname, spec in section.fields.items()
    }
    key_spec = fields.get(section.key)
    if key_spec is None:
        raise ConfigError(
            source, key + ".key", f"names {section.key!r}, which is not in {key}.fields"
        )
    if key_spec.type not in ("string", "integer"):
        raise ConfigError(
            source, f"{key}.fields.{section.key}.type", "the key field must be a string or integer"
        )
    fields[section.key] = dataclasses.replace(key_spec, required=True)
    if section.mode == "append_only":
        for fname, spec in fields.items():
            if spec.policy != "lww":
                raise ConfigError(
                    source,
                    f"{key}.fields.{fname}.policy",
                    f"append_only collections never conflict: {spec.policy!r} cannot apply "
                    "(remove the policy, or make the collection mutable)",
                )
    rules = tuple(
        _rule(rname, spec, source, fields, references, f"{key}.rules.{rname}")
        for rname, spec in section.rules.items()
    )
    transform = None
    if section.transform:
        if section.forward == "summary":
            raise ConfigError(
                source,
                key + ".transform",
                "summary mode keeps the records on the device: there is nothing to transform",
            )
        transform = _transform(section.transform, source, section.key, fields, references, key)
    summary = None
    if section.forward == "summary":
        if section.mode != "append_only":
            raise ConfigError(
                source,
                key + ".forward",
                "summary mode needs an append_only collection (its records never change, so "
                "every record adds to the totals exactly once)",
            )
        if not section.summary:
            raise ConfigError(source, key + ".summary", "is required for forward = summary")
        summary = _summary(section.summary, source, fields, key + ".summary")
    elif section.summary:
        raise ConfigError(source, key + ".summary", 'applies to forward = "summary" only')
    flags: tuple[Rule, ...] = ()
    raw_table = _table(raw, source, key)
    if section.forward == "exceptions":
        if not section.flags:
            raise ConfigError(
                source, key + ".flags", "is required for forward = exceptions: the flag rules"
            )
        flags = tuple(
            _rule(fname, spec, source, fields, references, f"{key}.flags.{fname}")
            for fname, spec in section.flags.items()
        )
        _check_name(section.flags_field, source, key + ".flags_field", "field")
        taken = set(fields) | set(transform.added if transform else ())
        taken |= set(transform.rename.values()) if transform else set()
        if section.flags_field in taken:
            raise ConfigError(
                source,
                key + ".flags_field",
                f"{section.flags_field!r} is already a field of the record: choose another name",
            )
    else:
        for setting_name in ("flags", "flags_field"):
            if setting_name in raw_table:
                raise ConfigError(
                    source, f"{key}.{setting_name}", 'applies to forward = "exceptions" only'
                )
    return Collection(
        name=name,
        key=section.key,
        mode=section.mode,
        fields=fields,
        rules=rules,
        allow_unknown_fields=section.allow_unknown_fields,
        description=section.description,
        transform=transform,
        forward=section.forward,
        summary=summary,
        flags=flags,
        flags_field=section.flags_field,
    )


def _transform(
    raw: dict[str, Any],
    source: str,
    key_field: str,
    fields: Mapping[str, Field],
    references: Mapping[str, ReferenceTable],
    collection_key: str,
) -> Transform:
    key = collection_key + ".transform"
    t = build(TransformSection, raw, source, key + ".")
    added: set[str] = set()

    def new_name(name: str, at: str) -> None:
        _check_name(name, source, at, "field")
        if name in fields:
            raise ConfigError(source, at, f"{name!r} is a declared field: choose a new name")
        if name in added:
            raise ConfigError(source, at, f"{name!r} is added twice")
        added.add(name)

    def own_field(name: Any, at: str, what: str) -> str:
        if not isinstance(name, str) or name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(source, at, f"{what} must be a declared field (known: {known})")
        if name == key_field:
            raise ConfigError(source, at, f"the key field {key_field!r} cannot be {what}d")
        return name

    lookups: list[Lookup] = []
    for name, spec in t.lookup.items():
        at = f"{key}.lookup.{name}"
        new_name(name, at)
        lk = build(LookupSection, _table(spec, source, at), source, at + ".")
        path, target = _resolve(lk.field, fields, source, at + ".field")
        _single(path, source, at + ".field")
        if target.type not in _CODE_TYPES:
            raise ConfigError(
                source, at + ".field", f"looks up codes: {lk.field} is a {target.type}"
            )
        table = references.get(lk.table)
        if table is None or table.values is None:
            known = ", ".join(sorted(n for n, r in references.items() if r.values)) or "none"
            what = "no reference table" if table is None else "no values in reference table"
            raise ConfigError(
                source, at + ".table", f"{what} {lk.table!r} (tables with values: {known})"
            )
        has_default = "default" in spec
        lookups.append(Lookup(name, lk.field, path, lk.table, lk.default, has_default))
    lookup_names = {x.name for x in lookups}

    derive: list[Derived] = []
    for name, text in t.derive.items():
        at = f"{key}.derive.{name}"
        new_name(name, at)
        if not isinstance(text, str):
            raise ConfigError(source, at, f"must be a template string, got {text!r}")
        try:
            parts = parse_template(text)
        except ValueError as e:
            raise ConfigError(source, at, f"bad template {text!r}: {e}") from e
        placeholders = [p for p in parts if isinstance(p, tuple)]
        if not placeholders:
            raise ConfigError(source, at, "has no {placeholder}: it would be a constant")
        for part in placeholders:
            dotted = ".".join(part)
            if dotted in lookup_names:
                continue
            _, target = _resolve(dotted, fields, source, at)
            if target.type in ("list", "object"):
                raise ConfigError(
                    source, at, f"{{{dotted}}} is a {target.type}: a template takes one value"
                )
        derive.append(Derived(name, text, parts))

    rename: dict[str, str] = {}
    for name, wire in t.rename.items():
        at = f"{key}.rename.{name}"
        own_field(name, at, "rename")
        if not isinstance(wire, str):
            raise ConfigError(source, at, f"must be the field's wire name, got {wire!r}")
        new_name(wire, at)
        rename[name] = wire

    drop: set[str] = set()
    for i, name in enumerate(t.drop):
        at = f"{key}.drop"
        own_field(name, at, "drop")
        if name in rename:
            raise ConfigError(source, at, f"{name!r} is dropped: it cannot be renamed too")
        if name in drop:
            raise ConfigError(source, at, f"item {i}: {name!r} is listed twice")
        drop.add(name)
    return Transform(rename, frozenset(drop), tuple(derive), tuple(lookups))


_GROUP_TYPES = frozenset({"string", "integer", "enum", "boolean", "date"})
_AGGREGATE_TYPES = {
    "sum": frozenset({"integer", "decimal"}),
    "min": frozenset({"integer", "decimal", "date", "datetime"}),
    "max": frozenset({"integer", "decimal", "date", "datetime"}),
}


def _summary(raw: dict[str, Any], source: str, fields: Mapping[str, Field], key: str) -> Summary:
    s = build(SummarySection, raw, source, key + ".")
    _check_name(s.collection, source, key + ".collection", "collection")
    path, spec = _resolve(s.time_field, fields, source, key + ".time_field")
    if len(path) != 1 or path[0][1]:
        raise ConfigError(source, key + ".time_field", "must name a field of the record itself")
    if spec.type not in ("date", "datetime"):
        raise ConfigError(
            source,
            key + ".time_field",
            f"must be a date or datetime, {s.time_field} is a {spec.type}",
        )
    if not spec.required:
        raise ConfigError(
            source,
            key + ".time_field",
            f"{s.time_field} must be required: every record must fall in a window",
        )
    if s.window == "hour" and spec.type == "date":
        raise ConfigError(source, key + ".window", f"{s.time_field} is a date: hours do not apply")
    each: list[str] = []  # the list whose items are rows (at most one)
    names: set[str] = set(SUMMARY_FIELDS)

    def rows_of(steps: tuple[PathStep, ...], at: str) -> None:
        lists = [i for i, (_, is_each) in enumerate(steps) if is_each]
        if not lists:
            return
        if lists != [0]:
            raise ConfigError(
                source, at, "only a list field of the record itself may be walked (items[].x)"
            )
        if each and each[0] != steps[0][0]:
            raise ConfigError(
                source, at, f"a summary walks one list: {each[0]}[] is walked already"
            )
        each[:] = [steps[0][0]]

    group_by: list[GroupBy] = []
    for i, text in enumerate(s.group_by):
        at = f"{key}.group_by"
        steps, target = _resolve(text, fields, source, at)
        if target.type not in _GROUP_TYPES:
            raise ConfigError(
                source, at, f"item {i}: cannot group by {text}, a {target.type} field"
            )
        rows_of(steps, at)
        name = steps[-1][0]
        if name in names:
            raise ConfigError(
                source, at, f"item {i}: {name!r} names another field of the summary records"
            )
        names.add(name)
        group_by.append(GroupBy(name, text, steps))
    if not s.aggregates:
        raise ConfigError(source, key + ".aggregates", "is required: what to count or add up")
    aggregates: list[Aggregate] = []
    for name, spec_raw in s.aggregates.items():
        at = f"{key}.aggregates.{name}"
        _check_name(name, source, at, "field")
        if name in names:
            raise ConfigError(source, at, f"{name!r} names another field of the summary records")
        names.add(name)
        a = build(AggregateSection, _table(spec_raw, source, at), source, at + ".")
        if a.op == "count":
            if a.field:
                raise ConfigError(source, at + ".field", "count counts rows: it reads no field")
            aggregates.append(Aggregate(name, "count"))
            continue
        if not a.field:
            raise ConfigError(source, at + ".field", f"is required: the field to {a.op}")
        steps, target = _resolve(a.field, fields, source, at + ".field")
        if target.type not in _AGGREGATE_TYPES[a.op]:
            kinds = ", ".join(sorted(_AGGREGATE_TYPES[a.op]))
            raise ConfigError(
                source, at + ".field", f"{a.op} takes {kinds} fields; {a.field} is a {target.type}"
            )
        rows_of(steps, at + ".field")
        aggregates.append(Aggregate(name, a.op, a.field, steps, target.type))
    return Summary(
        s.collection,
        s.time_field,
        spec.type,
        s.window,
        tuple(group_by),
        tuple(aggregates),
        each[0] if each else None,
    )


def _field(name: str, raw: Any, source: str, key: str, *, depth: int, top: bool = True) -> Field:
    """Compile one field declaration. `top`: a record's own field (which may carry a policy)."""
    if name or top:
        _check_name(name, source, key, "field")
    table = _table(raw, source, key)
    kind = table.get("type")
    if kind is None:
        raise ConfigError(
            source, key + ".type", "is required (one of " + ", ".join(FIELD_TYPES) + ")"
        )
    if kind not in FIELD_TYPES:
        raise ConfigError(
            source, key + ".type", f"must be one of {', '.join(FIELD_TYPES)}, got {kind!r}"
        )
    allowed = _COMMON_FIELD_KEYS | _FIELD_KEYS[kind]
    for setting_name in table:
        if setting_name in allowed:
            continue
        if setting_name in FieldSection.__dataclass_fields__:
            own = ", ".join(sorted(_FIELD_KEYS[kind])) or "none"
            lengths = setting_name in ("min", "max") and kind in ("string", "list")
            hint = " (use min_length/max_length)" if lengths else ""
            raise ConfigError(
                source,
                f"{key}.{setting_name}",
                f"does not apply to a {kind} field{hint} (its own settings: {own})",
            )
        known = ", ".join(sorted(allowed))
        raise ConfigError(source, f"{key}.{setting_name}", f"unknown setting (known: {known})")
    # min/max and rule literals are typed by the field they bound: checked by _bound, not build.
    s = build(FieldSection, _without(table, "min", "max"), source, key + ".")

    if not top:
        for name_set in ("policy", "owner"):
            if name_set in table:
                raise ConfigError(
                    source,
                    f"{key}.{name_set}",
                    "conflict settings apply to a record's own fields, not to nested ones",
                )
        if "required" in table and not name:
            raise ConfigError(source, key + ".required", "list items are never null: drop it")
    if s.owner and OWNER.fullmatch(s.owner) is None:
        raise ConfigError(source, key + ".owner", f"must be group:NAME or hq:NAME, got {s.owner!r}")
    if s.policy == "source_of_truth" and not s.owner:
        raise ConfigError(
            source,
            key + ".owner",
            'is required for policy source_of_truth (e.g. "hq:case-management" or "group:kakuma")',
        )
    if s.policy == "lww" and s.owner:
        raise ConfigError(
            source, key + ".owner", "lww fields have no owner (use source_of_truth or review)"
        )

    minimum = _bound(table.get("min"), kind, source, key + ".min")
    maximum = _bound(table.get("max"), kind, source, key + ".max")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ConfigError(source, key + ".max", f"is below min ({minimum!r})")
    if s.min_length is not None and s.max_length is not None and s.min_length > s.max_length:
        raise ConfigError(source, key + ".max_length", f"is below min_length ({s.min_length})")

    pattern = None
    if s.pattern:
        try:
            pattern = re.compile(s.pattern)
        except re.error as e:
            raise ConfigError(
                source, key + ".pattern", f"not a valid regular expression: {e}"
            ) from e

    values: frozenset[str | int] = frozenset()
    if kind == "enum":
        if not s.values:
            raise ConfigError(source, key + ".values", "an enum needs at least one value")
        if len(set(s.values)) != len(s.values):
            raise ConfigError(source, key + ".values", "holds a value twice")
        values = frozenset(s.values)

    items = None
    nested: dict[str, Field] = {}
    if kind in ("list", "object") and depth > MAX_NESTING:
        raise ConfigError(source, key, f"lists and objects nest at most {MAX_NESTING} deep")
    if kind == "list":
        if s.items is None:
            raise ConfigError(source, key + ".items", "is required: the type of the items")
        item_raw = {"type": s.items} if isinstance(s.items, str) else s.items
        items = _field("", item_raw, source, key + ".items", depth=depth + 1, top=False)
    if kind == "object":
        if not s.fields:
            raise ConfigError(source, key + ".fields", "is required: the object's fields")
        nested = {
            sub: _field(sub, spec, source, f"{key}.fields.{sub}", depth=depth + 1, top=False)
            for sub, spec in s.fields.items()
        }
    return Field(
        name=name,
        type=kind,
        required=s.required,
        description=s.description,
        policy=s.policy,
        owner=s.owner or None,
        values=values,
        minimum=minimum,
        maximum=maximum,
        min_length=s.min_length,
        max_length=s.max_length,
        pattern=pattern,
        scale=s.scale,
        items=items,
        fields=nested,
        allow_unknown_fields=s.allow_unknown_fields,
    )


def _without(table: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k not in names}


def _bound(value: Any, kind: str, source: str, key: str) -> Any:
    """A min/max of the right kind for the field type."""
    if value is None:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(source, key, f"must be an integer for an integer field, got {value!r}")
    if kind == "decimal" and not is_number:
        raise ConfigError(source, key, f"must be a number for a decimal field, got {value!r}")
    if kind == "decimal" and isinstance(value, float) and value != value:
        raise ConfigError(source, key, "must be a number, got nan")
    if kind == "date" and (not isinstance(value, dt.date) or isinstance(value, dt.datetime)):
        raise ConfigError(source, key, f"must be a TOML date (e.g. 1900-01-01), got {value!r}")
    if kind == "datetime" and (not isinstance(value, dt.datetime) or value.tzinfo is None):
        raise ConfigError(
            source,
            key,
            f"must be a TOML date-time with offset (e.g. 2020-01-01T00:00:00Z), got {value!r}",
        )
    return value


def parse_path(text: str) -> tuple[PathStep, ...] | None:
    """`gps.lat` -> (("gps", False), ("lat", False)); `members[].sex` -> (("members", True),
    ("sex", False)). None if the text is not a path."""
    steps: list[PathStep] = []
    for part in text.split("."):
        each = part.endswith("[]")
        name = part[:-2] if each else part
        if NAME.fullmatch(name) is None:
            return None
        steps.append((name, each))
    return tuple(steps)


def _resolve(
    text: str, fields: Mapping[str, Field], source: str, key: str
) -> tuple[tuple[PathStep, ...], Field]:
    """Resolve a rule's field path against the declared fields: the steps and the final spec."""
    path = parse_path(text) if isinstance(text, str) and text else None
    if path is None:
        raise ConfigError(
            source, key, f"must be a field path like name, gps.lat or members[].sex, got {text!r}"
        )
    current: Mapping[str, Field] = fields
    spec: Field | None = None
    walked = ""
    for i, (name, each) in enumerate(path):
        spec = current.get(name)
        if spec is None:
            where = f"in {walked}" if walked else "among the collection's fields"
            known = ", ".join(sorted(current)) or "none"
            raise ConfigError(source, key, f"no field {name!r} {where} (known: {known})")
        walked = f"{walked}.{name}" if walked else name
        if each:
            if spec.type != "list" or spec.items is None:
                raise ConfigError(source, key, f"{walked} is a {spec.type}, not a list: drop []")
            walked += "[]"
            spec = spec.items
        last = i == len(path) - 1
        if not last:
            if spec.type == "list":
                raise ConfigError(
                    source, key, f"{walked} is a list: write {walked}[] to look into its items"
                )
            if spec.type != "object":
                raise ConfigError(source, key, f"{walked} is a {spec.type}, it has no fields")
            current = spec.fields
    assert spec is not None
    return path, spec


def _rule(
    name: str,
    raw: Any,
    source: str,
    fields: Mapping[str, Field],
    references: Mapping[str, ReferenceTable],
    key: str,
) -> Rule:
    _check_name(name, source, key, "rule")
    table = _table(raw, source, key)
    check = table.get("check")
    if check not in CHECKS:
        choices = ", ".join(CHECKS)
        what = f"is required (one of {choices})" if check is None else f"must be one of {choices}"
        raise ConfigError(
            source, key + ".check", what + ("" if check is None else f", got {check!r}")
        )
    allowed = {"check", "field", "message"} | _RULE_KEYS[check]
    for setting_name in table:
        if setting_name not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(
                source,
                f"{key}.{setting_name}",
                f"not a setting of a {check} rule (known: {known})",
            )
    r = build(RuleSection, _without(table, "value", "equals"), source, key + ".")
    path, target = _resolve(r.field, fields, source, key + ".field")
    base = {"name": name, "check": check, "field": r.field, "path": path, "target": target}
    base["message"] = r.message

    if check == "not_in_future":
        if target.type not in ("date", "datetime"):
            raise ConfigError(
                source,
                key + ".field",
                f"not_in_future needs a date or datetime, {r.field} is a {target.type}",
            )
        return Rule(**base, tolerance_days=r.tolerance_days)

    if check == "count_equals_length":
        if target.type != "integer":
            raise ConfigError(
                source, key + ".field", f"must be an integer field, {r.field} is a {target.type}"
            )
        if not r.list:
            raise ConfigError(source, key + ".list", "is required: the list to count")
        other_path, other = _resolve(r.list, fields, source, key + ".list")
        if other.type != "list" or other_path[-1][1]:
            raise ConfigError(source, key + ".list", f"must name a list field, got {r.list!r}")
        _single(path, source, key + ".field")
        _single(other_path, source, key + ".list")
        return Rule(**base, other=r.list, other_path=other_path, other_target=other)

    if check == "in_reference":
        codes = target.items if target.type == "list" and target.items else target
        if codes.type not in _CODE_TYPES:
            raise ConfigError(
                source,
                key + ".field",
                f"in_reference needs a string, integer or enum field (or a list of them), "
                f"{r.field} is a {target.type}",
            )
        if not r.table:
            raise ConfigError(source, key + ".table", "is required: the reference table")
        if r.table not in references:
            known = ", ".join(sorted(references)) or "none declared"
            raise ConfigError(
                source, key + ".table", f"no reference table {r.table!r} (known: {known})"
            )
        return Rule(**base, table=r.table)

    if check == "compare":
        if r.op not in OPERATORS:
            raise ConfigError(
                source, key + ".op", f"must be one of {' '.join(OPERATORS)}, got {r.op!r}"
            )
        if bool(r.other) == ("value" in table):
            raise ConfigError(source, key, "give exactly one of other (a field) or value")
        ordered = r.op not in ("==", "!=")
        if ordered and target.type not in (*_NUMERIC, "date", "datetime"):
            raise ConfigError(
                source,
                key + ".op",
                f"{r.op} compares numbers, dates and datetimes; {r.field} is a {target.type}",
            )
        if target.type in ("list", "object"):
            raise ConfigError(
                source, key + ".field", f"{r.field} is a {target.type}: not comparable"
            )
        if r.other:
            other_path, other = _resolve(r.other, fields, source, key + ".other")
            _single(other_path, source, key + ".other")
            same = target.type == other.type or {target.type, other.type} <= _NUMERIC
            if not same:
                raise ConfigError(
                    source,
                    key + ".other",
                    f"cannot compare {r.field} ({target.type}) with {r.other} ({other.type})",
                )
            return Rule(**base, op=r.op, other=r.other, other_path=other_path, other_target=other)
        value = _typed_literal(table["value"], target, source, key + ".value")
        return Rule(**base, op=r.op, value=value, has_value=True)

    # required_if
    _single(path, source, key + ".field")
    if not r.when:
        raise ConfigError(source, key + ".when", "is required: the field whose value requires it")
    other_path, other = _resolve(r.when, fields, source, key + ".when")
    _single(other_path, source, key + ".when")
    equals = None
    if "equals" in table:
        equals = _typed_literal(table["equals"], other, source, key + ".equals")
    return Rule(
        **base,
        other=r.when,
        other_path=other_path,
        other_target=other,
        value=equals,
        has_value="equals" in table,
    )


def _single(path: tuple[PathStep, ...], source: str, key: str) -> None:
    if any(each for _, each in path):
        raise ConfigError(source, key, "must name one value: [] is not allowed here")


def _typed_literal(value: Any, spec: Field, source: str, key: str) -> Any:
    """A rule's literal, typed like the field it is compared with (dates parsed once, here)."""
    kind = spec.type
    if kind in _NUMERIC:
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            return value
    elif kind == "date":
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
    elif kind == "datetime":
        parsed = value
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value)
            except ValueError:
                parsed = None
        if isinstance(parsed, dt.datetime) and parsed.tzinfo is not None:
            return parsed
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind in ("string", "enum"):
        ok = isinstance(value, str) or (
            kind == "enum" and isinstance(value, int) and not isinstance(value, bool)
        )
        if ok:
            if kind == "enum" and value not in spec.values:
                raise ConfigError(source, key, f"{value!r} is not one of the field's values")
            return value
    raise ConfigError(source, key, f"{value!r} cannot be compared with {spec.type} values")


def _reference(name: str, raw: Any, source: str, base: Path, key: str) -> ReferenceTable:
    _check_name(name, source, key, "reference table")
    s = build(ReferenceSection, _table(raw, source, key), source, key + ".")
    if (s.codes is not None) + (s.values is not None) + bool(s.file) != 1:
        raise ConfigError(source, key, "give exactly one of codes or values (inline) or file")
    if s.values is not None:
        return _lookup_table(name, s.values, source, key)
    if s.codes is not None:
        if s.column:
            raise ConfigError(source, key + ".column", "applies to a file only")
        if s.value_column:
            raise ConfigError(source, key + ".value_column", "applies to a file only")
        codes: frozenset[str | int] = frozenset(s.codes)
        origin = "inline"
    else:
        path = base / s.file
        if s.value_column:
            try:
                pairs = read_lookup_file(path, s.column or None, s.value_column)
            except OSError as e:
                raise ConfigError(
                    source, key + ".file", f"cannot read {path}: {e.strerror or e}"
                ) from e
            except ColumnError as e:
                raise ConfigError(source, key + ".value_column", f"{path}: {e}") from e
            except ValueError as e:
                raise ConfigError(source, key + ".file", f"{path}: {e}") from e
            table = _lookup_table(name, pairs, source, key)
            return dataclasses.replace(table, source=str(path))
        try:
            codes = read_reference_file(path, s.column or None)
        except OSError as e:
            raise ConfigError(
                source, key + ".file", f"cannot read {path}: {e.strerror or e}"
            ) from e
        except ColumnError as e:
            raise ConfigError(source, key + ".column", f"{path}: {e}") from e
        except ValueError as e:
            raise ConfigError(source, key + ".file", f"{path}: {e}") from e
        origin = str(path)
    if not codes:
        raise ConfigError(source, key, "holds no codes")
    return ReferenceTable(name, codes, origin)


def _lookup_table(name: str, values: dict[str, Any], source: str, key: str) -> ReferenceTable:
    if not values:
        raise ConfigError(source, key, "holds no codes")
    for code, value in values.items():
        if isinstance(value, dict | list | dt.date):
            raise ConfigError(
                source,
                f"{key}.values.{code}",
                f"must be text, a number or true/false, got {value!r}",
            )
    return ReferenceTable(name, frozenset(values), "inline", dict(values))


class ColumnError(ValueError):
    """A reference file has no such column, or needs `column` set."""


def read_lookup_file(path: Path | str, column: str | None, value_column: str) -> dict[str, Any]:
    """Code -> value pairs from a CSV file (with a header row) or a JSON list of objects: the code
    in `column` (default: the first CSV column), its value in `value_column`. Rows without a code
    are skipped; a code given twice with different values is a ValueError."""
    path = Path(path)
    suffix = path.suffix.lower()
    rows: list[tuple[int, Any, Any]] = []
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ValueError("empty file: a header row is expected") from None
            for wanted in (column, value_column):
                if wanted is not None and wanted not in header:
                    raise ColumnError(f"no column {wanted!r} (columns: {', '.join(header)})")
            code_at = header.index(column) if column is not None else 0
            value_at = header.index(value_column)
            try:
                for number, row in enumerate(reader, start=2):
                    code = row[code_at].strip() if code_at < len(row) else ""
                    value = row[value_at].strip() if value_at < len(row) else ""
                    rows.append((number, code, value))
            except csv.Error as e:
                raise ValueError(f"{e}") from e
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from e
        if column is None:
            raise ColumnError("set column to the key holding the code")
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise ValueError("a JSON lookup file holds a list of objects")
        rows = [(i, item.get(column), item.get(value_column)) for i, item in enumerate(data)]
    else:
        raise ValueError("reference files are .csv or .json")
    out: dict[str, Any] = {}
    for where, code, value in rows:
        if code is None or code == "":
            continue
        if isinstance(code, bool) or not isinstance(code, str | int):
            raise ValueError(f"row {where}: the code is not text or an integer: {code!r}")
        if isinstance(value, dict | list):
            raise ValueError(f"row {where}: the value must be text, a number or true/false")
        text = str(code)
        if text in out and out[text] != value:
            raise ValueError(f"row {where}: code {text!r} has two values")
        out[text] = value
    return out


def read_reference_file(path: Path | str, column: str | None = None) -> frozenset[str | int]:
    """The codes in a CSV file (with a header row; `column`, default the first one) or a JSON file
    (a list of codes, or of objects and then `column` names the key). Blank cells are skipped.
    Raises OSError (unreadable) or ValueError (malformed, naming the row or item)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return frozenset(_csv_codes(csv.reader(f), column))
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from e
        return frozenset(_json_codes(data, column))
    raise ValueError("reference files are .csv or .json")


def _csv_codes(rows: Iterator[list[str]], column: str | None) -> Iterable[str]:
    try:
        header = next(rows)
    except StopIteration:
        raise ValueError("empty file: a header row is expected") from None
    except csv.Error as e:
        raise ValueError(f"line 1: {e}") from e
    names = [h.strip() for h in header]
    if column is None:
        index = 0
    elif column in names:
        index = names.index(column)
    else:
        raise ColumnError(f"no column {column!r} (columns: {', '.join(names)})")
    out: list[str] = []
    try:
        for row in rows:
            if index < len(row) and row[index].strip():
                out.append(row[index].strip())
    except csv.Error as e:
        raise ValueError(f"{e}") from e
    return out


def _json_codes(data: Any, column: str | None) -> Iterable[str | int]:
    if not isinstance(data, list):
        raise ValueError("a JSON reference file holds a list")
    out: list[str | int] = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            if column is None:
                raise ColumnError(f"item {i} is an object: set column to the key holding the code")
            item = item.get(column)
            if item is None:  # an object without the code: skipped like a blank CSV cell
                continue
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ValueError(f"item {i} is not a code (a string or integer): {item!r}")
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------
# Best-effort line lookup for semantic errors: maps each table header and key to its line.
# ------------------------------------------------------------------------------------------------

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"\\]*(?:\\.[^"\\]*)*"|\'[^\']*\')'
_DOTTED = re.compile(rf"\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*")
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]\]?")
_INDEX = re.compile(r"\[\d*\]")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEY_PART, text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Every table header and key of a TOML text with the line (1-based) where it is written.
    Multi-line strings and arrays are skipped over; inline tables map to their own line."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string: str | None = None
    depth = 0  # open brackets of a multi-line array or inline table
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_string = quote
        if depth > 0:
            depth = max(0, depth + _bracket_balance(line))
            continue
        if line.lstrip().startswith("["):
            header = _HEADER.match(line)
            if header is not None:
                table = tuple(_split_key(header.group(2)))
                lines.setdefault(table, number)
            continue
        found = _DOTTED.match(line)
        if found is not None and line[found.end() :].startswith("="):
            path = table + tuple(_split_key(found.group(1)))
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], number)
            depth = max(0, _bracket_balance(line[found.end() + 1 :]))
    return lines


def _bracket_balance(text: str) -> int:
    balance, quote = 0, ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            balance += 1
        elif ch in "]}":
            balance -= 1
    return balance


def line_of_key(text: str, key: str) -> int | None:
    """The line where dotted `key` (or its nearest written parent) is, or None."""
    if not key:
        return None
    wanted = tuple(_INDEX.sub("", key).split("."))
    lines = key_lines(text)
    for end in range(len(wanted), 0, -1):
        if wanted[:end] in lines:
            return lines[wanted[:end]]
    return None
