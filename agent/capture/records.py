"""Turning what apps hand the agent (JSON objects, NDJSON lines) into validated writes.

One parser for every capture path (local API, CLI, drop folder), so a record is judged the same way
whichever door it came through. Errors name the source, line, record key, field and rule.

Names, keys, values and sizes are judged by protocol.limits, the rules HQ applies to every change
it receives: a record the agent accepts here is never refused by HQ for them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from agent.store import Write
from protocol.limits import (
    MAX_CHANGE_BYTES,
    MAX_KEY_BYTES,
    MAX_VALUE_DEPTH,
    NAME,
    collection_problem,
    field_name_problem,
    key_problem,
    size_problem,
    value_problem,
)

# The limits of protocol.limits, under the names the agent's callers know.
MAX_RECORD_BYTES = MAX_CHANGE_BYTES
MAX_KEY_LENGTH = MAX_KEY_BYTES
FIELD_NAME = NAME
OP_FIELD = "_op"
_PLAIN = frozenset({str, int, bool, type(None), float})


@dataclass(frozen=True)
class RecordError:
    """Why one input record was refused; nothing of that input was written."""

    message: str
    rule: str
    line: int | None = None
    key: str | None = None
    field: str | None = None
    source: str | None = None
    stage: str | None = None  # "schema" or "rules" when the collections file refused it

    def __str__(self) -> str:
        where = [
            part
            for part in (
                self.source,
                f"line {self.line}" if self.line is not None else None,
                f"record {self.key!r}" if self.key is not None else None,
                f"field {self.field!r}" if self.field is not None else None,
            )
            if part
        ]
        return (", ".join(where) + ": " if where else "") + f"{self.message} [{self.rule}]"

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self) | {"text": str(self)}
        return {k: v for k, v in fields.items() if v is not None}


class RejectedInput(Exception):
    """One or more input records were refused; carries every error found."""

    def __init__(self, errors: list[RecordError]) -> None:
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(shown + more)


_valid_names: set[str] = set()
_valid_collections: set[str] = set()


def _valid_name(name: str) -> bool:
    """Field names are checked once per process, not once per record."""
    if field_name_problem(name) is not None:
        return False
    if len(_valid_names) < 10_000:
        _valid_names.add(name)
    return True


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a storable number")


def _checked_int(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer {text[:30]} is out of the 64-bit range")
    return value


_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
# 19 digits can already overflow int64 (-9223372036854775809): such input takes the exact parser.
_LONG_NUMBER = b"0" * 19
#: A record is one level more than its field values (protocol.limits.MAX_VALUE_DEPTH).
MAX_DEPTH = MAX_VALUE_DEPTH + 1


def _refuse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def loads_record(text: str | bytes) -> Any:
    """Parse JSON, refusing what cannot be stored and sent: NaN, infinity, integers beyond 64 bits,
    lone surrogates, nesting deeper than MAX_DEPTH.

    orjson (several times faster than json) refuses NaN and lone surrogates but reads an over-long
    integer as a float, silently; input holding a run of 19+ digits therefore goes through the exact
    stdlib parser, whose result is checked by encoding it with orjson.
    """
    data = text.encode() if isinstance(text, str) else text
    if _LONG_NUMBER not in data.translate(_DIGITS_AS_ZERO):
        value = orjson.loads(data)
    else:
        try:
            value = json.loads(
                data,
                parse_constant=_refuse_constant,
                parse_int=_checked_int,
                parse_float=_refuse_float,
            )
        except RecursionError as e:
            raise ValueError(f"nesting deeper than {MAX_DEPTH} levels") from e
        try:
            orjson.dumps(value)
        except (TypeError, orjson.JSONEncodeError) as e:
            raise ValueError(f"not storable: {e}") from e
    # Brackets counted first (C speed): only input with that many can be nested too deep.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
    return value


def record_to_write(
    obj: Any,
    collection: str,
    key_field: str,
    *,
    key: str | None = None,
    line: int | None = None,
    source: str | None = None,
    size: int | None = None,
) -> Write:
    """Validate one record object (parsed by `loads_record`); raise RejectedInput naming what is wrong.

    `size` is the record's encoded size when the caller has it (an NDJSON line), which spares
    encoding it again to check the limit.
    """

    def fail(message: str, rule: str, field: str | None = None, at_key: str | None = None) -> None:
        raise RejectedInput([RecordError(message, rule, line, at_key, field, source)])

    if collection not in _valid_collections:
        if (problem := collection_problem(collection)) is not None:
            fail(problem.message, problem.rule)
        if len(_valid_collections) < 1_000:
            _valid_collections.add(collection)
    if not isinstance(obj, dict):
        fail("a record must be a JSON object", "record_is_object")
    raw_key = obj.get(key_field, key)
    if isinstance(raw_key, int) and not isinstance(raw_key, bool):
        raw_key = str(raw_key)
    if (problem := key_problem(raw_key)) is not None:
        if problem.rule == "key_required":
            fail(f"the key field {key_field!r} is missing or empty", problem.rule, key_field)
        fail(problem.message, problem.rule, key_field)
    assert isinstance(raw_key, str)
    if key is not None and raw_key != key:
        fail(
            f"body has {key_field}={raw_key!r} but the URL names {key!r}", "key_matches", key_field
        )
    op = obj.get(OP_FIELD, "upsert")
    if op not in ("upsert", "delete"):
        fail(f"{OP_FIELD} must be 'upsert' or 'delete', not {op!r}", "op_valid", OP_FIELD, raw_key)
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        if name == OP_FIELD:
            continue
        if name not in _valid_names and not _valid_name(name):
            fail(
                "field names start with a letter and hold letters, digits and _ (64 at most)",
                "field_name",
                name,
                raw_key,
            )
        if type(value) not in _PLAIN and (problem := value_problem(name, value)) is not None:
            fail(problem.message, problem.rule, name, raw_key)
        fields[name] = value
    if op == "delete":
        return Write(collection, raw_key, "delete", {})
    # `size` (an NDJSON line's length) bounds the JSON of the fields unless numbers were written
    # shorter than JSON writes them back ("1e5" is 100000.0): measured exactly when it might not.
    if size is None or size * 8 > MAX_RECORD_BYTES:
        problem = size_problem(fields)
        if problem is not None:
            fail(problem.message, problem.rule, None, raw_key)
    return Write(collection, raw_key, "upsert", fields)


def parse_ndjson(
    lines: Iterable[bytes | str],
    collection: str,
    key_field: str,
    *,
    source: str | None = None,
    check: Callable[..., list[RecordError]] | None = None,
    on_refused: Callable[[Any, int, list[RecordError]], None] | None = None,
) -> list[Write]:
    """Parse NDJSON; every bad line is reported (with its number) and none of the input is kept.

    `check(write, line=, source=)` adds the collection's own rules (agent.capture.validate). With
    `on_refused(record, line, errors)`, a well-formed record that breaks those rules is handed to it
    (for the error queue) instead of refusing the whole input.
    """
    writes: list[Write] = []
    errors: list[RecordError] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = loads_record(line)
        except ValueError as e:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
            errors.append(RecordError(f"not valid JSON: {e}", "json", number, source=source))
            continue
        try:
            write = record_to_write(
                obj, collection, key_field, line=number, source=source, size=len(line)
            )
        except RejectedInput as e:
            errors.extend(e.errors)
            continue
        if check is not None and (refused := check(write, line=number, source=source)):
            if on_refused is not None:
                on_refused(obj, number, refused)
            else:
                errors.extend(refused)
            continue
        writes.append(write)
    if errors:
        raise RejectedInput(errors)
    return writes
