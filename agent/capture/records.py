"""Turning what apps hand the agent (JSON objects, NDJSON lines) into validated writes.

One parser for every capture path (local API, CLI, drop folder), so a record is judged the same way
whichever door it came through. Errors name the source, line, record key, field and rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from agent.store import Write

MAX_RECORD_BYTES = 256 * 1024
MAX_KEY_LENGTH = 200
FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
OP_FIELD = "_op"


@dataclass(frozen=True)
class RecordError:
    """Why one input record was refused; nothing of that input was written."""

    message: str
    rule: str
    line: int | None = None
    key: str | None = None
    field: str | None = None
    source: str | None = None

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
        return {k: v for k, v in asdict(self) | {"text": str(self)}.items() if v is not None}


class RejectedInput(Exception):
    """One or more input records were refused; carries every error found."""

    def __init__(self, errors: list[RecordError]) -> None:
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(shown + more)


def _check_value(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}: NaN and infinity cannot be stored"
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return f"{path}: integer out of the 64-bit range"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (reason := _check_value(item, f"{path}[{i}]")) is not None:
                return reason
    if isinstance(value, dict):
        for name, item in value.items():
            if (reason := _check_value(item, f"{path}.{name}")) is not None:
                return reason
    return None


def record_to_write(
    obj: Any,
    collection: str,
    key_field: str,
    *,
    key: str | None = None,
    line: int | None = None,
    source: str | None = None,
) -> Write:
    """Validate one record object; raise RejectedInput naming what is wrong."""

    def fail(message: str, rule: str, field: str | None = None, at_key: str | None = None) -> None:
        raise RejectedInput([RecordError(message, rule, line, at_key, field, source)])

    if not isinstance(obj, dict):
        fail("a record must be a JSON object", "record_is_object")
    raw_key = obj.get(key_field, key)
    if isinstance(raw_key, int) and not isinstance(raw_key, bool):
        raw_key = str(raw_key)
    if not isinstance(raw_key, str) or not raw_key.strip():
        fail(f"the key field {key_field!r} is missing or empty", "key_required", key_field)
    assert isinstance(raw_key, str)
    if len(raw_key) > MAX_KEY_LENGTH:
        fail(f"key longer than {MAX_KEY_LENGTH} characters", "key_length", key_field)
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
        if not FIELD_NAME.match(name):
            fail(
                "field names start with a letter and hold letters, digits and _ (64 at most)",
                "field_name",
                name,
                raw_key,
            )
        if (reason := _check_value(value, name)) is not None:
            fail(reason, "value_storable", name, raw_key)
        fields[name] = value
    if op == "delete":
        return Write(collection, raw_key, "delete", {})
    size = len(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_RECORD_BYTES:
        fail(
            f"record is {size} bytes, the limit is {MAX_RECORD_BYTES}", "record_size", None, raw_key
        )
    return Write(collection, raw_key, "upsert", fields)


def parse_ndjson(
    lines: Iterable[bytes | str], collection: str, key_field: str, *, source: str | None = None
) -> list[Write]:
    """Parse NDJSON; every bad line is reported (with its number) and none of the input is kept."""
    writes: list[Write] = []
    errors: list[RecordError] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            errors.append(RecordError(f"not valid JSON: {e}", "json", number, source=source))
            continue
        try:
            writes.append(record_to_write(obj, collection, key_field, line=number, source=source))
        except RejectedInput as e:
            errors.extend(e.errors)
    if errors:
        raise RejectedInput(errors)
    return writes
