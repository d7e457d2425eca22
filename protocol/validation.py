"""Checking one record against its collection: the schema first, then the business rules.

    violations = validate(collection, record, references=config.references,
                          today=date.today(), now=datetime.now(UTC))

`validate` is pure and total: it never raises, whatever JSON-like value it is given, and returns
every problem found as a `Violation(field, rule, message, stage)`:

* `field` is the path of the offending value: `phone`, `gps.lat`, `members[2].birth_date`
  ("" when the record itself is not an object);
* `rule` is what failed: for the schema stage one of `required`, `type`, `enum`, `min`, `max`,
  `min_length`, `max_length`, `pattern`, `scale`, `unknown_field`; for the rules stage the name
  the rule has in the collections config (e.g. `born_before_registration`);
* `message` names the field and what is wrong with its value (a value shown in it is cut to 40
  characters; never the whole record);
* `stage` is "schema" or "rules" ("transform" for what protocol.transforms finds).

Rules see only values that passed the schema: a rule reading a missing or invalid field is
skipped (the schema stage already reported it). With `partial=True` (a write of some fields of a
record) absent required fields are not reported; validating the merged record is stricter, since
cross-field rules then see every field.

Everything costly is done once when the config loads (regexes compiled, enum values in sets, rule
paths resolved, rule literals typed); a call only walks the record.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
import re
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from protocol.collections import Collection, Field, PathStep, Rule

SCHEMA: Literal["schema"] = "schema"
RULES: Literal["rules"] = "rules"
#: Stage of the problems protocol.transforms finds (an unknown code in a lookup).
TRANSFORM: Literal["transform"] = "transform"
Stage = Literal["schema", "rules", "transform"]
#: More problems than this in one record are cut, with a last Violation saying so.
MAX_VIOLATIONS = 100
SHOWN_CHARS = 40
_NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem with one value of a record."""

    field: str
    rule: str
    message: str
    stage: Stage

    def __str__(self) -> str:
        return f"{self.message} [{self.rule}]"

    def to_json(self) -> dict[str, str]:
        return {
            "field": self.field,
            "rule": self.rule,
            "message": self.message,
            "stage": self.stage,
        }


def validate(
    collection: Collection,
    record: Any,
    *,
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    partial: bool = False,
) -> list[Violation]:
    """Every violation of `collection`'s schema and rules by `record` (empty: the record is valid).

    `references` maps reference table names to their codes (usually `CollectionsConfig.references`,
    or newer tables HQ sent). `today` and `now` are what "not in the future" means; a naive `now` is
    taken as UTC. `partial`: the record holds only the fields being written.
    """
    if not isinstance(record, dict):
        return [Violation("", "type", f"a record must be an object, got {_show(record)}", SCHEMA)]
    out: list[Violation] = []
    _check_object(collection.fields, collection.allow_unknown_fields, record, "", out, partial)
    if collection.rules:
        bad = frozenset(v.field for v in out) if out else _NOTHING
        if isinstance(today, dt.datetime):
            today = today.date()
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.UTC)
        for rule in collection.rules:
            _RULE_CHECKS[rule.check](rule, record, bad, references, today, now, out)
    if len(out) > MAX_VIOLATIONS:
        more = len(out) - MAX_VIOLATIONS
        out = out[:MAX_VIOLATIONS]
        out.append(Violation("", "too_many_violations", f"and {more} more problems", out[-1].stage))
    return out


def type_violations(collection: Collection, fields: Mapping[str, Any]) -> list[Violation]:
    """The values of `fields` (one change's, by wire name) that break their field's declared
    *type*: what HQ checks at ingest when it has the collections file.

    Only types: constraints (lengths, ranges, patterns, enum values) and rules may differ between
    the agent's copy of the collections file and HQ's, and a batch refused for one would strand the
    node's queue; a value of the wrong type is wrong under any version. Undeclared fields (derived
    by a transform, a flags field) and nulls are not checked."""
    out: list[Violation] = []
    for name, value in fields.items():
        if value is None:
            continue
        spec = collection.fields.get(collection.declared_name(name))
        if spec is not None:
            _CHECKERS[spec.type](spec, value, name, out)
    return [v for v in out if v.rule == "type"]


