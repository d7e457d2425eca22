"""validate(): every generated record passes the example config; each type and each rule has a
passing and a failing case whose Violation names the field, the rule and the problem; and no
JSON-like input makes it raise."""

from __future__ import annotations

import copy
import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples

from agent.fieldgen import beneficiaries, distributions
from protocol.collections import (
    Collection,
    CollectionsConfig,
    ReferenceTable,
    collections_from_dict,
    load_collections,
)
from protocol.validation import MAX_VIOLATIONS, Violation, validate

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "collections.example.toml"
TODAY = dt.date(2026, 11, 25)
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
CONFIG = load_collections(EXAMPLE)
BEN = CONFIG["beneficiaries"]
DIST = CONFIG["distributions"]
REFS = CONFIG.references


def check(collection: Collection, record: Any, refs: Any = REFS, **kwargs: Any) -> list[Violation]:
    return validate(collection, record, references=refs, today=TODAY, now=NOW, **kwargs)


def beneficiary(index: int = 0) -> dict[str, Any]:
    return next(beneficiaries(1, start=index))


def distribution(index: int = 0) -> dict[str, Any]:
    return next(distributions(1, start=index))


def only(violations: list[Violation]) -> Violation:
    assert len(violations) == 1, violations
    return violations[0]


# ------------------------------------------------------------------------------------------------
# Generated records.
# ------------------------------------------------------------------------------------------------


def test_every_generated_beneficiary_passes() -> None:
    failures = [(r["beneficiary_id"], v) for r in beneficiaries(2000) if (v := check(BEN, r))]
    assert not failures, failures[:3]


def test_every_generated_distribution_passes() -> None:
    failures = [(r["distribution_id"], v) for r in distributions(2000) if (v := check(DIST, r))]
    assert not failures, failures[:3]


def test_validation_leaves_the_record_unchanged() -> None:
    record = beneficiary(3)
    before = copy.deepcopy(record)
    record["household_size"] = 99
    before["household_size"] = 99
    check(BEN, record)
    assert record == before


# ------------------------------------------------------------------------------------------------
# Schema: each type, passing and failing.
# ------------------------------------------------------------------------------------------------


def one_field(spec: str, *, extra: str = "", references: str = "") -> CollectionsConfig:
    text = f"""
{references}
[collections.things]
key = "id"
[collections.things.fields]
id = {{ type = "string" }}
f = {spec}
{extra}
"""
    return collections_from_dict(tomllib.loads(text))


