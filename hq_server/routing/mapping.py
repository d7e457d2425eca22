"""Declarative mappings: one source record in, zero or more target records out.

Why declarative: the people who know that "travel" is cost code 20-TRVL in the finance ledger are
not Python programmers, and a mapping that lives in config can be reviewed, diffed and validated
when HQ starts instead of failing on the first record at 3 a.m. Nothing in a config string is ever
evaluated: templates have their own tiny formatter, regular expressions only pick field names, and
the one escape hatch, a Python hook, is named by module and function and imported at start.

A mapping is a `[mappings.NAME]` table. Everything is checked by `compile_mapping`; any problem is a
`ConfigError` naming the file and the key path (e.g. `mappings.crm.fields.gender.lookup`).
config/mappings.example.toml has complete, commented examples: grant budgets fanned out per fiscal
year, beneficiaries to CRM contacts, distribution items to finance lines.

    [mappings.NAME]
    description = "..."            # optional, for people
    source_key = "grant_id"        # optional: the field holding the record's key (sets {_key})
    target_key = "CC-{grant_id}-{fy}"   # key of each output in the target; default "{_key}"
    required = ["grant_id"]        # source paths that must be present, else MappingError
    each = { match = '^fy(?P<fy>\\d{4})_' }   # optional fan-out: one output per scope (below)
    hook = "package.module:function"           # optional Python hook (below)

    [mappings.NAME.lookups.TABLE]  # lookup tables: source value -> target value
    personnel = "10-PERS"

    [mappings.NAME.fields]         # output fields, in this order; each has exactly one rule
    a = { from = "gps.lat" }       # copy/rename a source value (dotted path; digits index lists)
    b = { const = "fieldsync" }    # a constant (any TOML value but dates)
    c = { template = "CC-{grant_id}" }        # text from {name} / {name.sub} placeholders
    d = { sum = ["x", "y"] }       # sum of numbers; missing ones count as nothing
    e = { sum = "line.qty", each = { items = "lines", as = "line" } }   # sum across a list
    f = { count = "members" }      # length of a list (0 when missing)
    g = { fields = { lat = { from = "gps.lat" } } }                     # a nested object
    h = { each = { items = "members" }, fields = { name = { from = "item.name" } } }  # a list

Modifiers of `from` and `template`: `default = VALUE` (used as is when the value is missing),
`required = true` (missing is a MappingError), `lookup = "TABLE"` (translate the value; an unknown
value is a MappingError unless `lookup_default = VALUE` is set). A missing value without `default`
or `required` becomes null, so every output has the same fields. "Missing" means absent or null.

Names in paths and placeholders are looked up first among the scope's variables, then in the
record. Variables: `_key` (the source key: `apply(key=)`, else the record's `_key` field, else
`source_key`), `_index` (position in the current `each`), `_part` (position among a hook's outputs,
only in `target_key`), and those an `each` defines. Path segments may hold placeholders too:
`from = "fy{fy}_{category}"`. In templates `{{` and `}}` are literal braces; text values go in as
they are, numbers as JSON writes them, true/false in lower case; a list or object is a
MappingError.

`each` makes scopes, at the top (one output per scope) or in a field (list items, or sum terms):

    each = { items = "PATH", as = "item" }     # one per element of a list, in list order
    each = { values = ["a", "b"], as = "item" } # one per constant, in config order
    each = { match = 'REGEX' }                 # one per distinct combination of the regex's named
                                               # groups over the record's (non-null) field names,
                                               # sorted; groups become variables. The regex is
                                               # searched for: anchor it with ^ and $
    when = "PATH"                              # optional, with any of the above: skip a scope
                                               # in which PATH is missing

Inside another `each`, a named group that is already a variable only matches its value, so a
nested `match` sees just the outer scope's fields. Scopes never depend on the order of the
record's keys: the same record always maps to the same outputs in the same order.

A hook, `hook = "module:function"`, is for what the declarative form cannot say. It is imported
when the mapping is compiled and called once per scope as `function(record, context)`, where
`record` is a private copy and `context` holds the scope's variables plus `_mapping` (the mapping's
name) and `_payload` (the declarative fields computed so far). It returns a dict, laid over the
declarative payload (same-named fields replaced in place, new ones appended), or a list of dicts
(one output each; an empty list drops the scope). Whatever it raises becomes a MappingError.

Errors::

    ConfigError (protocol.config)   the mapping itself is wrong: refused at start
    MappingError                    this record cannot be mapped: permanent, dead-letter it;
                                    names the mapping, the target field and the rule
"""

