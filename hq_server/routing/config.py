"""Routes in config: which changes go where, mapped how, when, and with what retry policy.

A routes file (`hq.routes_file`) holds `[mappings.NAME]` tables (see `hq_server.routing.mapping`)
and `[routes.NAME]` tables::

    [routes.grants_to_finance]
    description = "Approved grant budgets to the finance ledger, one row per fiscal year"
    owner = "finance-systems@example.org"
    sources = ["grants"]                    # collections whose changes this route reads
    filter = [{ field = "status", op = "eq", value = "approved" }]
    mapping = "grants_to_finance"           # omitted: the record as it is, keyed by its key
    trigger = "realtime"                    # or "hourly", "every 15 minutes", "daily after 02:00"
    state = "enabled"                       # enabled | disabled | retired (kept, never deleted)
    [routes.grants_to_finance.retry]
    initial_s = 1.0                         # first delay; doubles with jitter ...
    max_s = 600.0                           # ... up to this
    attempts = 8                            # then the item goes to the dead-letter queue
    [routes.grants_to_finance.sink]
    type = "postgres"                       # any registered sink type; its own settings follow

Everything is validated when HQ starts (and by `fieldsync-hq routes`): an unknown key, sink type,
mapping or operator fails with the file, the key and the reason.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hq_server.routing.mapping import Mapping, compile_mapping
from hq_server.sinks.base import SINK_TYPES, SinkType
from hq_server.sinks.plaintext import Plaintext
from protocol.config import ConfigError, at_least, build, positive, read_toml, setting

ROUTE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
STATES = ("enabled", "disabled", "retired")
OPERATORS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "missing")


BUILTIN_SINKS = ("webhook", "rest", "files", "postgres", "rabbitmq")


def load_builtin_sinks() -> None:
    """Import the built-in sinks so they register themselves (as a plugin would)."""
    for name in BUILTIN_SINKS:
        importlib.import_module(f"hq_server.sinks.{name}")


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = setting(1.0, "First retry delay after a transient error.", positive)
    max_s: float = setting(600.0, "Longest retry delay (doubling with jitter).", positive)
    attempts: int = setting(
        8,
        "Attempts before an item that keeps failing goes to the dead-letter queue. An unreachable "
        "target does not spend attempts: the route waits for it, in order.",
        at_least(1),
    )


@dataclass(frozen=True)
class Predicate:
    """One condition on a field of the source record; a route's filter is their conjunction."""

    field: str
    op: str
    value: Any = None

    def matches(self, record: dict[str, Any]) -> bool:
        present = self.field in record
        actual = record.get(self.field)
        if self.op == "exists":
            return present
        if self.op == "missing":
            return not present
        if self.op == "eq":
            return present and actual == self.value
        if self.op == "ne":
            return not present or actual != self.value
        if self.op == "in":
            return present and actual in self.value
        if self.op == "not_in":
            return not present or actual not in self.value
        if not present or actual is None:
            return False
        try:
            if self.op == "gt":
                return bool(actual > self.value)
            if self.op == "gte":
                return bool(actual >= self.value)
            if self.op == "lt":
                return bool(actual < self.value)
            return bool(actual <= self.value)
        except TypeError:
            return False  # e.g. a string compared with a number: the record does not match


@dataclass(frozen=True)
class Trigger:
    """When a route delivers: continuously, or in windows on a schedule (times in `tz`)."""

    text: str
    every_s: int = 0  # 0: realtime
    daily_at: dt.time | None = None
    tz: dt.tzinfo = dt.UTC

    @property
    def realtime(self) -> bool:
        return self.every_s == 0 and self.daily_at is None

    def next_window(self, last_run_ms: int) -> int:
        """Epoch ms at which the window after a run that started at `last_run_ms` opens."""
        if self.daily_at is None:
            return last_run_ms + self.every_s * 1000
        last = dt.datetime.fromtimestamp(last_run_ms / 1000, self.tz)
        candidate = dt.datetime.combine(last.date(), self.daily_at, self.tz)
        if candidate <= last:
            candidate += dt.timedelta(days=1)
        return int(candidate.timestamp() * 1000)

    def first_window(self, now_ms: int) -> int:
        """When a route that never ran may run: at once for intervals, at the daily time else."""
        if self.daily_at is None:
            return now_ms
        now = dt.datetime.fromtimestamp(now_ms / 1000, self.tz)
        today = dt.datetime.combine(now.date(), self.daily_at, self.tz)
        return int(today.timestamp() * 1000) if today <= now else self.next_window(now_ms)


