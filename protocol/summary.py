"""Summary forwarding: records of an append_only collection become increments of a few summary
records, which are forwarded to HQ instead of the records themselves.

    for delta in contributions(summary, record, node):     # what one record adds, per group
        values = add(summary, stored_summary_or_None, delta)  # the summary record afterwards

A summary record (in the derived collection `summary.collection`) exists per node, group and time
window. Its key is `node|window_start|group value|...` (`%`, `|` and `~` in values escaped as
%25, %7C and %7E, control characters as %XX; a missing group value is `~`; a key over
protocol.limits.MAX_KEY_BYTES ends in `#` and a SHA-256 of the whole key), and its fields are the group values (named after
the last step of their path: `items[].unit` -> `unit`), `node`, `window_start`, `window_end`
(exclusive) and one field per aggregate. Because only its own node ever writes it, HQ's copy is
exact; HQ's total over a group and window is the sum (or min/max) over the nodes' records.

Rows: with a list path (`items[].unit`) each item of that list is a row, else the record is one
row. `count` counts rows; `sum`, `min` and `max` skip rows whose field is missing.

Exact arithmetic: decimal fields are added as `Decimal` and stored as decimal strings ("1234.50"
-> "1234.5"), never as binary floats whose rounding would drift as totals grow; integers stay
integers. min/max keep the field's type (dates as yyyy-mm-dd, datetimes as UTC ISO 8601 `Z`).

Windows are computed in UTC: `hour` and `day` as written, `week` from Monday, `month` from the 1st.
A date's window starts and ends as dates; a datetime's as datetimes.

Pure: the agent calls these inside the transaction that stores the record, so a record is counted
exactly once however the agent stops.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from protocol.collections import Aggregate, PathStep, Summary
from protocol.limits import MAX_KEY_BYTES, refused_in_keys

__all__ = ["Delta", "add", "contributions", "summary_key", "window"]

#: Enough digits for any sum of decimal fields (max 1e30 each) over any number of records.
_EXACT = Context(prec=80)


@dataclass(slots=True)
class Delta:
    """What some records add to one summary record: its key, its fixed fields (group values,
    node, window) and the aggregates of their rows."""

    key: str
    fixed: dict[str, Any]
    rows: int = 0
    sums: dict[str, Decimal | int] = field(default_factory=dict)
    lows: dict[str, Any] = field(default_factory=dict)
    highs: dict[str, Any] = field(default_factory=dict)


def window(summary: Summary, value: str) -> tuple[str, str]:
    """The window (start, end exclusive) holding a valid date or datetime value of the time field.
    Raises ValueError for a value that is not one (never the case for a record that passed its
    schema, which requires the time field)."""
    if summary.time_type == "date":
        day = dt.date.fromisoformat(value)
        start, end = _date_window(day, summary.window)
        return start.isoformat(), end.isoformat()
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no timezone")
    moment = moment.astimezone(dt.UTC)
    if summary.window == "hour":
        first = moment.replace(minute=0, second=0, microsecond=0)
        return _utc(first), _utc(first + dt.timedelta(hours=1))
    day_start, day_end = _date_window(moment.date(), summary.window)
    return _utc(_midnight(day_start)), _utc(_midnight(day_end))


def _date_window(day: dt.date, kind: str) -> tuple[dt.date, dt.date]:
    if kind == "week":
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    if kind == "month":
        start = day.replace(day=1)
        following = (start + dt.timedelta(days=32)).replace(day=1)
        return start, following
    return day, day + dt.timedelta(days=1)


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _escape(value: Any) -> str:
    if value is None:
        return "~"
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    text = text.replace("%", "%25").replace("|", "%7C").replace("~", "%7E")
    if not text.isprintable():  # control characters may not appear in a key (protocol.limits)
        text = "".join(f"%{ord(c):02X}" if refused_in_keys(c) else c for c in text)
    return text


def summary_key(node: str, window_start: str, groups: tuple[Any, ...]) -> str:
    """The key of the summary record of one node, window and group.

    A key longer than protocol.limits.MAX_KEY_BYTES (long group values) keeps its first part and
    ends in `#` and a SHA-256 of the whole key instead, so it still names one group and fits."""
    key = "|".join((_escape(node), window_start, *map(_escape, groups)))
    if len(key) * 4 <= MAX_KEY_BYTES or len(key.encode()) <= MAX_KEY_BYTES:
        return key
    digest = "#" + hashlib.sha256(key.encode()).hexdigest()
    head = key.encode()[: MAX_KEY_BYTES - len(digest)].decode("utf-8", "ignore")
    return head + digest


def _at(value: Any, steps: tuple[PathStep, ...]) -> Any:
    for name, _ in steps:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _rows(summary: Summary, record: dict[str, Any]) -> list[tuple[dict[str, Any] | None, bool]]:
    """(list item or None, whether paths read from the item) for each row of the record."""
    if summary.each is None:
        return [(None, False)]
    items = record.get(summary.each)
    if not isinstance(items, list):
        return []
    return [(item, True) for item in items if isinstance(item, dict)]


def _read(record: dict[str, Any], item: dict[str, Any] | None, path: tuple[PathStep, ...]) -> Any:
    if path and path[0][1]:
        return _at(item, path[1:])
    return _at(record, path)


def _typed(aggregate: Aggregate, value: Any) -> Any:
    """A field value as aggregates compare and add it; None if it is not one."""
    kind = aggregate.type
    try:
        if kind == "decimal":
            if isinstance(value, bool):
                return None
            if isinstance(value, float):
                return Decimal(repr(value))
            if isinstance(value, int | str):
                return Decimal(value)
            return None
        if kind == "integer":
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        if kind == "date":
            return dt.date.fromisoformat(value).isoformat() if isinstance(value, str) else None
        if kind == "datetime":
            if not isinstance(value, str):
                return None
            moment = dt.datetime.fromisoformat(value)
            return moment.astimezone(dt.UTC) if moment.tzinfo is not None else None
    except (ValueError, InvalidOperation):
        return None
    return None


def _stored(aggregate: Aggregate, value: Any) -> Any:
    """An aggregate's value as a summary record holds it."""
    if isinstance(value, Decimal):
        return format(value.normalize(_EXACT), "f")
    if isinstance(value, dt.datetime):
        return _utc(value)
    return value