def check_rules(
    rules: Sequence[Rule],
    record: dict[Any, Any],
    *,
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
) -> list[Violation]:
    """The violations of `rules` by a record that already passed its schema: how the flag rules
    of an `exceptions` collection are judged (each violation is a flag that fired)."""
    out: list[Violation] = []
    if isinstance(today, dt.datetime):
        today = today.date()
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    for rule in rules:
        _RULE_CHECKS[rule.check](rule, record, _NOTHING, references, today, now, out)
    return out


# ------------------------------------------------------------------------------------------------
# Schema.
# ------------------------------------------------------------------------------------------------

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_HUGE = 10**30

_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "decimal": 'a number or a decimal string like "12.50"',
    "boolean": "true or false",
    "date": "a date (yyyy-mm-dd)",
    "datetime": "a datetime with a timezone (e.g. 2026-11-25T14:30:00Z)",
    "enum": "one of the listed values",
    "list": "a list",
    "object": "an object",
}

Checker = Callable[[Field, Any, str, list[Violation]], None]


def _show(value: Any) -> str:
    """A value as a message shows it: short, and never a whole nested structure."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -_HUGE < value < _HUGE else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "…")
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, dt.date):
        return value.isoformat()
    return f"a {type(value).__name__}"


def _name(key: Any) -> str:
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 64 else text[:64] + "…"


def _wrong_type(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    out.append(
        Violation(
            path, "type", f"{path} must be {_EXPECTED[spec.type]}, got {_show(value)}", SCHEMA
        )
    )


def _check_object(
    fields: Mapping[str, Field],
    allow_unknown: bool,
    obj: dict[Any, Any],
    prefix: str,
    out: list[Violation],
    partial: bool = False,
) -> None:
    get, checkers = obj.get, _CHECKERS  # (locals: this loop runs for every field of every record)
    for name, spec in fields.items():
        value = get(name)
        if value is None:
            if spec.required and (not partial or name in obj):
                path = prefix + name
                got = ", got null" if name in obj else ""
                out.append(Violation(path, "required", f"{path} is required{got}", SCHEMA))
            continue
        checkers[spec.type](spec, value, prefix + name, out)
    if not allow_unknown and not obj.keys() <= fields.keys():
        for key in obj:
            if key not in fields:
                path = prefix + _name(key)
                out.append(
                    Violation(path, "unknown_field", f"{path} is not a declared field", SCHEMA)
                )


def _length_problem(spec: Field, path: str, size: int, phrase: str) -> Violation | None:
    """min_length/max_length of a string or a list; `phrase` is e.g. "hold {} {} items"."""
    if spec.min_length is not None and size < spec.min_length:
        wanted = phrase.format("at least", spec.min_length)
        return Violation(path, "min_length", f"{path} must {wanted}, got {size}", SCHEMA)
    if spec.max_length is not None and size > spec.max_length:
        wanted = phrase.format("at most", spec.max_length)
        return Violation(path, "max_length", f"{path} must {wanted}, got {size}", SCHEMA)
    return None


def _check_string(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, str):
        _wrong_type(spec, value, path, out)
        return
    problem = _length_problem(spec, path, len(value), "be {} {} characters long")
    if problem is not None:
        out.append(problem)
        return
    if spec.pattern is not None and spec.pattern.fullmatch(value) is None:
        out.append(
            Violation(
                path,
                "pattern",
                f"{path} {_show(value)} does not match the pattern {spec.pattern.pattern}",
                SCHEMA,
            )
        )


def _check_range(spec: Field, number: Any, value: Any, path: str, out: list[Violation]) -> None:
    """min/max (inclusive) of a number, date or datetime already of the field's type."""
    if spec.minimum is not None and number < spec.minimum:
        out.append(
            Violation(
                path,
                "min",
                f"{path} must be at least {_show(spec.minimum)}, got {_show(value)}",
                SCHEMA,
            )
        )
    elif spec.maximum is not None and number > spec.maximum:
        out.append(
            Violation(
                path,
                "max",
                f"{path} must be at most {_show(spec.maximum)}, got {_show(value)}",
                SCHEMA,
            )
        )


