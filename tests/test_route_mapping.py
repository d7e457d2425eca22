"""Declarative mappings: the golden grants example, every rule passing and failing, compile-time
validation with key paths, hooks, determinism, and a property: any JSON-like record maps or fails
with a MappingError, never anything else."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples, json_scalars, json_values

from agent import fieldgen
from hq_server.routing.mapping import Mapped, Mapping, MappingError, compile_mapping
from protocol.config import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "mappings.example.toml"
SPECS: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())["mappings"]
MAPPINGS = {name: compile_mapping(name, spec, str(EXAMPLE)) for name, spec in SPECS.items()}

GRANT = {
    "grant_id": "GRT-2024-001",
    "fy2024_personnel": 150000,
    "fy2024_travel": 25000,
    "fy2024_supplies": 15000,
    "fy2025_personnel": 175000,
    "fy2025_travel": 30000,
    "fy2025_supplies": 18000,
}


def build(spec: dict[str, Any], name: str = "m") -> Mapping:
    return compile_mapping(name, spec, "routes.toml")


def one(spec: dict[str, Any], record: dict[str, Any], key: str = "K1") -> dict[str, Any]:
    """The payload of the single output of `spec` applied to `record`."""
    (out,) = build(spec).apply(record, key=key)
    return out.payload


def fails(spec: dict[str, Any], record: dict[str, Any]) -> MappingError:
    with pytest.raises(MappingError) as caught:
        build(spec).apply(record, key="K1")
    return caught.value


def refused(spec: Any, name: str = "m") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        compile_mapping(name, spec, "routes.toml")
    assert caught.value.path == "routes.toml"
    return caught.value


# -- the golden example ---------------------------------------------------------------------------


def test_golden_grants_to_finance() -> None:
    out = MAPPINGS["grants_to_finance"].apply(GRANT)
    assert [m.target_key for m in out] == ["CC-GRT-2024-001-2024", "CC-GRT-2024-001-2025"]
    assert out[0].payload == {
        "cost_centre": "CC-GRT-2024-001",
        "fiscal_year": "2024",
        "total_budget": 190000,
        "line_items": [
            {"category": "10-PERS", "amount": 150000},
            {"category": "20-TRVL", "amount": 25000},
            {"category": "30-SUPP", "amount": 15000},
        ],
    }
    assert out[1].payload == {
        "cost_centre": "CC-GRT-2024-001",
        "fiscal_year": "2025",
        "total_budget": 223000,
        "line_items": [
            {"category": "10-PERS", "amount": 175000},
            {"category": "20-TRVL", "amount": 30000},
            {"category": "30-SUPP", "amount": 18000},
        ],
    }
    # Field order is config order, and integers stay integers.
    assert list(out[0].payload) == ["cost_centre", "fiscal_year", "total_budget", "line_items"]
    assert type(out[0].payload["total_budget"]) is int


def test_grants_partial_years_and_no_years() -> None:
    mapping = MAPPINGS["grants_to_finance"]
    record = {"grant_id": "G", "fy2026_travel": 10, "fy2026_personnel": 5, "fy2027_supplies": None}
    (out,) = mapping.apply(record)  # a null field makes no year
    assert out.payload["line_items"] == [
        {"category": "10-PERS", "amount": 5},
        {"category": "20-TRVL", "amount": 10},
    ]
    assert out.payload["total_budget"] == 15
    assert mapping.apply({"grant_id": "G"}) == []
    with pytest.raises(MappingError, match=r"'grants_to_finance', rule required: .*'grant_id'"):
        mapping.apply({"fy2024_travel": 1})


def test_example_mappings_map_generated_field_data() -> None:
    for record in fieldgen.beneficiaries(200, seed=7):
        (out,) = MAPPINGS["beneficiaries_to_crm"].apply(record)
        assert out.target_key == record["beneficiary_id"]
        assert out.payload["gender"] in {"F", "M"}
        assert out.payload["age_band"] in {"0-4", "5-17", "18-59", "60+"}
        json.dumps(out.payload)
    for record in fieldgen.distributions(200, seed=7):
        lines = MAPPINGS["distributions_to_finance"].apply(record)
        assert len(lines) == len(record["items"])
        assert [m.payload["line_no"] for m in lines] == list(range(len(lines)))
        assert lines[0].target_key == f"{record['distribution_id']}-0"


def test_crm_example_output() -> None:
    record = {
        "beneficiary_id": "BEN-1",
        "given_name": "Aïchatou",
        "family_name": "Issoufou",
        "sex": "other",
        "birth_date": "2000-06-15",
        "registration_date": "2024-06-14",
        "phone": None,
        "admin1": "NE01",
        "admin2": "NE01-02",
        "household_size": 4,
        "vulnerability_flags": ["female_headed", "disability"],
        "registration_status": "pending_verification",
    }
    (out,) = MAPPINGS["beneficiaries_to_crm"].apply(record)
    assert out == Mapped(
        "BEN-1",
        {
            "external_id": "BEN-1",
            "record_type": "Beneficiary",
            "first_name": "Aïchatou",
            "last_name": "Issoufou",
            "full_name": "Aïchatou Issoufou",
            "gender": "U",
            "birthdate": "2000-06-15",
            "mobile_phone": None,
            "address": {"region_code": "NE01", "district_code": "NE01-02"},
            "household_size": 4,
            "vulnerability_flags": ["female_headed", "disability"],
            "vulnerability_count": 2,
            "status": "Pending",
            "source_system": "fieldsync",
            "age_at_registration": 23,
            "age_band": "18-59",
        },
    )
    with pytest.raises(MappingError) as caught:
        MAPPINGS["beneficiaries_to_crm"].apply({**record, "registration_status": "deceased"})
    e = caught.value
    assert (e.mapping, e.field, e.rule) == (
        "beneficiaries_to_crm",
        "status",
        "lookup 'contact_status'",
    )
    assert "unknown value 'deceased'" in str(e)


def test_distributions_unknown_item_is_refused() -> None:
    record = {"distribution_id": "D1", "items": [{"item": "goat", "quantity": 1, "unit": "head"}]}
    with pytest.raises(MappingError) as caught:
        MAPPINGS["distributions_to_finance"].apply(record)
    assert caught.value.field == "budget_line"
    assert str(caught.value).startswith(
        "mapping 'distributions_to_finance', field 'budget_line', rule lookup 'budget_line': "
    )


# -- from / const / defaults / required ---------------------------------------------------------------


def test_from_renames_and_follows_paths() -> None:
    spec = {
        "fields": {
            "id": {"from": "beneficiary_id"},
            "lat": {"from": "gps.lat"},
            "first_member": {"from": "members.0.name"},
            "n": {"from": "household_size"},
            "gps": {"from": "gps"},
        }
    }
    record: dict[str, Any] = {
        "beneficiary_id": "B1",
        "gps": {"lat": 1.5, "lon": 2},
        "members": [{"name": "Amina"}],
        "household_size": 3,
    }
    payload = one(spec, record)
    assert payload == {
        "id": "B1",
        "lat": 1.5,
        "first_member": "Amina",
        "n": 3,
        "gps": {"lat": 1.5, "lon": 2},
    }
    payload["gps"]["lat"] = 0  # outputs never share objects with the record
    assert record["gps"]["lat"] == 1.5


def test_missing_values_default_null_or_error() -> None:
    spec = {
        "fields": {
            "a": {"from": "gone"},
            "b": {"from": "gone.deeper", "default": "n/a"},
            "c": {"from": "null_field", "default": 0},
            "d": {"from": "members.5.name"},
            "e": {"from": "text.sub"},
        }
    }
    payload = one(spec, {"null_field": None, "members": [], "text": "x"})
    assert payload == {"a": None, "b": "n/a", "c": 0, "d": None, "e": None}
    e = fails({"fields": {"phone": {"from": "contact.phone", "required": True}}}, {"contact": {}})
    assert (e.mapping, e.field, e.rule) == ("m", "phone", "from 'contact.phone'")
    assert str(e) == (
        "mapping 'm', field 'phone', rule from 'contact.phone': "
        "source field 'contact.phone' is missing"
    )


def test_mapping_level_required() -> None:
    spec = {"required": ["id", "gps.lat"], "fields": {"id": {"from": "id"}}}
    assert one(spec, {"id": 1, "gps": {"lat": 0}}) == {"id": 1}
    e = fails(spec, {"id": 1, "gps": {}})
    assert (e.field, e.rule) == (None, "required")
    assert str(e) == "mapping 'm', rule required: source field 'gps.lat' is missing"


def test_constants_are_copied_per_output() -> None:
    spec = {
        "each": {"values": ["a", "b"]},
        "target_key": "{item}",
        "fields": {"tags": {"const": ["x"]}, "n": {"const": 7}, "ok": {"const": True}},
    }
    first, second = build(spec).apply({})
    first.payload["tags"].append("y")
    assert second.payload == {"tags": ["x"], "n": 7, "ok": True}


# -- lookups --------------------------------------------------------------------------------------


LOOKUP_SPEC: dict[str, Any] = {
    "lookups": {"code": {"personnel": "10-PERS", "3": "THREE", "true": "YES"}},
    "fields": {"code": {"from": "v", "lookup": "code"}},
}


@pytest.mark.parametrize(
    ("value", "expected"), [("personnel", "10-PERS"), (3, "THREE"), (True, "YES"), (None, None)]
)
def test_lookup_translates(value: Any, expected: Any) -> None:
    assert one(LOOKUP_SPEC, {"v": value}) == {"code": expected}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("equipment", "unknown value 'equipment'"),
        (4, "unknown value 4"),
        (1.5, "cannot look up a float"),
        (["personnel"], "cannot look up a list"),
    ],
)
def test_lookup_refuses_unknown_values(value: Any, reason: str) -> None:
    e = fails(LOOKUP_SPEC, {"v": value})
    assert (e.mapping, e.field, e.rule) == ("m", "code", "lookup 'code'")
    assert reason in str(e)


def test_lookup_default() -> None:
    spec = {
        "lookups": {"sex": {"female": "F", "male": "M"}},
        "fields": {"g": {"from": "sex", "lookup": "sex", "lookup_default": "U"}},
    }
    assert one(spec, {"sex": "female"}) == {"g": "F"}
    assert one(spec, {"sex": "unknown"}) == {"g": "U"}


# -- templates ------------------------------------------------------------------------------------


def test_templates() -> None:
    spec = {
        "fields": {
            "cc": {"template": "CC-{grant_id}"},
            "where": {"template": "{gps.lat},{gps.lon} ({n} people, head={head})"},
            "braces": {"template": "{{literal}} {grant_id}}}"},
            "key": {"template": "{_key}/{_index}"},
            "plain": {"template": "no placeholders"},
        }
    }
    record = {"grant_id": "G1", "gps": {"lat": 1.25, "lon": -3}, "n": 4, "head": True}
    assert one(spec, record) == {
        "cc": "CC-G1",
        "where": "1.25,-3 (4 people, head=true)",
        "braces": "{literal} G1}",
        "key": "K1/0",
        "plain": "no placeholders",
    }


def test_template_missing_placeholder() -> None:
    assert one({"fields": {"t": {"template": "CC-{grant_id}"}}}, {}) == {"t": None}
    spec = {"fields": {"t": {"template": "CC-{grant_id}", "required": True}}}
    e = fails(spec, {})
    assert (e.field, e.rule) == ("t", "template 'CC-{grant_id}'")
    assert e.reason == "placeholder {grant_id} is missing"


def test_template_refuses_containers() -> None:
    e = fails({"fields": {"t": {"template": "x{gps}"}}}, {"gps": {"lat": 1}})
    assert (e.field, e.rule) == ("t", "template 'x{gps}'")
    assert e.reason == "{gps} is an object, not text"


def test_template_is_not_str_format() -> None:
    # No attribute or index access, no format specs, no conversions: only names and dots.
    for text in ("{a.__class__}", "{a[0]}", "{a!r}", "{a:>10}", "{0}", "{}"):
        spec = {"fields": {"t": {"template": text}}}
        if text == "{a.__class__}":  # a valid name path: looked up as data, never as attribute
            assert one(spec, {"a": {"__class__": "x"}}) == {"t": "x"}
            assert one(spec, {"a": "text"}) == {"t": None}
        else:
            assert refused(spec).key == "mappings.m.fields.t.template"


# -- computed totals --------------------------------------------------------------------------------


def test_sums_and_counts() -> None:
    spec = {
        "fields": {
            "total": {"sum": ["a", "b", "missing"]},
            "mixed": {"sum": ["a", "c"]},
            "qty": {"sum": "line.quantity", "each": {"items": "items", "as": "line"}},
            "none": {"sum": "item.q", "each": {"items": "absent"}},
            "n_items": {"count": "items"},
            "n_absent": {"count": "absent"},
        }
    }
    record = {"a": 2, "b": 3, "c": 0.5, "items": [{"quantity": 4}, {"quantity": 6}, {}]}
    payload = one(spec, record)
    assert payload == {"total": 5, "mixed": 2.5, "qty": 10, "none": 0, "n_items": 3, "n_absent": 0}
    assert type(payload["total"]) is int and type(payload["qty"]) is int


@pytest.mark.parametrize(
    ("field", "record", "reason"),
    [
        ({"sum": ["a"]}, {"a": "12"}, "'a' is text, not a number"),
        ({"sum": ["a"]}, {"a": True}, "'a' is true/false, not a number"),
        ({"sum": ["a", "b"]}, {"a": 1e308, "b": 1e308}, "the sum is not a finite number"),
        ({"count": "a"}, {"a": {"x": 1}}, "'a' is an object, not a list"),
        ({"sum": "item", "each": {"items": "a"}}, {"a": 5}, "'a' is a int, not a list"),
    ],
)
def test_sum_and_count_failures(field: dict[str, Any], record: dict[str, Any], reason: str) -> None:
    e = fails({"fields": {"t": field}}, record)
    assert e.field == "t"
    assert e.rule.split()[0] in {"sum", "count"}
    assert e.reason == reason


# -- nesting ----------------------------------------------------------------------------------------


def test_nested_objects_and_lists() -> None:
    spec = {
        "fields": {
            "address": {"fields": {"region": {"from": "admin1"}, "district": {"from": "admin2"}}},
            "people": {
                "each": {"items": "members", "as": "m", "when": "m.name"},
                "fields": {"name": {"from": "m.name"}, "pos": {"from": "_index"}},
            },
        }
    }
    record = {
        "admin1": "KE01",
        "admin2": "KE01-02",
        "members": [{"name": "A"}, {"name": None}, {"name": "C"}, "junk"],
    }
    assert one(spec, record) == {
        "address": {"region": "KE01", "district": "KE01-02"},
        "people": [{"name": "A", "pos": 0}, {"name": "C", "pos": 2}],
    }


def test_flat_fields_nest_into_a_list_in_config_order() -> None:
    spec = {
        "fields": {
            "line_items": {
                "each": {
                    "values": ["travel", "personnel", "other"],
                    "as": "cat",
                    "when": "b_{cat}",
                },
                "fields": {"category": {"from": "cat"}, "amount": {"from": "b_{cat}"}},
            }
        }
    }
    record = {"b_personnel": 1, "b_other": 3, "b_travel": 2}
    assert one(spec, record)["line_items"] == [
        {"category": "travel", "amount": 2},
        {"category": "personnel", "amount": 1},
        {"category": "other", "amount": 3},
    ]


def test_nested_error_names_the_item() -> None:
    spec = {
        "lookups": {"code": {"x": "X"}},
        "fields": {
            "lines": {
                "each": {"items": "items"},
                "fields": {"code": {"from": "item.k", "lookup": "code"}},
            }
        },
    }
    e = fails(spec, {"items": [{"k": "x"}, {"k": "y"}]})
    assert str(e).startswith("mapping 'm', field 'lines[1].code', rule lookup 'code': unknown")
    e = fails(spec, {"items": {"k": "x"}})
    assert (e.field, e.rule) == ("lines", "each.items 'items'")
    assert e.reason == "'items' is an object, not a list"


# -- fan-out and target keys -------------------------------------------------------------------------


def test_fan_out_by_field_pattern() -> None:
    spec = {
        "target_key": "{_key}:{year}:{kind}",
        "each": {"match": r"^(?P<kind>[a-z]+)_(?P<year>\d{4})$"},
        "fields": {"year": {"from": "year"}, "kind": {"from": "kind"}, "i": {"from": "_index"}},
    }
    record = {"cost_2025": 1, "cost_2024": 2, "aid_2025": 3, "other": 4, "cost_2026": None}
    out = build(spec).apply(record, key="R")
    assert [m.target_key for m in out] == ["R:2025:aid", "R:2024:cost", "R:2025:cost"]
    assert out[0].payload == {"year": "2025", "kind": "aid", "i": 0}
    assert build(spec).apply({"other": 1}, key="R") == []


def test_nested_match_sees_only_its_scope() -> None:
    spec = {
        "target_key": "{fy}",
        "each": {"match": r"^fy(?P<fy>\d{4})_"},
        "fields": {
            "total": {"sum": "fy{fy}_{cat}", "each": {"match": r"^fy(?P<fy>\d{4})_(?P<cat>\w+)$"}},
            "cats": {
                "each": {"match": r"^fy(?P<fy>\d{4})_(?P<cat>\w+)$"},
                "fields": {"c": {"from": "cat"}},
            },
        },
    }
    out = build(spec).apply(GRANT | {"fy2024_equipment": 1})
    assert [m.payload["total"] for m in out] == [190001, 223000]
    assert out[0].payload["cats"] == [
        {"c": c} for c in ("equipment", "personnel", "supplies", "travel")
    ]


def test_fan_out_per_list_item() -> None:
    mapping = MAPPINGS["distributions_to_finance"]
    record = {
        "distribution_id": "D1",
        "beneficiary_id": "B1",
        "items": [
            {"item": "rice", "quantity": 48, "unit": "kg"},
            {"item": "soap", "quantity": 2, "unit": "piece"},
        ],
    }
    out = mapping.apply(record)
    assert [m.target_key for m in out] == ["D1-0", "D1-1"]
    assert out[1].payload["budget_line"] == "4210-NFI-HYGIENE"
    assert out[1].payload["description"] == "2 piece soap to B1"
    assert type(out[0].payload["quantity"]) is int
    assert mapping.apply({"distribution_id": "D1", "items": []}) == []
    with pytest.raises(MappingError) as caught:
        mapping.apply({"distribution_id": "D1", "items": "rice"})
    assert (caught.value.field, caught.value.rule) == (None, "each.items 'items'")
    with pytest.raises(MappingError) as caught:
        mapping.apply({"distribution_id": "D1", "items": [{"item": "rice", "unit": "kg"}]})
    assert (caught.value.field, caught.value.reason) == (
        "quantity",
        "source field 'line.quantity' is missing",
    )


def test_target_key_sources() -> None:
    spec: dict[str, Any] = {"fields": {"x": {"from": "x"}}}
    assert build(spec).apply({"x": 1}, key="K") == [Mapped("K", {"x": 1})]
    assert build(spec).apply({"x": 1, "_key": "R"}) == [Mapped("R", {"x": 1})]  # as the router does
    with_source = {**spec, "source_key": "id"}
    assert build(with_source).apply({"id": "B7", "x": 2}) == [Mapped("B7", {"x": 2})]
    assert build(with_source).apply({"id": 7, "x": 2}) == [Mapped("7", {"x": 2})]
    with pytest.raises(MappingError) as caught:
        build(spec).apply({"x": 1})
    assert (caught.value.field, caught.value.rule) == ("target_key", "template '{_key}'")
    assert "placeholder {_key} is missing (pass key= to apply, or set source_key)" in str(
        caught.value
    )


def test_target_key_must_be_unique_and_non_empty() -> None:
    spec = {"target_key": "{_key}", "each": {"values": [1, 2]}, "fields": {}}
    e = fails(spec, {})
    assert (e.field, e.rule) == ("target_key", "template '{_key}'")
    assert "two outputs have the key 'K1'" in e.reason
    e = fails({"target_key": "{x}", "fields": {}}, {"x": ""})
    assert e.reason == "the key is empty"
    e = fails({"target_key": "{x}", "fields": {}}, {"x": [1]})
    assert e.reason == "{x} is a list, not text"


def test_deeply_nested_values_are_a_mapping_error() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    e = fails({"fields": {"d": {"from": "d"}}}, {"d": deep})
    assert (e.field, e.reason) == ("d", "the value is nested too deeply to copy")
    e = fails({"hook": "test_route_mapping:refusing_hook"}, {"d": deep})
    assert e.reason == "the value is nested too deeply to copy"


def test_mapping_error_pickles() -> None:
    e = fails({"fields": {"t": {"template": "{x}", "required": True}}}, {})
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.field == "t"


def test_record_must_be_an_object() -> None:
    with pytest.raises(MappingError, match="rule record: expected an object, got a list"):
        build({"fields": {}}).apply([1], key="K")  # type: ignore[arg-type]


# -- hooks ----------------------------------------------------------------------------------------

SEEN: list[tuple[dict[str, Any], dict[str, Any]]] = []


def recording_hook(record: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    SEEN.append((record, context))
    record["a"] = "changed by the hook"  # a private copy: no effect on the next scope
    return {"b": "replaced", "c": context["_payload"]["a"] * 2}


def bad_return_hook(record: dict[str, Any], context: dict[str, Any]) -> Any:
    return [{"ok": 1}, "not a dict"]


def refusing_hook(record: dict[str, Any], context: dict[str, Any]) -> Any:
    return []


def date_hook(record: dict[str, Any], context: dict[str, Any]) -> Any:
    return {"nothing": None, "when": dt.date(2024, 1, 1)}


NOT_CALLABLE = 42


def test_hook_merges_into_the_payload() -> None:
    SEEN.clear()
    spec = {
        "target_key": "{_key}-{item}",
        "each": {"values": ["x", "y"]},
        "hook": "test_route_mapping:recording_hook",
        "fields": {"a": {"from": "a"}, "b": {"const": "declared"}},
    }
    record = {"a": "A"}
    out = build(spec, "hooked").apply(record, key="K")
    assert out == [
        Mapped("K-x", {"a": "A", "b": "replaced", "c": "AA"}),
        Mapped("K-y", {"a": "A", "b": "replaced", "c": "AA"}),
    ]
    assert record == {"a": "A"}
    _, context = SEEN[1]
    assert context == {
        "_key": "K",
        "item": "y",
        "_index": 1,
        "_mapping": "hooked",
        "_payload": {"a": "A", "b": "declared"},
    }


def test_hook_returning_a_list_fans_out() -> None:
    spec = {
        "target_key": "{_key}-{_part}",
        "hook": "hq_server.routing.hooks_example:household_members",
        "fields": {"source": {"const": "fieldsync"}},
    }
    record = {"members": [{"name": "A", "relation": "head"}, {"name": ""}, {"name": "B"}]}
    assert build(spec).apply(record, key="H") == [
        Mapped(
            "H-0",
            {"source": "fieldsync", "household_id": "H", "full_name": "A", "relation": "head"},
        ),
        Mapped(
            "H-1", {"source": "fieldsync", "household_id": "H", "full_name": "B", "relation": None}
        ),
    ]
    assert build({**spec, "hook": "test_route_mapping:refusing_hook"}).apply(record, key="H") == []


def test_hook_errors_become_mapping_errors() -> None:
    mapping = MAPPINGS["beneficiaries_to_crm"]
    record = {"beneficiary_id": "B", "given_name": "A", "family_name": "B", "household_size": 1}
    with pytest.raises(MappingError) as caught:
        mapping.apply({**record, "birth_date": "2020-13-01", "registration_date": "2024-01-01"})
    e = caught.value
    assert (e.mapping, e.field) == ("beneficiaries_to_crm", None)
    assert e.rule == "hook 'hq_server.routing.hooks_example:age_at_registration'"
    assert e.reason == "raised ValueError: birth_date is not an ISO date (YYYY-MM-DD)"
    assert isinstance(e.__cause__, ValueError)
    e = fails({"hook": "test_route_mapping:bad_return_hook"}, {})
    assert "returned a list; expected an object with text keys, or a list of them" in e.reason
    e = fails({"hook": "test_route_mapping:date_hook"}, {})
    assert e.reason == (
        "returned what JSON cannot carry: must be text, a number, true/false, a list or a table, "
        "not date"
    )


# -- compile-time validation ------------------------------------------------------------------------

F = {"fields": {"x": {"from": "x"}}}


@pytest.mark.parametrize(
    ("spec", "key", "reason"),
    [
        ("not a table", "mappings.m", "must be a table"),
        ({**F, "colour": "red"}, "mappings.m.colour", "unknown key (known: description, "),
        ({}, "mappings.m.fields", "is required (unless a hook makes the payload)"),
        ({"fields": []}, "mappings.m.fields", "must be a table"),
        (
            {"fields": {"x": "x"}},
            "mappings.m.fields.x",
            'must be a table such as { from = "field" }',
        ),
        ({"fields": {"x": {"form": "x"}}}, "mappings.m.fields.x.form", "unknown key (known: from,"),
        ({"fields": {"x": {}}}, "mappings.m.fields.x", "needs exactly one rule of from, const,"),
        (
            {"fields": {"x": {"from": "a", "const": 1}}},
            "mappings.m.fields.x",
            "it has from and const",
        ),
        (
            {"fields": {"x": {"from": 3}}},
            "mappings.m.fields.x.from",
            "must be non-empty text, got 3",
        ),
        (
            {"fields": {"x": {"from": "a..b"}}},
            "mappings.m.fields.x.from",
            "empty name between dots",
        ),
        (
            {"fields": {"x": {"from": "a", "required": "yes"}}},
            "mappings.m.fields.x.required",
            "true",
        ),
        (
            {"fields": {"x": {"from": "a", "required": True, "default": 1}}},
            "mappings.m.fields.x.required",
            "cannot be true when a default is set",
        ),
        (
            {"fields": {"x": {"sum": ["a"], "default": 0}}},
            "mappings.m.fields.x.default",
            "does not go with sum (sum only goes with each)",
        ),
        (
            {"fields": {"x": {"const": 1, "lookup": "t"}}},
            "mappings.m.fields.x.lookup",
            "does not go with const (const takes no modifiers)",
        ),
        (
            {"fields": {"x": {"sum": []}}},
            "mappings.m.fields.x.sum",
            "must be a source path or a list",
        ),
        (
            {"fields": {"x": {"sum": ["a", 1]}}},
            "mappings.m.fields.x.sum[1]",
            "must be non-empty text",
        ),
        (
            {"fields": {"x": {"from": "a", "lookup": "nope"}}},
            "mappings.m.fields.x.lookup",
            "unknown lookup table 'nope' (known: none)",
        ),
        (
            {"lookups": {"t": {"a": 1}}, "fields": {"x": {"from": "a", "lookup": "tt"}}},
            "mappings.m.fields.x.lookup",
            "unknown lookup table 'tt' (known: t)",
        ),
        (
            {"fields": {"x": {"from": "a", "lookup_default": "?"}}},
            "mappings.m.fields.x.lookup_default",
            "needs a lookup table",
        ),
        ({**F, "lookups": {"t": {}}}, "mappings.m.lookups.t", "is empty"),
        ({**F, "lookups": {"t": "x"}}, "mappings.m.lookups.t", "must be a table"),
        (
            {**F, "lookups": {"t": {"d": dt.date(2024, 1, 1)}}},
            "mappings.m.lookups.t.d",
            "must be text, a number, true/false, a list or a table, not date",
        ),
        (
            {"fields": {"x": {"const": [1, float("inf")]}}},
            "mappings.m.fields.x.const",
            "must be a finite number",
        ),
        (
            {"fields": {"x": {"template": "CC-{grant id}"}}},
            "mappings.m.fields.x.template",
            "bad placeholder {grant id} at position 3",
        ),
        ({"fields": {"x": {"template": "CC-{id"}}}, "mappings.m.fields.x.template", "never closed"),
        ({"fields": {"x": {"template": "CC-}"}}}, "mappings.m.fields.x.template", "closes nothing"),
        ({"fields": {"x": {"from": "fy{fy"}}}, "mappings.m.fields.x.from", "never closed"),
        ({**F, "target_key": "FIXED"}, "mappings.m.target_key", "needs a placeholder"),
        ({**F, "target_key": "{a b}"}, "mappings.m.target_key", "bad placeholder {a b}"),
        ({**F, "required": "id"}, "mappings.m.required", "must be a list of source paths"),
        ({**F, "required": ["id", ""]}, "mappings.m.required[1]", "must be non-empty text"),
        ({**F, "source_key": ""}, "mappings.m.source_key", "must be non-empty text"),
        ({**F, "description": 1}, "mappings.m.description", "must be text"),
        (
            {**F, "each": {}},
            "mappings.m.each",
            "needs exactly one of items, values, match; it has none",
        ),
        (
            {**F, "each": {"items": "a", "values": [1]}},
            "mappings.m.each",
            "it has items and values",
        ),
        ({**F, "each": {"items": "a", "sort": 1}}, "mappings.m.each.sort", "unknown key"),
        ({**F, "each": {"values": []}}, "mappings.m.each.values", "must be a non-empty list"),
        ({**F, "each": {"match": "fy(\\d{4}"}}, "mappings.m.each.match", "not a valid regular exp"),
        ({**F, "each": {"match": "fy\\d{4}"}}, "mappings.m.each.match", "needs a named group"),
        ({**F, "each": {"match": "(?P<_x>a)"}}, "mappings.m.each.match", "'_x': names starting"),
        ({**F, "each": {"match": "(?P<y>a)", "as": "z"}}, "mappings.m.each.as", "does not go"),
        ({**F, "each": {"items": "a", "as": "_i"}}, "mappings.m.each.as", "starting with a letter"),
        (
            {**F, "each": {"items": "a", "when": 1}},
            "mappings.m.each.when",
            "must be non-empty text",
        ),
        (
            {"fields": {"x": {"each": {"items": "a"}, "fields": {"y": {"from": 1}}}}},
            "mappings.m.fields.x.fields.y.from",
            "must be non-empty text",
        ),
        (
            {"fields": {"x": {"each": {"item": "a"}, "fields": {}}}},
            "mappings.m.fields.x.each.item",
            "unknown key (known: items, values, match, as, when)",
        ),
        ({**F, "hook": "no colon"}, "mappings.m.hook", "must be 'package.module:function'"),
        (
            {**F, "hook": "no_such_module_xyz:f"},
            "mappings.m.hook",
            "cannot import 'no_such_module_xyz': ModuleNotFoundError",
        ),
        (
            {**F, "hook": "hq_server.routing.hooks_example:nope"},
            "mappings.m.hook",
            "module 'hq_server.routing.hooks_example' has no 'nope'",
        ),
        ({**F, "hook": "test_route_mapping:NOT_CALLABLE"}, "mappings.m.hook", "is not callable"),
    ],
)
def test_compile_refuses_with_key_path(spec: Any, key: str, reason: str) -> None:
    error = refused(spec)
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"routes.toml: {key}: ")


def test_compile_refuses_an_empty_name() -> None:
    assert refused(F, name="").key == "mappings"


def test_example_file_compiles_with_its_own_path() -> None:
    assert set(MAPPINGS) == {
        "grants_to_finance",
        "beneficiaries_to_crm",
        "distributions_to_finance",
    }
    broken = tomllib.loads(
        EXAMPLE.read_text().replace('lookup = "budget_category"', 'lookup = "x"')
    )
    with pytest.raises(ConfigError) as caught:
        compile_mapping("grants_to_finance", broken["mappings"]["grants_to_finance"], EXAMPLE)
    assert caught.value.path == str(EXAMPLE)
    assert caught.value.key == "mappings.grants_to_finance.fields.line_items.fields.category.lookup"


# -- determinism and robustness ----------------------------------------------------------------------


def test_output_does_not_depend_on_record_key_order() -> None:
    items = list(GRANT.items())
    expected = MAPPINGS["grants_to_finance"].apply(GRANT)
    for seed in range(10):
        random.Random(seed).shuffle(items)
        assert MAPPINGS["grants_to_finance"].apply(dict(items)) == expected


BASES = [GRANT, next(fieldgen.beneficiaries(1)), next(fieldgen.distributions(1))]
FIELD_NAMES = sorted({"fy2030_travel", "fy1999_other", "_key"}.union(*BASES))
line_items = st.fixed_dictionaries(
    {},
    optional={
        "item": st.one_of(st.sampled_from(sorted(fieldgen.ITEM_UNITS)), json_scalars),
        "quantity": json_scalars,
        "unit": json_scalars,
    },
)
field_values = st.one_of(
    json_values,
    st.lists(st.one_of(line_items, json_values), max_size=4),
    st.sampled_from(["male", "female", "verified", "2001-02-03", "2020-13-01"]),
)


@st.composite
def edited(draw: st.DrawFn) -> dict[str, Any]:
    """A realistic record with some fields dropped and some replaced by arbitrary values: gets
    past `required` often enough to reach every rule."""
    record = dict(draw(st.sampled_from(BASES)))
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=4)):
        record.pop(name, None)
    record.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=4)))
    return record


records = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=len(FIELD_NAMES)),
    edited(),
)


@examples(300)
@given(record=records, name=st.sampled_from(sorted(MAPPINGS)), key=st.none() | st.text(max_size=5))
def test_any_record_maps_or_fails_with_a_mapping_error(
    record: dict[str, Any], name: str, key: str | None
) -> None:
    failure: MappingError | None = None
    try:
        out = MAPPINGS[name].apply(record, key=key)
    except MappingError as e:  # the only exception allowed to escape
        failure = e
    if failure is not None:
        assert failure.mapping == name and str(failure).startswith(f"mapping {name!r}, ")
        return
    assert all(isinstance(m.target_key, str) and m.target_key for m in out)
    assert len({m.target_key for m in out}) == len(out)
    json.dumps([m.payload for m in out])
    assert MAPPINGS[name].apply(record, key=key) == out  # deterministic