def contributions(summary: Summary, record: dict[str, Any], node: str) -> list[Delta]:
    """What one (valid) record adds to the summary records of `node`, one Delta per group it
    touches, in the order the groups first appear in the record."""
    moment = record.get(summary.time_field)
    if not isinstance(moment, str):
        return []
    start, end = window(summary, moment)
    deltas: dict[str, Delta] = {}
    for item, _ in _rows(summary, record):
        groups = tuple(_read(record, item, g.path) for g in summary.group_by)
        key = summary_key(node, start, groups)
        delta = deltas.get(key)
        if delta is None:
            fixed = {g.name: value for g, value in zip(summary.group_by, groups, strict=True)}
            fixed |= {"node": node, "window_start": start, "window_end": end}
            delta = deltas[key] = Delta(key, fixed)
        delta.rows += 1
        for aggregate in summary.aggregates:
            if aggregate.op == "count":
                continue
            value = _typed(aggregate, _read(record, item, aggregate.path))
            if value is None:
                continue
            name = aggregate.name
            if aggregate.op == "sum":
                before = delta.sums.get(name)
                delta.sums[name] = value if before is None else _plus(before, value)
            elif aggregate.op == "min":
                low = delta.lows.get(name)
                delta.lows[name] = value if low is None or value < low else low
            else:
                high = delta.highs.get(name)
                delta.highs[name] = value if high is None or value > high else high
    return list(deltas.values())


def _plus(a: Decimal | int, b: Decimal | int) -> Decimal | int:
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return _EXACT.add(Decimal(a), Decimal(b))
    return a + b


def add(summary: Summary, current: dict[str, Any] | None, delta: Delta) -> dict[str, Any]:
    """The summary record's fields once `delta` is added to what it holds (`current`, None for a
    summary record that does not exist yet). Every field of the record is returned."""
    out: dict[str, Any] = dict(delta.fixed)
    for aggregate in summary.aggregates:
        name = aggregate.name
        held = None if current is None else current.get(name)
        if aggregate.op == "count":
            before = held if isinstance(held, int) and not isinstance(held, bool) else 0
            out[name] = before + delta.rows
            continue
        had = None if held is None else _typed(aggregate, held)
        if aggregate.op == "sum":
            part = delta.sums.get(name)
            if aggregate.type == "decimal":
                total: Decimal | int | None = _plus(had or Decimal(0), part or Decimal(0))
            else:
                total = (had or 0) + (part or 0)
            out[name] = _stored(aggregate, total)
            continue
        new = (delta.lows if aggregate.op == "min" else delta.highs).get(name)
        if had is None:
            best = new
        elif new is None:
            best = had
        else:
            best = min(had, new) if aggregate.op == "min" else max(had, new)
        out[name] = None if best is None else _stored(aggregate, best)
    return out