_EVERY = re.compile(r"^every (\d+) (minute|minutes|hour|hours)$")
_DAILY = re.compile(r"^daily after ([01]\d|2[0-3]):([0-5]\d)$")


def parse_trigger(text: str, timezone: str = "UTC") -> Trigger:
    try:
        tz: dt.tzinfo = dt.UTC if timezone == "UTC" else zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {timezone!r}") from e
    if text == "realtime":
        return Trigger(text, tz=tz)
    if text == "hourly":
        return Trigger(text, every_s=3600, tz=tz)
    if m := _EVERY.match(text):
        n = int(m.group(1))
        if n < 1:
            raise ValueError("the interval must be at least 1")
        return Trigger(text, every_s=n * (60 if m.group(2).startswith("minute") else 3600), tz=tz)
    if m := _DAILY.match(text):
        return Trigger(text, daily_at=dt.time(int(m.group(1)), int(m.group(2))), tz=tz)
    raise ValueError(
        'must be "realtime", "hourly", "every N minutes", "every N hours" or "daily after HH:MM"'
    )


@dataclass(frozen=True)
class RouteSection:
    description: str = setting("", "What the route is for, in one sentence.")
    owner: str = setting("", "Who answers for the route (team or address).")
    sources: list[str] = setting([], "Collections whose changes the route reads.")
    filter: list[dict[str, Any]] = setting(
        [], "Conditions on source fields, all of which must hold: {field, op, value}."
    )
    mapping: str = setting("", "Name of a [mappings.NAME] table; empty: the record as it is.")
    trigger: str = setting(
        "realtime", "realtime, hourly, every N minutes/hours, daily after HH:MM."
    )
    timezone: str = setting("UTC", "Time zone of a daily trigger, e.g. Africa/Nairobi.")
    state: str = setting("enabled", "enabled, disabled, or retired (kept with date and reason).")
    retired_at: str = setting("", "Date the route was retired (YYYY-MM-DD); required if retired.")
    retired_reason: str = setting("", "Why the route was retired; required if retired.")
    batch_size: int = setting(200, "Most items handed to the sink at once.", positive)
    insecure_plaintext: bool = setting(
        False,
        "Allow the sink to send records and credentials unencrypted to another machine (http://, "
        'amqp:// without TLS, PostgreSQL sslmode = "disable"). Refused without it; with it, HQ '
        "warns at every start and the inventory shows it.",
    )
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sink: dict[str, Any] = setting({}, "The target: type = SINK TYPE plus that sink's settings.")


@dataclass(frozen=True)
class Route:
    name: str
    section: RouteSection
    predicates: tuple[Predicate, ...]
    mapping: Mapping | None
    trigger: Trigger
    sink_type: SinkType
    sink_settings: Any
    # Unencrypted connections to other machines the route was allowed (insecure_plaintext = true).
    plaintext: tuple[Plaintext, ...] = ()

    @property
    def active(self) -> bool:
        return self.section.state == "enabled"

    def wants(self, collection: str, record: dict[str, Any]) -> bool:
        return collection in self.section.sources and all(
            p.matches(record) for p in self.predicates
        )


@dataclass(frozen=True)
class RoutesConfig:
    source: str
    mappings: dict[str, Mapping]
    routes: dict[str, Route]


def _predicates(raw: list[dict[str, Any]], source: str, key: str) -> tuple[Predicate, ...]:
    out = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) - {"field", "op", "value"}:
            raise ConfigError(source, where, "must be a table with field, op and value")
        name, op = item.get("field"), item.get("op")
        if not isinstance(name, str) or not name:
            raise ConfigError(source, where + ".field", "must name a source field")
        if op not in OPERATORS:
            raise ConfigError(source, where + ".op", f"must be one of {', '.join(OPERATORS)}")
        if op in ("in", "not_in") and not isinstance(item.get("value"), list):
            raise ConfigError(source, where + ".value", f"must be a list for {op}")
        if op not in ("exists", "missing") and "value" not in item:
            raise ConfigError(source, where + ".value", f"is required for {op}")
        out.append(Predicate(name, op, item.get("value")))
    return tuple(out)