from __future__ import annotations

import copy
import importlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from protocol.config import ConfigError
from protocol.templates import parse_template

__all__ = [
    "Mapped",
    "Mapping",
    "MappingError",
    "compile_mapping",
]

Hook = Callable[[dict[str, Any], dict[str, Any]], Any]


class MappingError(Exception):
    """A record cannot be mapped. Permanent: retrying the same record gives the same answer, so the
    router dead-letters it. The message names the mapping, the target field and the rule, and never
    the whole record (it may hold personal data)."""

    def __init__(self, mapping: str, field: str | None, rule: str, reason: str) -> None:
        super().__init__(mapping, field, rule, reason)  # args kept whole so the error pickles
        self.mapping, self.field, self.rule, self.reason = mapping, field, rule, reason

    def __str__(self) -> str:
        where = f", field {self.field!r}" if self.field else ""
        return f"mapping {self.mapping!r}{where}, rule {self.rule}: {self.reason}"


class Mapped(NamedTuple):
    """One output: its key in the target (the upsert key) and its fields."""

    target_key: str
    payload: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Values, scopes and lookups at run time
# ------------------------------------------------------------------------------------------------


class _Missing:
    """A value that is absent (or null), and what was looked for, for the error message."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class _Bad(Exception):
    """Internal: a rule failed; the field evaluating it turns this into a MappingError."""


_NOTHING = object()  # "no default configured" (None cannot be a TOML value, but be explicit)
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class _Scope:
    mapping: str
    record: dict[str, Any]
    vars: dict[str, Any]
    where: str  # target path prefix of the fields built in this scope, for messages


def _own(value: Any) -> Any:
    """A private copy of containers: outputs must not share objects with the record or config,
    since the record feeds other routes and a sink may adjust a payload in place."""
    if not isinstance(value, dict | list):
        return value
    try:
        return copy.deepcopy(value)
    except RecursionError:  # JSON parsers allow deeper nesting than copy.deepcopy can follow
        raise _Bad("the value is nested too deeply to copy") from None


def _type(value: Any) -> str:
    return {bool: "true/false", dict: "an object", list: "a list", str: "text"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _walk(names: Sequence[str], scope: _Scope) -> Any:
    """The value at a literal path, or _ABSENT (null counts as absent)."""
    head = names[0]
    current = scope.vars[head] if head in scope.vars else scope.record.get(head, _ABSENT)
    for name in names[1:]:
        if isinstance(current, dict):
            current = current.get(name, _ABSENT)
        elif isinstance(current, list) and name.isascii() and name.isdigit() and len(name) < 10:
            position = int(name)
            current = current[position] if position < len(current) else _ABSENT
        else:
            return _ABSENT
    return _ABSENT if current is None else current


def _text(value: Any, placeholder: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        try:
            return str(value)
        except ValueError as e:  # an int beyond Python's digit limit for str()
            raise _Bad(f"{placeholder} is a number too long to write out") from e
    raise _Bad(f"{placeholder} is {_type(value)}, not text")


@dataclass(frozen=True, slots=True)
class _Template:
    """Parsed `{name}` / `{name.sub}` text: literal strings and placeholder paths."""

    text: str
    parts: tuple[str | tuple[str, ...], ...]

    @property
    def placeholders(self) -> list[tuple[str, ...]]:
        return [part for part in self.parts if isinstance(part, tuple)]

    def render(self, scope: _Scope) -> str | _Missing:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            placeholder = "{" + ".".join(part) + "}"
            value = _walk(part, scope)
            if value is _ABSENT:
                return _Missing(f"placeholder {placeholder}")
            out.append(_text(value, placeholder))
        return "".join(out)


@dataclass(frozen=True, slots=True)
class _Path:
    """A dotted path whose segments may hold placeholders (`fy{fy}_travel`)."""

    text: str
    segments: tuple[str | _Template, ...]

    def resolve(self, scope: _Scope) -> Any:
        """The value at this path in `scope`, or _Missing."""
        names: list[str] = []
        for segment in self.segments:
            if isinstance(segment, _Template):
                rendered = segment.render(scope)
                if isinstance(rendered, _Missing):
                    return rendered
                names.append(rendered)
            else:
                names.append(segment)
        value = _walk(names, scope)
        return _Missing(f"source field {'.'.join(names)!r}") if value is _ABSENT else value


@dataclass(frozen=True, slots=True)
class _Lookup:
    name: str
    table: dict[str, Any]
    default: Any = _NOTHING

    def translate(self, value: Any) -> Any:
        if isinstance(value, bool):
            key = "true" if value else "false"
        elif isinstance(value, str):
            key = value
        elif isinstance(value, int):
            key = _text(value, "the value")
        else:
            raise _Bad(f"cannot look up {_type(value)}")
        if key in self.table:
            return _own(self.table[key])
        if self.default is not _NOTHING:
            return _own(self.default)
        raise _Bad(f"unknown value {_short(value)} (not in the table, which has no lookup_default)")


@dataclass(frozen=True, slots=True)
class _Each:
    """Makes the scopes of a fan-out or of a list field; see the module docstring."""

    rule: str
    items: _Path | None = None
    values: tuple[Any, ...] = ()
    match: re.Pattern[str] | None = None
    name: str = "item"
    when: _Path | None = None

    def scopes(self, scope: _Scope) -> Iterator[_Scope]:
        """Child scopes in a deterministic order; raises _Bad for a non-list `items`."""
        for index, new in enumerate(self._variables(scope)):
            child = _Scope(scope.mapping, scope.record, {**scope.vars, **new, "_index": index}, "")
            if self.when is None or not isinstance(self.when.resolve(child), _Missing):
                yield child

    def _variables(self, scope: _Scope) -> Iterator[dict[str, Any]]:
        if self.items is not None:
            found = self.items.resolve(scope)
            if isinstance(found, _Missing):
                return
            if not isinstance(found, list):
                raise _Bad(f"{self.items.text!r} is {_type(found)}, not a list")
            for element in found:
                yield {self.name: element}
        elif self.match is not None:
            yield from self._matches(scope)
        else:
            for value in self.values:
                yield {self.name: _own(value)}

    def _matches(self, scope: _Scope) -> Iterator[dict[str, Any]]:
        assert self.match is not None
        names = list(self.match.groupindex)
        seen: set[tuple[str, ...]] = set()
        for field, value in scope.record.items():
            if value is None or not isinstance(field, str):
                continue
            found = self.match.search(field)
            if found is None:
                continue
            groups = found.groupdict(default="")
            if any(scope.vars.get(n, groups[n]) != groups[n] for n in names):
                continue  # a group bound by an enclosing scope only matches its own value
            seen.add(tuple(groups[n] for n in names))
        for combination in sorted(seen):
            yield dict(zip(names, combination, strict=True))


# ------------------------------------------------------------------------------------------------
# Fields
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Field:
    """One output field: a rule that produces a value, then the missing/lookup modifiers."""

    name: str
    rule: str  # e.g. "from 'gps.lat'", for messages
    default: Any = _NOTHING
    required: bool = False
    lookup: _Lookup | None = None

    def produce(self, scope: _Scope) -> Any:
        raise NotImplementedError

    def evaluate(self, scope: _Scope) -> Any:
        field = scope.where + self.name
        try:
            value = self.produce(scope)
        except _Bad as e:
            raise MappingError(scope.mapping, field, self.rule, str(e)) from None
        if isinstance(value, _Missing):
            if self.default is not _NOTHING:
                return _own(self.default)
            if self.required:
                raise MappingError(scope.mapping, field, self.rule, f"{value.what} is missing")
            return None
        if self.lookup is None:
            return value
        try:
            return self.lookup.translate(value)
        except _Bad as e:
            raise MappingError(
                scope.mapping, field, f"lookup {self.lookup.name!r}", str(e)
            ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class _From(_Field):
    path: _Path

    def produce(self, scope: _Scope) -> Any:
        return _own(self.path.resolve(scope))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Const(_Field):
    value: Any

    def produce(self, scope: _Scope) -> Any:
        return _own(self.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Text(_Field):
    template: _Template

    def produce(self, scope: _Scope) -> Any:
        return self.template.render(scope)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sum(_Field):
    paths: tuple[_Path, ...]
    each: _Each | None = None

    def produce(self, scope: _Scope) -> Any:
        total: int | float = 0  # stays an int while every term is one
        for term_scope in [scope] if self.each is None else self.each.scopes(scope):
            for path in self.paths:
                value = path.resolve(term_scope)
                if isinstance(value, _Missing):
                    continue
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _Bad(f"{path.text!r} is {_type(value)}, not a number")
                total += value
        if isinstance(total, float) and not math.isfinite(total):
            raise _Bad("the sum is not a finite number")
        return total


@dataclass(frozen=True, slots=True, kw_only=True)
class _Count(_Field):
    path: _Path

    def produce(self, scope: _Scope) -> Any:
        value = self.path.resolve(scope)
        if isinstance(value, _Missing):
            return 0
        if not isinstance(value, list):
            raise _Bad(f"{self.path.text!r} is {_type(value)}, not a list")
        return len(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Object(_Field):
    fields: tuple[_Field, ...]
    each: _Each | None = None

    def produce(self, scope: _Scope) -> Any:
        prefix = scope.where + self.name
        if self.each is None:
            return _build(
                self.fields, _Scope(scope.mapping, scope.record, scope.vars, prefix + ".")
            )
        return [
            _build(self.fields, _Scope(s.mapping, s.record, s.vars, f"{prefix}[{i}]."))
            for i, s in enumerate(self.each.scopes(scope))
        ]


def _build(fields: Sequence[_Field], scope: _Scope) -> dict[str, Any]:
    return {f.name: f.evaluate(scope) for f in fields}


# ------------------------------------------------------------------------------------------------
# The compiled mapping
# ------------------------------------------------------------------------------------------------


class Mapping:
    """A compiled, validated mapping. Immutable and thread-safe; build it with compile_mapping."""

    def __init__(
        self,
        name: str,
        *,
        fields: tuple[_Field, ...],
        target_key: _Template,
        source_key: _Path | None = None,
        required: tuple[_Path, ...] = (),
        each: _Each | None = None,
        hook: tuple[str, Hook] | None = None,
        description: str = "",
    ) -> None:
        self.name = name
        self.description = description
        self._fields = fields
        self._target_key = target_key
        self._source_key = source_key
        self._required = required
        self._each = each
        self._hook = hook

    def __repr__(self) -> str:
        return f"<Mapping {self.name!r}>"

    def apply(self, record: dict[str, Any], key: str | None = None) -> list[Mapped]:
        """Map one record (its current field values) to its outputs, in a stable order.

        `key` is the record's key in its collection, available to templates as `{_key}`; without
        it `_key` is the record's own `_key` field, else its `source_key` field. Raises only
        MappingError, for anything about the record that the mapping cannot handle.
        """
        if not isinstance(record, dict):
            raise MappingError(
                self.name, None, "record", f"expected an object, got {_type(record)}"
            )
        variables: dict[str, Any] = {}
        if key is not None:
            variables["_key"] = key
        elif "_key" not in record and self._source_key is not None:
            found = self._source_key.resolve(_Scope(self.name, record, {}, ""))
            if not isinstance(found, _Missing):
                variables["_key"] = found
        top = _Scope(self.name, record, variables, "")
        for path in self._required:
            found = path.resolve(top)
            if isinstance(found, _Missing):
                raise MappingError(self.name, None, "required", f"{found.what} is missing")
        if self._each is None:
            scopes = [_Scope(self.name, record, {**variables, "_index": 0}, "")]
        else:
            try:
                scopes = list(self._each.scopes(top))
            except _Bad as e:
                raise MappingError(self.name, None, self._each.rule, str(e)) from None
        out: list[Mapped] = []
        seen: set[str] = set()
        for scope in scopes:
            payload = _build(self._fields, scope)
            payloads = [payload] if self._hook is None else self._call_hook(record, scope, payload)
            for part, item in enumerate(payloads):
                target_key = self._key_for(
                    _Scope(self.name, record, {**scope.vars, "_part": part}, "")
                )
                if target_key in seen:
                    raise MappingError(
                        self.name,
                        "target_key",
                        f"template {self._target_key.text!r}",
                        f"two outputs have the key {_short(target_key)}; add a variable that tells "
                        "them apart, such as {_index}",
                    )
                seen.add(target_key)
                out.append(Mapped(target_key, item))
        return out

    def _key_for(self, scope: _Scope) -> str:
        rule = f"template {self._target_key.text!r}"
        try:
            key = self._target_key.render(scope)
        except _Bad as e:
            raise MappingError(self.name, "target_key", rule, str(e)) from None
        if isinstance(key, _Missing):
            hint = " (pass key= to apply, or set source_key)" if key.what.endswith("{_key}") else ""
            raise MappingError(self.name, "target_key", rule, f"{key.what} is missing{hint}")
        if not key:
            raise MappingError(self.name, "target_key", rule, "the key is empty")
        return key

    def _call_hook(
        self, record: dict[str, Any], scope: _Scope, payload: dict[str, Any]
    ) -> list[dict[str, Any]]:
        assert self._hook is not None
        spec, function = self._hook
        rule = f"hook {spec!r}"
        try:
            own_record = _own(record)
            context = _own({**scope.vars, "_mapping": self.name, "_payload": payload})
        except _Bad as e:
            raise MappingError(self.name, None, rule, str(e)) from None
        try:
            result = function(own_record, context)
        except Exception as e:
            reason = f"raised {type(e).__name__}: {e}"
            raise MappingError(self.name, None, rule, _clip(reason)) from e
        results = result if isinstance(result, list) else [result]
        for item in results:
            if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
                raise MappingError(
                    self.name,
                    None,
                    rule,
                    f"returned {_type(result)}; expected an object with text keys, or a list of them",
                )
            # Sinks encode payloads as JSON; a datetime here would fail in the sink, over and over.
            try:
                problem = _json_problem(item, null_ok=True)
            except RecursionError:
                problem = "is nested too deeply"
            if problem is not None:
                raise MappingError(
                    self.name, None, rule, f"returned what JSON cannot carry: {problem}"
                )
        merged = []
        for item in results:
            one = copy.deepcopy(payload) if len(results) > 1 else payload
            one.update(item)
            merged.append(one)
        return merged


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Compiling: validate everything up front
# ------------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_HOOK = re.compile(rf"({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)")

_MAPPING_KEYS = (
    "description",
    "source_key",
    "target_key",
    "required",
    "each",
    "hook",
    "lookups",
    "fields",
)
_RULES = ("from", "const", "template", "sum", "count", "fields")
_MODIFIERS = ("each", "default", "required", "lookup", "lookup_default")
_EACH_KINDS = ("items", "values", "match")


def _json_problem(value: Any, null_ok: bool = False) -> str | None:
    """None if `value` can travel as JSON (what the sinks send), else why not. Config values cannot
    be null (TOML has none); hook results can."""
    if isinstance(value, str | bool | int) or (value is None and null_ok):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, list | dict):
        for inner in value.values() if isinstance(value, dict) else value:
            if (problem := _json_problem(inner, null_ok)) is not None:
                return problem
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            return "must have text keys"
        return None
    return f"must be text, a number, true/false, a list or a table, not {type(value).__name__}"


class _Compiler:
    """Turns one spec table into a Mapping, raising ConfigError with the key path on any problem."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.prefix = f"mappings.{name}"
        self.lookups: dict[str, _Lookup] = {}

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(self.source, key, reason)

    def table(self, value: Any, key: str, allowed: Sequence[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, got {_short(value)}")
        for sub in value:
            if allowed is not None and sub not in allowed:
                self.fail(f"{key}.{sub}", f"unknown key (known: {', '.join(allowed)})")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be non-empty text, got {_short(value)}")
        return value

    def json(self, value: Any, key: str) -> Any:
        if (problem := _json_problem(value)) is not None:
            self.fail(key, f"{problem}, got {_short(value)}")
        return value

    def template(self, value: Any, key: str) -> _Template:
        if not isinstance(value, str):
            self.fail(key, f"must be text, got {_short(value)}")
        try:
            return _Template(value, parse_template(value))
        except ValueError as e:
            self.fail(key, f"bad template {value!r}: {e}")

    def path(self, value: Any, key: str) -> _Path:
        text = self.text(value, key)
        pieces, depth, current = [], 0, ""
        for char in text:
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "." and depth <= 0:
                pieces.append(current)
                current = ""
            else:
                current += char
        pieces.append(current)
        segments: list[str | _Template] = []
        for piece in pieces:
            if not piece:
                self.fail(key, f"bad path {text!r}: empty name between dots")
            segment = self.template(piece, key)
            plain = all(isinstance(part, str) for part in segment.parts)
            segments.append("".join(map(str, segment.parts)) if plain else segment)
        return _Path(text, tuple(segments))

    def compile(self, spec: Any) -> Mapping:
        if not isinstance(self.name, str) or not self.name:
            self.fail("mappings", "a mapping needs a non-empty name")
        spec = self.table(spec, self.prefix, _MAPPING_KEYS)
        at = self.prefix + "."
        description = spec.get("description", "")
        if not isinstance(description, str):
            self.fail(at + "description", f"must be text, got {_short(description)}")
        for name, table in self.table(spec.get("lookups", {}), at + "lookups").items():
            where = f"{at}lookups.{name}"
            if not self.table(table, where):
                self.fail(where, "is empty")
            for value_key, value in table.items():
                self.json(value, f"{where}.{value_key}")
            self.lookups[name] = _Lookup(name, dict(table))
        source_key = (
            self.path(spec["source_key"], at + "source_key") if "source_key" in spec else None
        )
        target_key = self.template(spec.get("target_key", "{_key}"), at + "target_key")
        if not target_key.placeholders:
            self.fail(
                at + "target_key",
                "needs a placeholder: a fixed key would make every record overwrite one target record",
            )
        required = spec.get("required", [])
        if not isinstance(required, list):
            self.fail(at + "required", f"must be a list of source paths, got {_short(required)}")
        required_paths = tuple(self.path(p, f"{at}required[{i}]") for i, p in enumerate(required))
        each = self.each(spec["each"], at + "each") if "each" in spec else None
        hook = self.hook(spec["hook"], at + "hook") if "hook" in spec else None
        if "fields" not in spec and hook is None:
            self.fail(at + "fields", "is required (unless a hook makes the payload)")
        return Mapping(
            self.name,
            fields=self.fields(spec.get("fields", {}), at + "fields"),
            target_key=target_key,
            source_key=source_key,
            required=required_paths,
            each=each,
            hook=hook,
            description=description,
        )

    def fields(self, value: Any, key: str) -> tuple[_Field, ...]:
        table = self.table(value, key)
        return tuple(self.field(name, spec, f"{key}.{name}") for name, spec in table.items())

    def field(self, name: str, spec: Any, key: str) -> _Field:
        if not isinstance(spec, dict):
            self.fail(key, f'must be a table such as {{ from = "field" }}, got {_short(spec)}')
        spec = self.table(spec, key, _RULES + _MODIFIERS)
        rules = [rule for rule in _RULES if rule in spec]
        if len(rules) != 1:
            found = f"has {' and '.join(rules)}" if rules else "has none"
            self.fail(key, f"needs exactly one rule of {', '.join(_RULES)}; it {found}")
        (rule,) = rules
        at = key + "."
        modifiers = _FIELD_MODIFIERS[rule]
        for modifier in _MODIFIERS:
            if modifier in spec and modifier not in modifiers:
                goes = (
                    f"only goes with {', '.join(modifiers)}" if modifiers else "takes no modifiers"
                )
                self.fail(at + modifier, f"does not go with {rule} ({rule} {goes})")
        common: dict[str, Any] = {}
        if "default" in spec:
            common["default"] = self.json(spec["default"], at + "default")
        if "required" in spec:
            if not isinstance(spec["required"], bool):
                self.fail(at + "required", f"must be true or false, got {_short(spec['required'])}")
            if spec["required"] and "default" in spec:
                self.fail(at + "required", "cannot be true when a default is set")
            common["required"] = spec["required"]
        if "lookup_default" in spec and "lookup" not in spec:
            self.fail(at + "lookup_default", "needs a lookup table (lookup = NAME)")
        if "lookup" in spec:
            table = spec["lookup"]
            if not isinstance(table, str) or table not in self.lookups:
                known = ", ".join(self.lookups) or "none"
                self.fail(at + "lookup", f"unknown lookup table {_short(table)} (known: {known})")
            lookup = self.lookups[table]
            if "lookup_default" in spec:
                fallback = self.json(spec["lookup_default"], at + "lookup_default")
                lookup = _Lookup(lookup.name, lookup.table, fallback)
            common["lookup"] = lookup
        each = self.each(spec["each"], at + "each") if "each" in spec else None
        value = spec[rule]
        if rule == "from":
            path = self.path(value, at + "from")
            return _From(name=name, rule=f"from {path.text!r}", path=path, **common)
        if rule == "const":
            return _Const(name=name, rule="const", value=self.json(value, at + "const"))
        if rule == "template":
            template = self.template(value, at + "template")
            return _Text(name=name, rule=f"template {value!r}", template=template, **common)
        if rule == "sum":
            if isinstance(value, str):
                paths: tuple[_Path, ...] = (self.path(value, at + "sum"),)
            elif isinstance(value, list) and value:
                paths = tuple(self.path(p, f"{at}sum[{i}]") for i, p in enumerate(value))
            else:
                self.fail(
                    at + "sum", f"must be a source path or a list of them, got {_short(value)}"
                )
            return _Sum(name=name, rule=f"sum {value!r}", paths=paths, each=each)
        if rule == "count":
            path = self.path(value, at + "count")
            return _Count(name=name, rule=f"count {path.text!r}", path=path)
        children = self.fields(value, at + "fields")
        return _Object(name=name, rule=each.rule if each else "fields", fields=children, each=each)

    def each(self, value: Any, key: str) -> _Each:
        spec = self.table(value, key, (*_EACH_KINDS, "as", "when"))
        kinds = [kind for kind in _EACH_KINDS if kind in spec]
        if len(kinds) != 1:
            found = f"has {' and '.join(kinds)}" if kinds else "has none"
            self.fail(key, f"needs exactly one of {', '.join(_EACH_KINDS)}; it {found}")
        (kind,) = kinds
        at = key + "."
        when = self.path(spec["when"], at + "when") if "when" in spec else None
        name = spec.get("as", "item")
        if "as" in spec and kind == "match":
            self.fail(
                at + "as", "does not go with match (the regex's named groups name the variables)"
            )
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
            self.fail(
                at + "as",
                f"must be a name of letters, digits and _ starting with a letter, got {_short(name)}",
            )
        if kind == "items":
            items = self.path(spec["items"], at + "items")
            return _Each(f"each.items {items.text!r}", items=items, name=name, when=when)
        if kind == "values":
            values = spec["values"]
            if not isinstance(values, list) or not values:
                self.fail(at + "values", f"must be a non-empty list, got {_short(values)}")
            self.json(values, at + "values")
            return _Each(
                f"each.values {_short(values)}", values=tuple(values), name=name, when=when
            )
        text = self.text(spec["match"], at + "match")
        try:
            pattern = re.compile(text)
        except (re.error, OverflowError) as e:
            self.fail(at + "match", f"not a valid regular expression: {e}")
        if not pattern.groupindex:
            self.fail(at + "match", "needs a named group, such as (?P<fy>\\d{4}), to make scopes")
        for group in pattern.groupindex:
            if group.startswith("_"):
                self.fail(at + "match", f"group name {group!r}: names starting with _ are reserved")
        return _Each(f"each.match {text!r}", match=pattern, when=when)

    def hook(self, value: Any, key: str) -> tuple[str, Hook]:
        text = self.text(value, key)
        parsed = _HOOK.fullmatch(text)
        if parsed is None:
            self.fail(key, f"must be 'package.module:function', got {text!r}")
        module_name, attribute = parsed.groups()
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or whatever the module raises while importing
            self.fail(key, f"cannot import {module_name!r}: {type(e).__name__}: {_clip(str(e))}")
        for part in attribute.split("."):
            if not hasattr(target, part):
                self.fail(key, f"module {module_name!r} has no {attribute!r}")
            target = getattr(target, part)
        if not callable(target):
            self.fail(key, f"{text!r} is not callable")
        return text, target


_FIELD_MODIFIERS: dict[str, tuple[str, ...]] = {
    "from": ("default", "required", "lookup", "lookup_default"),
    "template": ("default", "required", "lookup", "lookup_default"),
    "const": (),
    "sum": ("each",),
    "count": (),
    "fields": ("each",),
}


def compile_mapping(name: str, spec: dict[str, Any], source: str | Path = "<config>") -> Mapping:
    """Validate a mapping spec (a `[mappings.NAME]` TOML table) and compile it.

    Everything that can be checked without a record is checked here, so a bad mapping stops HQ at
    start rather than dead-lettering every record: ConfigError(source, "mappings.NAME.<key path>",
    reason) for unknown keys, wrong types, an unknown lookup table, bad template or path syntax, a
    bad regular expression, or a hook that cannot be imported or called.
    """
    return _Compiler(name, str(source)).compile(spec)