def _check_integer(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _wrong_type(spec, value, path, out)
        return
    if spec.minimum is not None or spec.maximum is not None:
        _check_range(spec, value, value, path, out)


def _scale(value: int | float | str) -> int:
    """Digits after the decimal point (of the shortest repr, for a float)."""
    if isinstance(value, int):
        return 0
    if isinstance(value, str):
        point = value.find(".")
        return 0 if point < 0 else len(value) - point - 1
    if value.is_integer():
        return 0
    text = repr(value)
    if "e" in text or "E" in text:
        exponent = Decimal(text).as_tuple().exponent
        return -exponent if isinstance(exponent, int) and exponent < 0 else 0
    return len(text) - text.find(".") - 1


def _check_decimal(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    number: int | float | Decimal
    if isinstance(value, bool):
        _wrong_type(spec, value, path, out)
        return
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            out.append(
                Violation(path, "type", f"{path} must be a finite number, got {value}", SCHEMA)
            )
            return
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value) is not None:
        number = Decimal(value)
    else:
        _wrong_type(spec, value, path, out)
        return
    if spec.minimum is not None or spec.maximum is not None:
        _check_range(spec, number, value, path, out)
    if spec.scale is not None and _scale(value) > spec.scale:
        out.append(
            Violation(
                path,
                "scale",
                f"{path} may have at most {spec.scale} digits after the point, got {_show(value)}",
                SCHEMA,
            )
        )


def _check_boolean(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, bool):
        _wrong_type(spec, value, path, out)


def _check_date(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, str) or len(value) != 10 or _DATE.fullmatch(value) is None:
        _wrong_type(spec, value, path, out)
        return
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        out.append(Violation(path, "type", f"{path} {_show(value)} is not a real date", SCHEMA))
        return
    if spec.minimum is not None or spec.maximum is not None:
        _check_range(spec, day, value, path, out)


def _check_datetime(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, str) or len(value) > 40 or _DATETIME.fullmatch(value) is None:
        _wrong_type(spec, value, path, out)
        return
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        out.append(Violation(path, "type", f"{path} {_show(value)} is not a real datetime", SCHEMA))
        return
    if spec.minimum is not None or spec.maximum is not None:
        _check_range(spec, moment, value, path, out)


def _check_enum(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))) and (
        value in spec.values
    ):
        return
    shown = sorted(spec.values, key=str)
    choices = ", ".join(map(repr, shown[:12])) + (", …" if len(shown) > 12 else "")
    out.append(
        Violation(path, "enum", f"{path} must be one of {choices}, got {_show(value)}", SCHEMA)
    )


def _check_list(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, list):
        _wrong_type(spec, value, path, out)
        return
    problem = _length_problem(spec, path, len(value), "hold {} {} items")
    if problem is not None:
        out.append(problem)
        if problem.rule == "max_length":
            return  # an oversized list is not walked item by item
    items = spec.items
    if items is None:
        return
    check = _CHECKERS[items.type]
    for i, item in enumerate(value):
        if item is None:
            where = f"{path}[{i}]"
            out.append(
                Violation(
                    where, "type", f"{where} must be {_EXPECTED[items.type]}, got null", SCHEMA
                )
            )
        else:
            check(items, item, f"{path}[{i}]", out)


