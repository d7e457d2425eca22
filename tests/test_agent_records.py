"""agent.capture.records: the one gate every captured record passes (API, CLI, drop folder).

Good input becomes writes; every bad line is reported with its line number, record key, field and
rule, and none of the input is kept. Numbers that cannot be stored and sent exactly (NaN,
infinity, integers over 64 bits) are refused rather than rounded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from agent_fixtures import COLLECTION, KEY_FIELD

from agent.capture.records import (
    MAX_KEY_LENGTH,
    MAX_RECORD_BYTES,
    RecordError,
    RejectedInput,
    loads_record,
    parse_ndjson,
    record_to_write,
)
from agent.store import Write


def ndjson(*records: Any) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]


def rejected(lines: list[bytes]) -> list[RecordError]:
    with pytest.raises(RejectedInput) as caught:
        parse_ndjson(lines, COLLECTION, KEY_FIELD, source="upload.ndjson")
    return caught.value.errors


def test_good_lines_become_writes_in_order() -> None:
    lines = ndjson(
        {KEY_FIELD: "b1", "name": "Amina", "household_size": 5, "tags": ["a", "b"]},
        {KEY_FIELD: 42, "name": "Int key"},
        {KEY_FIELD: "b1", "_op": "delete"},
        {KEY_FIELD: "b3", "_op": "upsert", "nested": {"x": [1, 2.5, None, True]}},
    )
    lines.insert(2, b"   ")  # blank lines are skipped
    lines.append(b"")
    writes = parse_ndjson(lines, COLLECTION, KEY_FIELD)
    assert writes == [
        Write(
            COLLECTION,
            "b1",
            "upsert",
            {KEY_FIELD: "b1", "name": "Amina", "household_size": 5, "tags": ["a", "b"]},
        ),
        Write(COLLECTION, "42", "upsert", {KEY_FIELD: 42, "name": "Int key"}),
        Write(COLLECTION, "b1", "delete", {}),
        Write(COLLECTION, "b3", "upsert", {KEY_FIELD: "b3", "nested": {"x": [1, 2.5, None, True]}}),
    ]


def test_unicode_and_crlf_lines_are_accepted() -> None:
    lines = [f'{{"{KEY_FIELD}": "ü1", "name": "Nguyễn Thị Ánh"}}\r\n'.encode()]
    (write,) = parse_ndjson(lines, COLLECTION, KEY_FIELD)
    assert write.key == "ü1" and write.fields["name"] == "Nguyễn Thị Ánh"


BAD_LINES: list[tuple[bytes, str, str | None, str | None]] = [
    # (line, rule, key named, field named)
    (b'{"beneficiary_id": "b2", "name": ', "json", None, None),
    (b'{"name": "no key"}', "key_required", None, KEY_FIELD),
    (b'{"beneficiary_id": "  ", "name": "blank key"}', "key_required", None, KEY_FIELD),
    (b'{"beneficiary_id": true}', "key_required", None, KEY_FIELD),
    (b'{"beneficiary_id": "b2", "bad-name": 1}', "field_name", "b2", "bad-name"),
    (b'{"beneficiary_id": "b2", "_private": 1}', "field_name", "b2", "_private"),
    (b'{"beneficiary_id": "b2", "v": NaN}', "json", None, None),
    (b'{"beneficiary_id": "b2", "v": Infinity}', "json", None, None),
    (b'{"beneficiary_id": "b2", "v": 1180591620717411303424}', "json", None, None),  # 2**70
    (b'{"beneficiary_id": "b2", "v": 1e400}', "json", None, None),
    (b'{"beneficiary_id": "b2", "_op": "merge"}', "op_valid", "b2", "_op"),
    (b'["not", "an", "object"]', "record_is_object", None, None),
    (b'"just a string"', "record_is_object", None, None),
    (b'{"beneficiary_id": "' + b"k" * (MAX_KEY_LENGTH + 1) + b'"}', "key_length", None, KEY_FIELD),
    (b'\xff{"beneficiary_id": "b2"}', "json", None, None),
]


@pytest.mark.parametrize(("bad", "rule", "key", "field"), BAD_LINES)
def test_a_bad_line_is_named_and_nothing_is_kept(
    bad: bytes, rule: str, key: str | None, field: str | None
) -> None:
    good = ndjson({KEY_FIELD: "b1", "name": "ok"}, {KEY_FIELD: "b3", "name": "ok"})
    (error,) = rejected([good[0], bad, good[1]])
    assert (error.line, error.rule, error.key, error.field) == (2, rule, key, field)
    assert error.source == "upload.ndjson"
    text = str(error)
    assert "upload.ndjson" in text and "line 2" in text and f"[{rule}]" in text
    if field is not None:
        assert repr(field) in text


def test_record_error_to_json_names_everything() -> None:
    error = RecordError("bad", "field_name", line=3, key="b1", field="x-y", source="f.ndjson")
    assert error.to_json() == {
        "message": "bad",
        "rule": "field_name",
        "line": 3,
        "key": "b1",
        "field": "x-y",
        "source": "f.ndjson",
        "text": "f.ndjson, line 3, record 'b1', field 'x-y': bad [field_name]",
    }
    assert RecordError("bad json", "json").to_json() == {
        "message": "bad json",
        "rule": "json",
        "text": "bad json [json]",
    }


def test_an_oversize_record_is_refused_with_its_key() -> None:
    big = {KEY_FIELD: "big", "notes": "x" * MAX_RECORD_BYTES}
    (error,) = rejected(ndjson({KEY_FIELD: "small"}, big))
    assert (error.line, error.rule, error.key) == (2, "record_size", "big")
    assert str(MAX_RECORD_BYTES) in error.message
    with pytest.raises(RejectedInput, match="record_size"):
        record_to_write(big, COLLECTION, KEY_FIELD)


def test_every_bad_line_is_reported_at_once() -> None:
    lines = ndjson(
        {KEY_FIELD: "b1"},
        b"{oops",
        {"name": "keyless"},
        {KEY_FIELD: "b4", "9lives": 1},
        {KEY_FIELD: "b5"},
    )
    errors = rejected(lines)
    assert [(e.line, e.rule) for e in errors] == [
        (2, "json"),
        (3, "key_required"),
        (4, "field_name"),
    ]
    with pytest.raises(RejectedInput) as caught:
        parse_ndjson(lines, COLLECTION, KEY_FIELD)
    assert "line 2" in str(caught.value) and "line 4" in str(caught.value)


def test_many_errors_are_summarised_in_the_message() -> None:
    lines = [b"{" for _ in range(12)]
    with pytest.raises(RejectedInput) as caught:
        parse_ndjson(lines, COLLECTION, KEY_FIELD)
    assert len(caught.value.errors) == 12
    assert "(and 7 more)" in str(caught.value)


def test_record_to_write_checks_the_url_key_and_fills_it_in() -> None:
    write = record_to_write({"name": "x"}, COLLECTION, KEY_FIELD, key="b7")
    assert write == Write(COLLECTION, "b7", "upsert", {"name": "x"})
    assert record_to_write({KEY_FIELD: 7}, COLLECTION, KEY_FIELD, key="7").key == "7"
    with pytest.raises(RejectedInput) as caught:
        record_to_write({KEY_FIELD: "b8"}, COLLECTION, KEY_FIELD, key="b7")
    (error,) = caught.value.errors
    assert (error.rule, error.field) == ("key_matches", KEY_FIELD)
    assert "'b8'" in error.message and "'b7'" in error.message


# ---- exact numbers --------------------------------------------------------------------------


def test_big_integers_are_exact_or_refused_never_rounded() -> None:
    nineteen = 9_223_372_036_854_775_807  # 2**63 - 1: 19 digits, orjson's fast path
    assert loads_record(f'{{"v": {nineteen}}}')["v"] == nineteen
    assert loads_record(b'{"v": 1234567890123456789}')["v"] == 1234567890123456789
    u64_max = 2**64 - 1  # 20 digits: the exact (stdlib) path
    assert loads_record(f'{{"v": {u64_max}}}')["v"] == u64_max
    assert type(loads_record(f'{{"v": {u64_max}}}')["v"]) is int
    with pytest.raises(ValueError, match="64-bit"):
        loads_record(f'{{"v": {2**64}}}')
    with pytest.raises(ValueError, match="64-bit"):
        loads_record(b'{"v": 123456789012345678901}')  # 21 digits
    with pytest.raises(ValueError, match="64-bit"):
        loads_record(f'{{"v": {-(2**63) - 10**6}1}}')  # 21 digits, negative
    assert loads_record(f'{{"v": {-(2**63)}}}')["v"] == -(2**63)


def test_digit_runs_inside_strings_parse_exactly() -> None:
    text = '{"id": "x", "ref": "1234567890123456789012345", "n": 7, "f": 0.5}'
    assert loads_record(text) == {
        "id": "x",
        "ref": "1234567890123456789012345",
        "n": 7,
        "f": 0.5,
    }
    # The exact path keeps NaN out as the fast one does.
    with pytest.raises(ValueError, match="not a storable number"):
        loads_record('{"ref": "12345678901234567890123", "v": NaN}')


def test_a_negative_integer_below_int64_is_refused_not_rounded() -> None:
    with pytest.raises(ValueError, match="64-bit"):
        loads_record(b'{"v": -9223372036854775809}')


def test_an_overflowing_float_is_refused_on_the_exact_path_too() -> None:
    with pytest.raises(ValueError):
        loads_record(b'{"ref": "12345678901234567890", "v": 1e400}')


def test_a_lone_surrogate_is_refused_on_the_exact_path_too() -> None:
    with pytest.raises(RejectedInput):
        parse_ndjson(
            [b'{"beneficiary_id": "s", "v": "\\ud800", "ref": "12345678901234567890"}'],
            COLLECTION,
            KEY_FIELD,
        )


def test_absurd_nesting_on_the_exact_path_is_a_line_error() -> None:
    line = b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000
    with pytest.raises(RejectedInput) as caught:
        parse_ndjson([line], COLLECTION, KEY_FIELD)
    assert caught.value.errors[0].line == 1


def test_nesting_deeper_than_the_store_can_encode_is_refused() -> None:
    line = b'{"beneficiary_id": "deep", "v": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    with pytest.raises(RejectedInput):
        parse_ndjson([line], COLLECTION, KEY_FIELD)
