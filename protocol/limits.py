"""What one change may hold: the names, keys, sizes and values both sides accept.

The agent applies these rules at the edge, before a write is stored (agent.capture.records), and HQ
applies the same functions to every change of a batch before anything is stored
(hq_server.ingest), so HQ never holds what an agent would refuse and an agent never queues what HQ
would refuse. docs/protocol.md section 10.1 lists them; each refusal names its rule:

    rule                 what it refuses
    collection_reserved  a collection whose name starts with "_" (HQ's own, e.g. _references)
    collection_name      a collection name outside NAME_PATTERN (empty, "../x", "a b", 65+ chars)
    key_required         an empty key, or one of whitespace only
    key_chars            a key holding a control character (NUL, newline, tab, DEL, C1) or
                         U+2028/U+2029 (line and paragraph separators)
    key_length           a key longer than MAX_KEY_BYTES bytes of UTF-8
    field_name           a field name outside NAME_PATTERN (empty, "_op", "a\\x00", "x y")
    value_type           a value JSON cannot carry: a byte string, an extension type, NaN or
                         infinity, a map key that is not a string, an integer outside
                         -2^63 .. 2^64 - 1
    value_depth          a value nesting arrays and maps deeper than MAX_VALUE_DEPTH
    record_size          fields of one change over MAX_CHANGE_BYTES, encoded as compact JSON

Pure functions, no I/O: each returns the first Problem found, or None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

#: Collection and field names: a letter, then letters, digits and _ (64 characters at most). The
#: same shape as the names a collections file declares (protocol.collections.NAME).
NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,63}"
NAME = re.compile(NAME_PATTERN)
#: Collections starting with this are HQ's (reference tables): nodes may not write them.
RESERVED_PREFIX = "_"
#: Longest record key, in bytes of UTF-8. Every key the agent accepted before this limit existed
#: (200 characters, so at most 800 bytes) still fits, and so does a summary record's key.
MAX_KEY_BYTES = 1024
#: Largest field data of one change: its `fields` map encoded as compact JSON (orjson), in bytes.
MAX_CHANGE_BYTES = 256 * 1024
#: Deepest nesting of arrays and maps inside one field value (a flat list is depth 1).
MAX_VALUE_DEPTH = 32
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
SHOWN_CHARS = 40

# Unicode line and paragraph separators: not control characters, but line breaks to many readers.
_SEPARATORS = frozenset("\u2028\u2029")
_SCALARS = frozenset({str, bool, type(None)})


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: its name (the table above), a sentence, and the field it concerns."""

    rule: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"field {self.field!r}: " if self.field is not None else ""
        return f"{where}{self.message} [{self.rule}]"


def shown(text: str) -> str:
    """A name or key as a message shows it: repr, cut to SHOWN_CHARS characters."""
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…")


def collection_problem(name: Any) -> Problem | None:
    if not isinstance(name, str):
        return Problem("collection_name", "a collection name must be a string")
    if name.startswith(RESERVED_PREFIX):
        return Problem(
            "collection_reserved",
            f"collection {shown(name)} is reserved for HQ (names starting with "
            f"{RESERVED_PREFIX!r})",
        )
    if NAME.fullmatch(name) is None:
        return Problem(
            "collection_name",
            f"collection {shown(name)}: names start with a letter and hold letters, digits and _ "
            "(64 at most)",
        )
    return None


def refused_in_keys(char: str) -> bool:
    """A character no key may hold: a control character (Unicode Cc) or U+2028/U+2029."""
    return unicodedata.category(char) == "Cc" or char in _SEPARATORS


def key_problem(key: Any) -> Problem | None:
    if not isinstance(key, str) or not key.strip():
        return Problem("key_required", "the record key is missing, empty or only whitespace")
    if not key.isprintable() and any(map(refused_in_keys, key)):
        return Problem(
            "key_chars",
            f"key {shown(key)} holds a control character (NUL, newline, tab, ...) or a line "
            "separator",
        )
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        return Problem(
            "key_length",
            f"key of {len(key.encode())} bytes (UTF-8); the limit is {MAX_KEY_BYTES}",
        )
    return None


def field_name_problem(name: Any) -> Problem | None:
    if isinstance(name, str) and NAME.fullmatch(name) is not None:
        return None
    text = name if isinstance(name, str) else repr(name)
    return Problem(
        "field_name",
        "field names start with a letter and hold letters, digits and _ (64 at most)",
        text[:SHOWN_CHARS],
    )


def value_problem(name: str, value: Any) -> Problem | None:
    """Whether field `name`'s value is one JSON carries (records are stored and delivered as JSON)."""
    return _nested_problem(name, value, 0)


def _nested_problem(name: str, value: Any, depth: int) -> Problem | None:
    kind = type(value)
    if kind in _SCALARS:
        return None
    if kind is int:
        if MIN_INT <= value <= MAX_INT:
            return None
        return Problem("value_type", f"integer out of range {MIN_INT} .. {MAX_INT}", name)
    if kind is float:
        if math.isfinite(value):
            return None
        return Problem("value_type", f"{value} is not a JSON number", name)
    if kind is list or kind is dict:
        if depth >= MAX_VALUE_DEPTH:
            return Problem(
                "value_depth", f"arrays and maps nest deeper than {MAX_VALUE_DEPTH} levels", name
            )
        if kind is dict:
            for k, v in value.items():
                if type(k) is not str:
                    return Problem("value_type", "a map key is not a string", name)
                if (problem := _nested_problem(name, v, depth + 1)) is not None:
                    return problem
            return None
        for item in value:
            if (problem := _nested_problem(name, item, depth + 1)) is not None:
                return problem
        return None
    what = "a byte string" if kind is bytes else f"a {kind.__name__}"
    return Problem("value_type", f"{what} is not a JSON value", name)


def fields_size(fields: Mapping[str, Any]) -> int:
    """Bytes of `fields` as compact JSON: what MAX_CHANGE_BYTES bounds. Values must be JSON values
    (check them with `value_problem` first)."""
    return len(orjson.dumps(fields))


def size_problem(fields: Mapping[str, Any]) -> Problem | None:
    size = fields_size(fields)
    if size > MAX_CHANGE_BYTES:
        return Problem(
            "record_size", f"fields are {size} bytes as JSON, the limit is {MAX_CHANGE_BYTES}"
        )
    return None


# Names found valid, remembered (bounded) so that a batch of records with the same fields checks
# each name once rather than once per change: HQ runs this for every change it ingests.
_GOOD_NAMES: set[str] = set()
_GOOD_COLLECTIONS: set[str] = set()
_REMEMBERED = 10_000


def fields_problem(fields: Mapping[Any, Any]) -> Problem | None:
    """The first broken rule among the names, values and size of one change's fields."""
    good = _GOOD_NAMES
    for name, value in fields.items():
        if type(name) is not str or name not in good:
            if (problem := field_name_problem(name)) is not None:
                return problem
            if len(good) < _REMEMBERED:
                good.add(name)
        if type(value) not in _SCALARS and (problem := value_problem(name, value)) is not None:
            return problem
    return size_problem(fields)


def change_problem(collection: Any, key: Any, fields: Mapping[Any, Any]) -> Problem | None:
    """The first broken rule of one change: collection, key, then its fields."""
    if type(collection) is not str or collection not in _GOOD_COLLECTIONS:
        if (problem := collection_problem(collection)) is not None:
            return problem
        if len(_GOOD_COLLECTIONS) < _REMEMBERED:
            _GOOD_COLLECTIONS.add(collection)
    return key_problem(key) or fields_problem(fields)