def _check_nested(spec: Field, value: Any, path: str, out: list[Violation]) -> None:
    if not isinstance(value, dict):
        _wrong_type(spec, value, path, out)
        return
    _check_object(spec.fields, spec.allow_unknown_fields, value, path + ".", out)


_CHECKERS: dict[str, Checker] = {
    "string": _check_string,
    "integer": _check_integer,
    "decimal": _check_decimal,
    "boolean": _check_boolean,
    "date": _check_date,
    "datetime": _check_datetime,
    "enum": _check_enum,
    "list": _check_list,
    "object": _check_nested,
}


# ------------------------------------------------------------------------------------------------
# Business rules.
# ------------------------------------------------------------------------------------------------

RuleCheck = Callable[
    [
        Rule,
        dict[Any, Any],
        frozenset[str],
        Mapping[str, Container[Any]],
        dt.date,
        dt.datetime,
        list[Violation],
    ],
    None,
]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _is_bad(path: str, bad: frozenset[str]) -> bool:
    """True if the schema stage reported `path` or anything it lies in."""
    return path in bad or any(ch in ".[" and path[:i] in bad for i, ch in enumerate(path))


def _values(
    record: dict[Any, Any], path: tuple[PathStep, ...], bad: frozenset[str]
) -> list[tuple[str, Any]]:
    """(concrete path, value) of every non-null value `path` reaches, minus those that failed the
    schema. `members[].sex` reaches `members[0].sex`, `members[1].sex`..."""
    if len(path) == 1 and not path[0][1]:
        name = path[0][0]
        value = record.get(name)
        if value is None or name in bad:
            return []
        return [(name, value)]
    current: list[tuple[str, Any]] = [("", record)]
    for name, each in path:
        reached: list[tuple[str, Any]] = []
        for prefix, obj in current:
            if not isinstance(obj, dict):
                continue
            value = obj.get(name)
            if value is None:
                continue
            where = f"{prefix}.{name}" if prefix else name
            if not each:
                reached.append((where, value))
            elif isinstance(value, list):
                reached.extend(
                    (f"{where}[{i}]", item) for i, item in enumerate(value) if item is not None
                )
        current = reached
    if bad:
        return [(p, v) for p, v in current if not _is_bad(p, bad)]
    return current


def _typed(spec: Field | None, value: Any) -> Any:
    """A value that passed the schema, as Python compares it: dates as dates, decimal strings as
    Decimal. None if it cannot be read (never the case for a value that passed the schema)."""
    kind = spec.type if spec is not None else ""
    try:
        if kind == "date":
            return dt.date.fromisoformat(value)
        if kind == "datetime":
            return dt.datetime.fromisoformat(value)
        if kind == "decimal" and isinstance(value, str):
            return Decimal(value)
    except (TypeError, ValueError, ArithmeticError):
        return None
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that does not take true for 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


_NO_VALUE = object()


def _say(rule: Rule, path: str, default: str, value: Any = _NO_VALUE) -> str:
    """The rule's own message, if it has one, after the path (and the value); else the default."""
    if not rule.message:
        return default
    shown = "" if value is _NO_VALUE else f" {_show(value)}"
    return f"{path}{shown}: {rule.message}"


def _not_in_future(
    rule: Rule,
    record: dict[Any, Any],
    bad: frozenset[str],
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    out: list[Violation],
) -> None:
    values = _values(record, rule.path, bad)
    if not values:
        return
    moment = rule.target.type == "datetime"
    base: dt.date = now if moment else today
    try:
        limit = base + dt.timedelta(days=rule.tolerance_days)
    except OverflowError:
        return  # nothing lies after the end of the calendar
    reference = "now" if moment else "today"
    slack = f" + {rule.tolerance_days} days" if rule.tolerance_days else ""
    for path, value in values:
        typed = _typed(rule.target, value)
        if typed is not None and typed > limit:
            text = (
                f"{path} {_show(value)} is in the future (after {reference}{slack}: {_show(limit)})"
            )
            out.append(Violation(path, rule.name, _say(rule, path, text, value), RULES))