def _route(name: str, table: Any, mappings: dict[str, Mapping], source: str) -> Route:
    key = f"routes.{name}"
    if not ROUTE_NAME.match(name):
        raise ConfigError(source, key, "route names are lowercase letters, digits, - and _")
    if not isinstance(table, dict):
        raise ConfigError(source, key, "must be a table")
    section = build(RouteSection, table, source, key + ".")
    if not section.sources:
        raise ConfigError(source, key + ".sources", "must name at least one collection")
    if section.state not in STATES:
        raise ConfigError(source, key + ".state", f"must be one of {', '.join(STATES)}")
    if section.state == "retired":
        try:
            dt.date.fromisoformat(section.retired_at)
        except ValueError as e:
            raise ConfigError(source, key + ".retired_at", "a retired route needs its date") from e
        if not section.retired_reason.strip():
            raise ConfigError(source, key + ".retired_reason", "a retired route needs a reason")
    if section.mapping and section.mapping not in mappings:
        known = ", ".join(sorted(mappings)) or "none"
        raise ConfigError(
            source, key + ".mapping", f"no mapping {section.mapping!r} (known: {known})"
        )
    try:
        trigger = parse_trigger(section.trigger, section.timezone)
    except ValueError as e:
        raise ConfigError(source, key + ".trigger", str(e)) from e
    sink = dict(section.sink)
    kind = sink.pop("type", None)
    if kind not in SINK_TYPES:
        known = ", ".join(sorted(SINK_TYPES))
        raise ConfigError(source, key + ".sink.type", f"must be one of {known}, got {kind!r}")
    sink_type = SINK_TYPES[kind]
    try:
        settings: Any = build(sink_type.settings, sink, source, key + ".sink.")
    except ConfigError as e:
        if e.path == source:
            raise
        # A cross-key check of the sink's own settings (its __post_init__): name our file and key.
        where = f"{key}.sink.{e.key}" if e.key else f"{key}.sink"
        raise ConfigError(source, where, e.reason) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(source, key + ".sink", str(e)) from e
    plaintext = _plaintext(name, section, settings, source)
    return Route(
        name=name,
        section=section,
        predicates=_predicates(section.filter, source, key + ".filter"),
        mapping=mappings.get(section.mapping) if section.mapping else None,
        trigger=trigger,
        sink_type=sink_type,
        sink_settings=settings,
        plaintext=plaintext,
    )


def _plaintext(
    name: str, section: RouteSection, settings: Any, source: str
) -> tuple[Plaintext, ...]:
    """The sink's unencrypted connections to other machines (`hq_server.sinks.plaintext`):
    refused, naming the route, the setting, the file and the fix, unless the route allows them."""
    finder = getattr(settings, "plaintext", None)
    found = tuple(finder()) if callable(finder) else ()
    if found and not section.insecure_plaintext:
        first = found[0]
        raise ConfigError(
            source,
            f"routes.{name}.sink.{first.key}",
            f"route {name} would send records unencrypted ({first.what}): {first.fix}; or, if "
            f"this network is trusted, set insecure_plaintext = true in [routes.{name}]",
        )
    return found


def _included_mappings(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`include = ["mappings.toml", ...]`: mapping tables kept in files of their own (relative to
    the routes file), so one mapping can serve several route files."""
    includes = data.get("include", [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(source, "include", "must be a list of file names")
    merged: dict[str, Any] = {}
    base = Path(source).parent
    for name in includes:
        path = base / name
        included = read_toml(path)
        if set(included) - {"mappings"}:
            raise ConfigError(
                path,
                sorted(set(included) - {"mappings"})[0],
                "an included file holds only [mappings.*]",
            )
        for mapping, spec in included.get("mappings", {}).items():
            if mapping in merged:
                raise ConfigError(path, f"mappings.{mapping}", "defined twice")
            merged[mapping] = (spec, str(path))
    return merged


def routes_from_dict(data: dict[str, Any], source: str = "<memory>") -> RoutesConfig:
    load_builtin_sinks()
    unknown = set(data) - {"include", "mappings", "routes"}
    if unknown:
        raise ConfigError(
            source, sorted(unknown)[0], "unknown table (known: include, mappings, routes)"
        )
    raw_mappings = data.get("mappings", {})
    raw_routes = data.get("routes", {})
    if not isinstance(raw_mappings, dict) or not isinstance(raw_routes, dict):
        raise ConfigError(
            source,
            "mappings" if not isinstance(raw_mappings, dict) else "routes",
            "must be a table",
        )
    specs = _included_mappings(data, source)
    for name, spec in raw_mappings.items():
        if name in specs:
            raise ConfigError(source, f"mappings.{name}", f"also defined in {specs[name][1]}")
        specs[name] = (spec, source)
    mappings = {}
    for name, (spec, where) in specs.items():
        if not isinstance(spec, dict):
            raise ConfigError(where, f"mappings.{name}", "must be a table")
        mappings[name] = compile_mapping(name, spec, where)
    routes = {name: _route(name, table, mappings, source) for name, table in raw_routes.items()}
    return RoutesConfig(source, mappings, routes)


def load_routes(path: Path | str) -> RoutesConfig:
    return routes_from_dict(read_toml(path), str(path))