TYPE_CASES: list[tuple[str, list[Any], list[tuple[Any, str, str]]]] = [
    (
        '{ type = "string", min_length = 2, max_length = 5, pattern = "[a-z]+" }',
        ["abc", "ab", "abcde"],
        [
            (5, "type", "f must be a string, got 5"),
            ("a", "min_length", "f must be at least 2 characters long, got 1"),
            ("abcdef", "max_length", "f must be at most 5 characters long, got 6"),
            ("ab1", "pattern", "f 'ab1' does not match the pattern [a-z]+"),
        ],
    ),
    (
        '{ type = "integer", min = 1, max = 10 }',
        [1, 5, 10],
        [
            (5.0, "type", "f must be an integer, got 5.0"),
            (True, "type", "f must be an integer, got true"),
            ("5", "type", "f must be an integer, got '5'"),
            (0, "min", "f must be at least 1, got 0"),
            (11, "max", "f must be at most 10, got 11"),
        ],
    ),
    (
        '{ type = "decimal", min = 0, max = 100, scale = 2 }',
        [0, 12, 12.5, 99.99, "12.50", "0.01", 100, "100.00"],
        [
            ("12.345", "scale", "f may have at most 2 digits after the point, got '12.345'"),
            (0.125, "scale", "f may have at most 2 digits after the point, got 0.125"),
            (1e-7, "scale", "f may have at most 2 digits after the point"),
            ("1e3", "type", "f must be a number or a decimal string"),
            (" 12", "type", "f must be a number or a decimal string"),
            (float("nan"), "type", "f must be a finite number, got nan"),
            (float("inf"), "type", "f must be a finite number"),
            (True, "type", 'f must be a number or a decimal string like "12.50", got true'),
            (-1, "min", "f must be at least 0, got -1"),
            ("100.01", "max", "f must be at most 100, got '100.01'"),
        ],
    ),
    (
        '{ type = "boolean" }',
        [True, False],
        [
            ("true", "type", "f must be true or false, got 'true'"),
            (1, "type", "f must be true or false, got 1"),
        ],
    ),
    (
        '{ type = "date", min = 1900-01-01, max = 2030-12-31 }',
        ["2024-02-29", "1900-01-01"],
        [
            ("2023-02-29", "type", "f '2023-02-29' is not a real date"),
            ("2024-1-05", "type", "f must be a date (yyyy-mm-dd), got '2024-1-05'"),
            ("2024-01-05T00:00:00Z", "type", "f must be a date (yyyy-mm-dd)"),
            (20240105, "type", "f must be a date (yyyy-mm-dd), got 20240105"),
            ("1899-12-31", "min", "f must be at least 1900-01-01, got '1899-12-31'"),
            ("2031-01-01", "max", "f must be at most 2030-12-31, got '2031-01-01'"),
        ],
    ),
    (
        '{ type = "datetime", min = 2000-01-01T00:00:00Z }',
        ["2026-11-25T10:00:00Z", "2026-11-25T10:00:00.123+03:00", "2026-11-25T10:00-05:00"],
        [
            ("2026-11-25T10:00:00", "type", "f must be a datetime with a timezone"),
            ("2026-11-25 10:00:00Z", "type", "f must be a datetime with a timezone"),
            ("2026-11-25", "type", "f must be a datetime with a timezone"),
            ("2026-11-25T25:00:00Z", "type", "f '2026-11-25T25:00:00Z' is not a real datetime"),
            ("1999-12-31T23:59:59Z", "min", "f must be at least 2000-01-01T00:00:00+00:00"),
        ],
    ),
    (
        '{ type = "enum", values = ["a", "b", 3] }',
        ["a", "b", 3],
        [
            ("c", "enum", "f must be one of 3, 'a', 'b', got 'c'"),
            (True, "enum", "got true"),
            (3.0, "enum", "got 3.0"),
            (["a"], "enum", "got a list of 1 item"),
            ({"a": 1}, "enum", "got an object"),
        ],
    ),
    (
        '{ type = "list", items = "integer", min_length = 1, max_length = 3 }',
        [[1], [1, 2, 3]],
        [
            ("1,2", "type", "f must be a list, got '1,2'"),
            ([], "min_length", "f must hold at least 1 items, got 0"),
            ([1, 2, 3, 4], "max_length", "f must hold at most 3 items, got 4"),
        ],
    ),
    (
        '{ type = "object", fields = { lat = { type = "decimal", required = true } } }',
        [{"lat": 1.5}, {"lat": "-3.25"}],
        [
            ([1.5], "type", "f must be an object, got a list of 1 item"),
            ("lat", "type", "f must be an object, got 'lat'"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [pytest.param(*case, id=case[0].split('"')[1]) for case in TYPE_CASES],
)
def test_each_type_passes_and_fails(
    spec: str, good: list[Any], bad: list[tuple[Any, str, str]]
) -> None:
    things = one_field(spec)["things"]
    for value in good:
        assert check(things, {"id": "1", "f": value}) == [], value
    for value, rule, message in bad:
        violation = only(check(things, {"id": "1", "f": value}))
        assert (violation.field, violation.rule, violation.stage) == ("f", rule, "schema")
        assert message in violation.message, (value, violation.message)


def test_list_items_and_nested_objects_are_checked_with_their_paths() -> None:
    things = one_field(
        '{ type = "list", items = { type = "object", fields = { n = '
        '{ type = "integer", required = true } } } }'
    )["things"]
    violations = check(things, {"id": "1", "f": [{"n": 1}, {"n": "x"}, None, {}, {"n": 2, "z": 0}]})
    assert [(v.field, v.rule) for v in violations] == [
        ("f[1].n", "type"),
        ("f[2]", "type"),
        ("f[3].n", "required"),
        ("f[4].z", "unknown_field"),
    ]
    assert violations[1].message == "f[2] must be an object, got null"
    assert violations[3].message == "f[4].z is not a declared field"


def test_required_absent_or_null_and_partial_writes() -> None:
    people = one_field('{ type = "string", required = true }')["things"]
    assert only(check(people, {"id": "1"})).message == "f is required"
    null = only(check(people, {"id": "1", "f": None}))
    assert (null.field, null.rule, null.message) == ("f", "required", "f is required, got null")
    assert check(people, {"id": "1"}, partial=True) == []
    assert only(check(people, {"id": "1", "f": None}, partial=True)).rule == "required"
    assert only(check(people, {"f": "x"})).field == "id"  # the key field is always required


def test_optional_fields_may_be_absent_or_null() -> None:
    things = one_field('{ type = "integer" }')["things"]
    assert check(things, {"id": "1"}) == [] and check(things, {"id": "1", "f": None}) == []


def test_unknown_fields_refused_unless_allowed() -> None:
    record = {**beneficiary(), "nickname": "Abdi"}
    violation = only(check(BEN, record))
    assert (violation.field, violation.rule) == ("nickname", "unknown_field")
    assert violation.message == "nickname is not a declared field"
    text = EXAMPLE.read_text().replace(
        'key = "beneficiary_id"\n', 'key = "beneficiary_id"\nallow_unknown_fields = true\n'
    )
    relaxed = collections_from_dict(tomllib.loads(text), str(EXAMPLE))
    assert check(relaxed["beneficiaries"], record, relaxed.references) == []
    objects = one_field(
        '{ type = "object", allow_unknown_fields = true, fields = { a = { type = "integer" } } }'
    )["things"]
    assert check(objects, {"id": "1", "f": {"a": 1, "b": [2]}}) == []


def test_a_record_that_is_not_an_object() -> None:
    records: tuple[Any, ...] = (None, [], "x", 3)
    for record in records:
        violation = only(check(BEN, record))
        assert (violation.field, violation.rule, violation.stage) == ("", "type", "schema")
        assert violation.message.startswith("a record must be an object, got")


def test_messages_show_a_short_value_never_the_record() -> None:
    record = beneficiary()
    record["given_name"] = 12
    record["phone"] = "+" + "9" * 500
    record["family_name"] = {"secret": "x" * 100}
    messages = " ".join(v.message for v in check(BEN, record))
    assert "given_name must be a string, got 12" in messages
    assert "family_name must be a string, got an object" in messages
    assert "secret" not in messages and "9" * 41 not in messages and "…" in messages
    assert record["birth_date"] not in messages  # other fields' values stay out
    record = beneficiary()
    record["household_size"] = 10**400
    assert "got a very large integer" in only(check(BEN, record)).message


def test_too_many_violations_are_cut() -> None:
    things = one_field('{ type = "list", items = "integer", max_length = 1000 }')["things"]
    violations = check(things, {"id": "1", "f": ["x"] * 500})
    assert len(violations) == MAX_VIOLATIONS + 1
    assert violations[-1].rule == "too_many_violations"
    assert violations[-1].message == f"and {500 - MAX_VIOLATIONS} more problems"


def test_violation_json_and_text() -> None:
    violation = Violation("phone", "pattern", "phone '1' does not match", "schema")
    assert violation.to_json() == {
        "field": "phone",
        "rule": "pattern",
        "message": "phone '1' does not match",
        "stage": "schema",
    }
    assert str(violation) == "phone '1' does not match [pattern]"


# ------------------------------------------------------------------------------------------------
# Business rules: each passing and failing, on the example collections.
# ------------------------------------------------------------------------------------------------


def rule_violation(collection: Collection, record: dict[str, Any], rule: str) -> Violation:
    found = [v for v in check(collection, record) if v.rule == rule]
    assert len(found) == 1, check(collection, record)
    assert found[0].stage == "rules"
    return found[0]


def test_not_in_future_date_with_tolerance() -> None:
    record = beneficiary()
    record["birth_date"] = "2026-11-26"
    record["registration_date"] = TODAY.isoformat()
    violation = rule_violation(BEN, record, "birth_date_not_in_future")
    assert violation.field == "birth_date"
    assert violation.message == "birth_date '2026-11-26' is in the future (after today: 2026-11-25)"
    record = beneficiary()
    record["registration_date"] = "2026-11-26"  # tolerance_days = 1
    assert check(BEN, record) == []
    record["registration_date"] = "2026-11-27"
    violation = rule_violation(BEN, record, "registration_not_in_future")
    assert "after today + 1 days: 2026-11-26" in violation.message


def test_not_in_future_datetime_respects_timezones() -> None:
    things = one_field(
        '{ type = "datetime" }',
        extra='[collections.things.rules]\nr = { check = "not_in_future", field = "f" }',
    )["things"]
    assert check(things, {"id": "1", "f": "2026-11-25T12:00:00Z"}) == []
    assert check(things, {"id": "1", "f": "2026-11-25T14:30:00+03:00"}) == []  # 11:30 UTC
    violation = only(check(things, {"id": "1", "f": "2026-11-25T12:00:01Z"}))
    assert (violation.field, violation.rule, violation.stage) == ("f", "r", "rules")
    assert "after now: 2026-11-25T12:00:00+00:00" in violation.message
    naive = validate(
        things,
        {"id": "1", "f": "2026-11-25T12:00:01Z"},
        references={},
        today=TODAY,
        now=NOW.replace(tzinfo=None),
    )
    assert [v.rule for v in naive] == ["r"]  # a naive `now` is UTC


def test_count_equals_length() -> None:
    record = beneficiary(5)
    assert check(BEN, record) == []
    record["household_size"] = len(record["members"]) + 1
    violation = rule_violation(BEN, record, "household_size_matches_members")
    assert violation.field == "household_size"
    assert violation.message == (
        f"household_size is {len(record['members']) + 1} but members holds "
        f"{len(record['members'])} items"
    )


def test_in_reference_for_a_value() -> None:
    record = beneficiary()
    record["admin3"] = "KE01-01-999"
    violation = rule_violation(BEN, record, "admin3_known")
    assert violation.field == "admin3"
    assert violation.message == "admin3 'KE01-01-999' is not in the reference table admin3"
    assert check(BEN, beneficiary()) == []


def test_in_reference_for_each_item_of_a_list_and_for_integers() -> None:
    config = one_field(
        '{ type = "list", items = "string" }',
        extra='n = { type = "integer" }\n[collections.things.rules]\n'
        'tags_known = { check = "in_reference", field = "f", table = "tags" }\n'
        'n_known = { check = "in_reference", field = "n", table = "tags" }',
        references='[references.tags]\ncodes = ["a", "b", "7"]',
    )
    things = config["things"]
    assert check(things, {"id": "1", "f": ["a", "b"], "n": 7}, config.references) == []
    violations = check(things, {"id": "1", "f": ["a", "z"], "n": 8}, config.references)
    assert [(v.field, v.rule) for v in violations] == [("f[1]", "tags_known"), ("n", "n_known")]
    assert violations[0].message == "f[1] 'z' is not in the reference table tags"


def test_in_reference_uses_the_tables_given_to_each_call() -> None:
    record = beneficiary()
    record["admin3"] = "KE01-01-099"
    assert [v.rule for v in check(BEN, record)] == ["admin3_known"]
    updated = dict(REFS)
    updated["admin3"] = ReferenceTable("admin3", REFS["admin3"].codes | {"KE01-01-099"}, "hq")
    assert check(BEN, record, updated) == []
    missing = {k: v for k, v in REFS.items() if k != "admin3"}
    violation = only(check(BEN, record, missing))
    assert violation.rule == "admin3_known"
    assert "reference table 'admin3' is not loaded" in violation.message


def test_compare_two_fields() -> None:
    record = beneficiary()
    record["registration_date"] = "2025-01-01"
    record["birth_date"] = "2025-01-02"
    record["members"][0]["birth_date"] = "1990-01-01"
    violation = rule_violation(BEN, record, "born_before_registration")
    assert violation.field == "birth_date"
    assert violation.message == (
        "birth_date ('2025-01-02') must be <= registration_date ('2025-01-01')"
    )
    record["birth_date"] = "2025-01-01"
    assert [v for v in check(BEN, record) if v.rule == "born_before_registration"] == []


def test_compare_each_list_item_with_a_field_and_a_custom_message() -> None:
    record = beneficiary(2)
    last = len(record["members"]) - 1
    record["members"][last]["birth_date"] = "2026-11-01"
    record["registration_date"] = "2026-10-01"
    violation = rule_violation(BEN, record, "members_born_before_registration")
    assert violation.field == f"members[{last}].birth_date"
    assert violation.message == (
        f"members[{last}].birth_date '2026-11-01': "
        "a household member cannot be born after the registration"
    )


def test_compare_with_a_value() -> None:
    record = distribution()
    record["items"][0]["quantity"] = 0
    violation = rule_violation(DIST, record, "quantity_positive")
    assert violation.field == "items[0].quantity"
    assert violation.message == "items[0].quantity (0) must be > 0"
    record["items"][0]["quantity"] = "0.01"
    assert check(DIST, record) == []


@pytest.mark.parametrize(
    ("op", "passing", "failing"),
    [("<", 1, 2), ("<=", 2, 3), (">", 3, 2), (">=", 2, 1), ("==", 2, 3), ("!=", 3, 2)],
)
def test_compare_operators(op: str, passing: int, failing: int) -> None:
    config = one_field(
        '{ type = "integer" }',
        extra=f'g = {{ type = "decimal" }}\n[collections.things.rules]\n'
        f'r = {{ check = "compare", field = "f", op = "{op}", other = "g" }}\n'
        f'v = {{ check = "compare", field = "f", op = "{op}", value = 2 }}',
    )
    things = config["things"]
    assert check(things, {"id": "1", "f": passing, "g": "2.0"}) == []
    violations = check(things, {"id": "1", "f": failing, "g": "2.0"})
    assert [(v.field, v.rule) for v in violations] == [("f", "r"), ("f", "v")]
    assert violations[0].message == f"f ({failing}) must be {op} g ('2.0')"


def test_compare_equality_does_not_take_true_for_one() -> None:
    config = one_field(
        '{ type = "boolean" }',
        extra='[collections.things.rules]\nr = { check = "compare", field = "f", op = "==", value = true }',
    )
    assert check(config["things"], {"id": "1", "f": True}) == []
    assert only(check(config["things"], {"id": "1", "f": False})).rule == "r"


def test_required_if() -> None:
    record = beneficiary()
    record["sms_consent"] = True
    record["phone"] = None
    violation = rule_violation(BEN, record, "phone_for_sms")
    assert violation.field == "phone"
    assert violation.message == "phone is required when sms_consent is true"
    record["phone"] = "+254700000000"
    assert check(BEN, record) == []
    record["sms_consent"], record["phone"] = False, None
    assert check(BEN, record) == []


def test_required_if_any_value() -> None:
    config = one_field(
        '{ type = "string" }',
        extra='reason = { type = "string" }\n[collections.things.rules]\n'
        'r = { check = "required_if", field = "reason", when = "f", message = "say why" }',
    )
    things = config["things"]
    assert (
        check(things, {"id": "1"}) == []
        and check(things, {"id": "1", "f": "x", "reason": "y"}) == []
    )
    violation = only(check(things, {"id": "1", "f": "x"}))
    assert (violation.field, violation.rule, violation.message) == (
        "reason",
        "r",
        "reason: say why",
    )


def test_rules_skip_missing_and_invalid_fields() -> None:
    record = beneficiary()
    del record["household_size"]
    assert [(v.field, v.rule) for v in check(BEN, record)] == [("household_size", "required")]
    record = beneficiary()
    record["birth_date"] = "not a date"
    assert [(v.field, v.rule) for v in check(BEN, record)] == [("birth_date", "type")]
    record = beneficiary()
    record["members"] = "everyone"
    assert [(v.field, v.rule) for v in check(BEN, record)] == [("members", "type")]
    record = beneficiary()
    record["members"][0]["birth_date"] = 1990
    assert [(v.field, v.rule) for v in check(BEN, record)] == [("members[0].birth_date", "type")]
    record = distribution()
    record["items"][0]["quantity"] = "-"
    assert [(v.field, v.rule) for v in check(DIST, record)] == [("items[0].quantity", "type")]


def test_partial_write_checks_only_what_it_writes() -> None:
    assert (
        check(BEN, {"beneficiary_id": "BEN-001-00000001", "phone": "+254700000000"}, partial=True)
        == []
    )
    violations = check(BEN, {"beneficiary_id": "BEN-001-00000001", "phone": "0700"}, partial=True)
    assert [(v.field, v.rule) for v in violations] == [("phone", "pattern")]


def test_today_given_as_a_datetime_is_its_date() -> None:
    record = beneficiary()
    record["birth_date"] = "2026-11-25"
    record["registration_date"] = "2026-11-25"
    record["members"][0]["birth_date"] = "2000-01-01"
    violations = validate(BEN, record, references=REFS, today=NOW, now=NOW)
    assert [v.rule for v in violations] == []


# ------------------------------------------------------------------------------------------------
# Totality.
# ------------------------------------------------------------------------------------------------

FIELD_NAMES = sorted(
    {name for c in CONFIG.collections.values() for name in c.fields}
    | {"lat", "lon", "name", "sex", "birth_date", "relation", "item", "quantity", "unit"}
)
INTERESTING = [
    "2026-11-25",
    "2027-01-01",
    "2024-02-30",
    "2026-11-25T10:00:00Z",
    "12.50",
    "-0",
    "1e5",
    "KE01",
    "KE01-01-001",
    "SITE-KAK-01",
    "+254700000000",
    "female",
    "kg",
    "",
    "…",
    "\x00",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**5000), max_value=10**5000),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(INTERESTING),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)
records = st.dictionaries(keys, json_like, max_size=20)


@examples(300)
@given(record=st.one_of(records, json_like))
def test_validate_never_raises_on_json_like_input(record: Any) -> None:
    for collection in (BEN, DIST):
        violations = check(collection, record)
        assert all(isinstance(v, Violation) for v in violations)
        assert all(v.stage in ("schema", "rules") and v.rule and v.message for v in violations)


def _mutate(record: Any, path: list[Any], value: Any) -> None:
    target = record
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


@examples(300)
@given(data=st.data(), index=st.integers(0, 400))
def test_validate_never_raises_on_damaged_real_records(data: st.DataObject, index: int) -> None:
    for collection, record in ((BEN, beneficiary(index)), (DIST, distribution(index))):
        for _ in range(data.draw(st.integers(1, 4))):
            paths: list[list[Any]] = [[name] for name in record]
            for name, value in record.items():
                if isinstance(value, dict):
                    paths += [[name, sub] for sub in value]
                if isinstance(value, list):
                    paths += [[name, i] for i in range(len(value))]
                    paths += [
                        [name, i, sub]
                        for i, item in enumerate(value)
                        if isinstance(item, dict)
                        for sub in item
                    ]
            path = data.draw(st.sampled_from(paths))
            try:
                _mutate(record, path, data.draw(json_like))
            except (TypeError, KeyError, IndexError):
                continue  # an earlier mutation changed the shape under this path
        violations = check(collection, record)
        assert all(isinstance(v, Violation) for v in violations)