def _count_equals_length(
    rule: Rule,
    record: dict[Any, Any],
    bad: frozenset[str],
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    out: list[Violation],
) -> None:
    counts = _values(record, rule.path, bad)
    lists = _values(record, rule.other_path, bad)
    if not counts or not lists:
        return
    (path, count), (_, items) = counts[0], lists[0]
    if isinstance(items, list) and count != len(items):
        text = f"{path} is {_show(count)} but {rule.other} holds {len(items)} items"
        out.append(Violation(path, rule.name, _say(rule, path, text, count), RULES))


def _known(code: Any, table: Container[Any]) -> bool:
    if isinstance(code, bool) or not isinstance(code, str | int):
        return False
    return code in table or (isinstance(code, int) and str(code) in table)


def _in_reference(
    rule: Rule,
    record: dict[Any, Any],
    bad: frozenset[str],
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    out: list[Violation],
) -> None:
    values = _values(record, rule.path, bad)
    if not values:
        return
    table = references.get(rule.table)
    if table is None:
        text = f"{rule.field} cannot be checked: reference table {rule.table!r} is not loaded"
        out.append(Violation(rule.field, rule.name, text, RULES))
        return
    if rule.target.type == "list":
        values = [(f"{p}[{i}]", item) for p, v in values for i, item in enumerate(v)]
    for path, code in values:
        if not _known(code, table):
            text = f"{path} {_show(code)} is not in the reference table {rule.table}"
            out.append(Violation(path, rule.name, _say(rule, path, text, code), RULES))


def _compare(
    rule: Rule,
    record: dict[Any, Any],
    bad: frozenset[str],
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    out: list[Violation],
) -> None:
    values = _values(record, rule.path, bad)
    if not values:
        return
    if rule.has_value:
        right, shown = rule.value, _show(rule.value)
    else:
        others = _values(record, rule.other_path, bad)
        if not others:
            return
        right = _typed(rule.other_target, others[0][1])
        shown = f"{rule.other} ({_show(others[0][1])})"
    if right is None:
        return
    test = _OPS[rule.op]
    for path, value in values:
        left = _typed(rule.target, value)
        if left is None:
            continue
        try:
            if rule.op == "==":
                holds = _same(left, right)
            elif rule.op == "!=":
                holds = not _same(left, right)
            else:
                holds = test(left, right)
        except TypeError:  # not comparable: the config check makes this unreachable
            continue
        if not holds:
            text = f"{path} ({_show(value)}) must be {rule.op} {shown}"
            out.append(Violation(path, rule.name, _say(rule, path, text, value), RULES))


def _present(record: dict[Any, Any], path: tuple[PathStep, ...]) -> bool:
    obj: Any = record
    for name, _ in path:
        if not isinstance(obj, dict):
            return False
        obj = obj.get(name)
        if obj is None:
            return False
    return True


def _required_if(
    rule: Rule,
    record: dict[Any, Any],
    bad: frozenset[str],
    references: Mapping[str, Container[Any]],
    today: dt.date,
    now: dt.datetime,
    out: list[Violation],
) -> None:
    when = _values(record, rule.other_path, bad)
    if not when:
        return
    if rule.has_value and not _same(_typed(rule.other_target, when[0][1]), rule.value):
        return
    if _present(record, rule.path):
        return
    cause = f"is {_show(rule.value)}" if rule.has_value else "has a value"
    text = f"{rule.field} is required when {rule.other} {cause}"
    out.append(Violation(rule.field, rule.name, _say(rule, rule.field, text), RULES))


_RULE_CHECKS: dict[str, RuleCheck] = {
    "not_in_future": _not_in_future,
    "count_equals_length": _count_equals_length,
    "in_reference": _in_reference,
    "compare": _compare,
    "required_if": _required_if,
}
