"""The collections config: the example loads and matches the generated records' world; every bad
config fails with the file, the dotted key, the reason and the line."""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples

from agent.fieldgen import ADMIN_CODES, SITES, beneficiaries, distributions
from protocol.collections import (
    CollectionsConfigError,
    CollectionSection,
    FieldSection,
    ReferenceSection,
    RuleSection,
    collections_from_dict,
    key_lines,
    line_of_key,
    load_collections,
    parse_path,
    read_reference_file,
)
from protocol.config import ConfigError, documented_keys

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "collections.example.toml"


# ------------------------------------------------------------------------------------------------
# The example.
# ------------------------------------------------------------------------------------------------


def test_example_loads_with_the_policies_the_issue_asks_for() -> None:
    config = load_collections(EXAMPLE)
    assert set(config.collections) == {"beneficiaries", "distributions"}
    ben, dist = config["beneficiaries"], config["distributions"]
    assert (ben.key, ben.mode, ben.append_only) == ("beneficiary_id", "mutable", False)
    assert (dist.key, dist.mode, dist.append_only) == ("distribution_id", "append_only", True)
    for name in ("given_name", "family_name", "phone"):
        assert ben.policy(name) == "lww" and ben.owner(name) is None
    assert ben.policy("household_size") == "review"
    assert ben.policy("registration_status") == "source_of_truth"
    assert ben.owner("registration_status") == "hq:case-management"
    assert all(spec.policy == "lww" for spec in dist.fields.values())
    assert ben.fields["beneficiary_id"].required and dist.fields["distribution_id"].required
    assert ben.reference_tables() == {"admin1", "admin2", "admin3"}
    assert dist.reference_tables() == {"sites"}
    checks = {rule.check for c in config.collections.values() for rule in c.rules}
    assert checks == {
        "not_in_future",
        "count_equals_length",
        "in_reference",
        "compare",
        "required_if",
    }


def test_example_reference_tables_hold_exactly_the_generator_codes() -> None:
    refs = load_collections(EXAMPLE).references
    assert refs["admin1"].codes == set(ADMIN_CODES)
    assert refs["admin2"].codes == {a2 for a1 in ADMIN_CODES.values() for a2 in a1}
    assert refs["admin3"].codes == {
        a3 for a1 in ADMIN_CODES.values() for a3s in a1.values() for a3 in a3s
    }
    assert refs["sites"].codes == {site for sites in SITES.values() for site in sites}
    assert refs["admin3"].source.endswith("admin_codes.example.csv")
    assert "KE01-02-003" in refs["admin3"] and len(refs["admin1"]) == len(ADMIN_CODES)


def test_example_declares_every_generated_field() -> None:
    config = load_collections(EXAMPLE)
    for collection, records in (
        ("beneficiaries", beneficiaries(200)),
        ("distributions", distributions(200)),
    ):
        fields = config[collection].fields
        for record in records:
            assert set(record) <= set(fields), set(record) - set(fields)
    members = config["beneficiaries"].fields["members"].items
    assert members is not None
    assert set(members.fields) == {"name", "sex", "birth_date", "relation"}


def test_every_setting_has_a_doc_text() -> None:
    for cls in (CollectionSection, FieldSection, RuleSection, ReferenceSection):
        docs = documented_keys(cls)
        assert docs and all(text.strip() for text in docs.values()), cls


def test_every_setting_is_shown_in_the_example_header() -> None:
    text = EXAMPLE.read_text()
    header = text[: text.index("[references.admin1]")]
    for cls in (CollectionSection, FieldSection, RuleSection, ReferenceSection):
        for key in documented_keys(cls):
            if key not in ("description", "allow_unknown_fields", "fields", "rules", "items"):
                assert key in header, key


# ------------------------------------------------------------------------------------------------
# Bad configs: file + dotted key + reason + line.
# ------------------------------------------------------------------------------------------------

BASE = """\
# a small, valid collections file the cases below break one way each
[references.regions]
codes = ["R1", "R2"]

[collections.people]
key = "id"
mode = "mutable"

[collections.people.fields]
id = { type = "string" }
name = { type = "string", required = true, max_length = 50 }
age = { type = "integer", min = 0, max = 130 }
region = { type = "string" }
born = { type = "date" }
registered = { type = "date" }
tags = { type = "list", items = "string" }
visits = { type = "list", items = { type = "object", fields = { on = { type = "date" } } } }
home = { type = "object", fields = { lat = { type = "decimal" } } }
status = { type = "enum", values = ["open", "closed"] }

[collections.people.rules]
born_before_registered = { check = "compare", field = "born", op = "<=", other = "registered" }
region_known = { check = "in_reference", field = "region", table = "regions" }

[collections.events]
key = "id"
mode = "append_only"

[collections.events.fields]
id = { type = "string" }
kind = { type = "enum", values = ["a", "b"] }
"""

P = "collections.people"
AGE = 'age = { type = "integer", min = 0, max = 130 }'
NAME = 'name = { type = "string", required = true, max_length = 50 }'
KIND = 'kind = { type = "enum", values = ["a", "b"] }'
COMPARE = 'born_before_registered = { check = "compare", field = "born", op = "<=", other = "registered" }'
REGION_RULE = 'region_known = { check = "in_reference", field = "region", table = "regions" }'
HOME = 'home = { type = "object", fields = { lat = { type = "decimal" } } }'
REGIONS = 'codes = ["R1", "R2"]'

# (id, text replaced, replacement, dotted key, reason fragment, a substring on the expected line)
BAD_CONFIGS = [
    (
        "unknown_key",
        AGE,
        AGE[:-2] + ', colour = "red" }',
        f"{P}.fields.age.colour",
        "unknown setting",
        "colour",
    ),
    (
        "unknown_type",
        'region = { type = "string" }',
        'region = { type = "text" }',
        f"{P}.fields.region.type",
        "must be one of string, integer",
        "text",
    ),
    (
        "bad_regex",
        NAME,
        NAME[:-2] + ', pattern = "[a-" }',
        f"{P}.fields.name.pattern",
        "not a valid regular expression",
        "[a-",
    ),
    (
        "policy_without_owner",
        AGE,
        AGE[:-2] + ', policy = "source_of_truth" }',
        f"{P}.fields.age.owner",
        "is required for policy source_of_truth",
        "source_of_truth",
    ),
    (
        "append_only_with_review",
        KIND,
        KIND[:-2] + ', policy = "review" }',
        "collections.events.fields.kind.policy",
        "append_only collections never conflict",
        "review",
    ),
    (
        "rule_unknown_field",
        COMPARE,
        COMPARE.replace('"born"', '"borne"'),
        f"{P}.rules.born_before_registered.field",
        "no field 'borne'",
        "borne",
    ),
    (
        "rule_unknown_table",
        REGION_RULE,
        REGION_RULE.replace('"regions"', '"countries"'),
        f"{P}.rules.region_known.table",
        "no reference table 'countries' (known: regions)",
        "countries",
    ),
    (
        "unknown_table",
        "[collections.people]\n",
        "[settings]\nx = 1\n\n[collections.people]\n",
        "settings",
        "unknown table (known: collections, references)",
        "[settings]",
    ),
    (
        "key_not_declared",
        'key = "id"\nmode = "append_only"',
        'key = "event_id"\nmode = "append_only"',
        "collections.events.key",
        "'event_id', which is not in collections.events.fields",
        "event_id",
    ),
    (
        "key_of_wrong_type",
        'id = { type = "string" }\nkind',
        'id = { type = "date" }\nkind',
        "collections.events.fields.id.type",
        "must be a string or integer",
        'id = { type = "date"',
    ),
    (
        "bad_owner",
        AGE,
        AGE[:-2] + ', policy = "review", owner = "kakuma" }',
        f"{P}.fields.age.owner",
        "must be group:NAME or hq:NAME",
        "kakuma",
    ),
    (
        "lww_with_owner",
        AGE,
        AGE[:-2] + ', owner = "hq:crm" }',
        f"{P}.fields.age.owner",
        "lww fields have no owner",
        "hq:crm",
    ),
    (
        "min_above_max",
        AGE,
        AGE.replace("min = 0", "min = 200"),
        f"{P}.fields.age.max",
        "is below min",
        "min = 200",
    ),
    (
        "min_on_a_string",
        NAME,
        NAME[:-2] + ", min = 1 }",
        f"{P}.fields.name.min",
        "does not apply to a string field (use min_length/max_length)",
        "min = 1",
    ),
    (
        "fractional_integer_bound",
        AGE,
        AGE.replace("min = 0", "min = 0.5"),
        f"{P}.fields.age.min",
        "must be an integer for an integer field, got 0.5",
        "min = 0.5",
    ),
    (
        "required_not_a_bool",
        AGE,
        AGE[:-2] + ', required = "yes" }',
        f"{P}.fields.age.required",
        "must be true or false",
        '"yes"',
    ),
    (
        "enum_without_values",
        KIND,
        'kind = { type = "enum", values = [] }',
        "collections.events.fields.kind.values",
        "at least one value",
        "values = []",
    ),
    (
        "enum_value_twice",
        KIND,
        'kind = { type = "enum", values = ["a", "a"] }',
        "collections.events.fields.kind.values",
        "holds a value twice",
        '"a", "a"',
    ),
    (
        "list_without_items",
        'tags = { type = "list", items = "string" }',
        'tags = { type = "list" }',
        f"{P}.fields.tags.items",
        "is required",
        "tags =",
    ),
    (
        "nested_policy",
        HOME,
        HOME.replace('"decimal"', '"decimal", policy = "review"'),
        f"{P}.fields.home.fields.lat.policy",
        "conflict settings apply to a record's own fields",
        "home =",
    ),
    (
        "nested_too_deep",
        HOME,
        'home = { type = "object", fields = { a = { type = "object", fields = { b = { type = "list",'
        ' items = { type = "object", fields = { d = { type = "list", items = "string" } } } } } } } }',
        f"{P}.fields.home.fields.a.fields.b.items.fields.d",
        "nest at most 4 deep",
        "home =",
    ),
    (
        "datetime_bound_without_offset",
        'born = { type = "date" }',
        'born = { type = "datetime", min = 2020-01-01T00:00:00 }',
        f"{P}.fields.born.min",
        "must be a TOML date-time with offset",
        "2020-01-01T00:00:00",
    ),
    (
        "bad_field_name",
        'region = { type = "string" }',
        '"re gion" = { type = "string" }',
        f"{P}.fields.re gion",
        "field names start with a letter",
        "re gion",
    ),
    (
        "rule_unknown_check",
        COMPARE,
        COMPARE.replace('"compare"', '"unique"'),
        f"{P}.rules.born_before_registered.check",
        "must be one of not_in_future",
        "unique",
    ),
    (
        "rule_setting_of_another_check",
        COMPARE,
        COMPARE[:-2] + ", tolerance_days = 2 }",
        f"{P}.rules.born_before_registered.tolerance_days",
        "not a setting of a compare rule",
        "tolerance_days",
    ),
    (
        "compare_bad_operator",
        COMPARE,
        COMPARE.replace('"<="', '"=>"'),
        f"{P}.rules.born_before_registered.op",
        "must be one of < <= > >= == !=",
        "=>",
    ),
    (
        "compare_mixed_types",
        COMPARE,
        COMPARE.replace('"registered"', '"age"'),
        f"{P}.rules.born_before_registered.other",
        "cannot compare born (date) with age (integer)",
        '"age"',
    ),
    (
        "compare_other_and_value",
        COMPARE,
        COMPARE[:-2] + ", value = 2020-01-01 }",
        f"{P}.rules.born_before_registered",
        "exactly one of other (a field) or value",
        "2020-01-01",
    ),
    (
        "compare_value_of_wrong_type",
        COMPARE,
        'born_before_registered = { check = "compare", field = "born", op = "<=", value = 12 }',
        f"{P}.rules.born_before_registered.value",
        "cannot be compared with date values",
        "= 12",
    ),
    (
        "ordering_an_enum",
        COMPARE,
        'born_before_registered = { check = "compare", field = "status", op = "<", value = "open" }',
        f"{P}.rules.born_before_registered.op",
        "compares numbers, dates and datetimes",
        '"status"',
    ),
    (
        "not_in_future_on_a_string",
        REGION_RULE,
        REGION_RULE + '\nname_today = { check = "not_in_future", field = "name" }',
        f"{P}.rules.name_today.field",
        "needs a date or datetime, name is a string",
        "name_today",
    ),
    (
        "path_through_a_list",
        REGION_RULE,
        REGION_RULE + '\nvisit_past = { check = "not_in_future", field = "visits.on" }',
        f"{P}.rules.visit_past.field",
        "visits is a list: write visits[] to look into its items",
        "visit_past",
    ),
    (
        "count_of_a_non_list",
        REGION_RULE,
        REGION_RULE + '\nsize = { check = "count_equals_length", field = "age", list = "name" }',
        f"{P}.rules.size.list",
        "must name a list field",
        "size =",
    ),
    (
        "required_if_without_when",
        REGION_RULE,
        REGION_RULE + '\nneeds_name = { check = "required_if", field = "name" }',
        f"{P}.rules.needs_name.when",
        "is required",
        "needs_name",
    ),
    (
        "reference_codes_and_file",
        REGIONS,
        REGIONS + '\nfile = "regions.csv"',
        "references.regions",
        "give exactly one of codes or values (inline) or file",
        "[references.regions]",
    ),
    (
        "reference_file_missing",
        REGIONS,
        'file = "regions.csv"',
        "references.regions.file",
        "cannot read",
        "regions.csv",
    ),
    (
        "key_not_a_string",
        'key = "id"\nmode = "mutable"',
        'key = 1\nmode = "mutable"',
        f"{P}.key",
        "must be a string",
        "key = 1",
    ),
]


def _line(text: str, marker: str) -> int:
    return text[: text.index(marker)].count("\n") + 1


@pytest.mark.parametrize(
    ("old", "new", "key", "reason", "marker"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CONFIGS],
)
def test_bad_config_names_file_key_reason_and_line(
    tmp_path: Path, old: str, new: str, key: str, reason: str, marker: str
) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    path = tmp_path / "collections.toml"
    path.write_text(text)
    with pytest.raises(CollectionsConfigError) as caught:
        load_collections(path)
    error = caught.value
    assert isinstance(error, ConfigError)
    assert (error.path, error.key) == (str(path), key)
    assert reason in error.reason
    assert error.line == _line(text, marker), (error.line, str(error))
    assert str(error).startswith(f"{path}:{error.line}: {key}: ")


def test_the_base_of_the_bad_configs_is_good(tmp_path: Path) -> None:
    path = tmp_path / "collections.toml"
    path.write_text(BASE)
    config = load_collections(path)
    assert set(config.collections) == {"people", "events"}


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "collections.toml"
    path.write_text(BASE.replace('mode = "mutable"', 'mode = "mutable'))
    with pytest.raises(CollectionsConfigError) as caught:
        load_collections(path)
    assert caught.value.line == _line(BASE, 'mode = "mutable"')
    assert "not valid TOML" in caught.value.reason


def test_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(CollectionsConfigError, match="file not found"):
        load_collections(tmp_path / "nope.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(CollectionsConfigError, match="not UTF-8"):
        load_collections(path)


def test_an_empty_file_declares_no_collection(tmp_path: Path) -> None:
    path = tmp_path / "collections.toml"
    path.write_text("# nothing yet\n")
    with pytest.raises(CollectionsConfigError, match="declares no collection"):
        load_collections(path)


def test_from_dict_raises_plain_config_errors_naming_the_source() -> None:
    data = tomllib.loads(BASE.replace('type = "text"', "").replace(AGE, AGE[:-2] + ", x = 1 }"))
    with pytest.raises(ConfigError) as caught:
        collections_from_dict(data, "remote:hq")
    assert (caught.value.path, caught.value.key) == ("remote:hq", f"{P}.fields.age.x")


# ------------------------------------------------------------------------------------------------
# Reference tables from files.
# ------------------------------------------------------------------------------------------------


def _with_reference(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "collections.toml"
    path.write_text(BASE.replace(f"[references.regions]\n{REGIONS}", table))
    return path


def test_reference_from_csv_first_column_by_default(tmp_path: Path) -> None:
    (tmp_path / "regions.csv").write_text("code,name\nR1,North\n R2 ,South\n,blank\n")
    config = load_collections(
        _with_reference(tmp_path, '[references.regions]\nfile = "regions.csv"')
    )
    assert config.references["regions"].codes == {"R1", "R2"}


def test_reference_from_json_list_and_objects(tmp_path: Path) -> None:
    (tmp_path / "codes.json").write_text(json.dumps(["R1", "R2", 7]))
    config = load_collections(
        _with_reference(tmp_path, '[references.regions]\nfile = "codes.json"')
    )
    assert config.references["regions"].codes == {"R1", "R2", 7}
    (tmp_path / "objs.json").write_text(json.dumps([{"code": "R1"}, {"code": "R3"}, {"x": 1}]))
    assert read_reference_file(tmp_path / "objs.json", "code") == {"R1", "R3"}


@pytest.mark.parametrize(
    ("name", "content", "column", "key", "reason"),
    [
        ("r.csv", "code\nR1\n", "region", "references.regions.column", "no column 'region'"),
        ("r.csv", "", None, "references.regions.file", "empty file"),
        ("r.json", "{not json", None, "references.regions.file", "not valid JSON"),
        ("r.json", '{"R1": 1}', None, "references.regions.file", "holds a list"),
        ("r.json", '[{"code": "R1"}]', None, "references.regions.column", "set column"),
        ("r.json", "[[1]]", None, "references.regions.file", "item 0 is not a code"),
        ("r.txt", "R1\n", None, "references.regions.file", ".csv or .json"),
        ("r.csv", "code\n\n", None, "references.regions", "holds no codes"),
    ],
)
def test_bad_reference_files(
    tmp_path: Path, name: str, content: str, column: str | None, key: str, reason: str
) -> None:
    (tmp_path / name).write_text(content)
    table = f'[references.regions]\nfile = "{name}"' + (f'\ncolumn = "{column}"' if column else "")
    path = _with_reference(tmp_path, table)
    with pytest.raises(CollectionsConfigError) as caught:
        load_collections(path)
    assert caught.value.key == key and reason in caught.value.reason, str(caught.value)
    assert caught.value.line is not None


# ------------------------------------------------------------------------------------------------
# Paths and line lookup.
# ------------------------------------------------------------------------------------------------


def test_parse_path() -> None:
    assert parse_path("gps.lat") == (("gps", False), ("lat", False))
    assert parse_path("members[].sex") == (("members", True), ("sex", False))
    assert parse_path("a..b") is None and parse_path("a[0]") is None and parse_path("") is None


def test_key_lines_follow_headers_dotted_keys_inline_tables_and_multiline_values() -> None:
    text = (
        "# [not.a.header] in a comment\n"  # 1
        "[a]\n"  # 2
        "x = 1\n"  # 3
        "y.z = { p = 1 }\n"  # 4
        "long = [\n"  # 5
        '  "q = 1",\n'  # 6
        "]\n"  # 7
        'doc = """\n'  # 8
        "[fake]\n"  # 9
        '"""\n'  # 10
        '[a."b c"]\n'  # 11
        "w = 2\n"  # 12
        "[[arr]]\n"  # 13
        "v = 3\n"  # 14
    )
    lines = key_lines(text)
    assert lines[("a",)] == 2 and lines[("a", "x")] == 3
    assert lines[("a", "y")] == 4 and lines[("a", "y", "z")] == 4
    assert lines[("a", "long")] == 5 and ("a", "q") not in lines
    assert ("fake",) not in lines and ("not", "a", "header") not in lines
    assert lines[("a", "b c", "w")] == 12 and lines[("arr", "v")] == 14
    assert line_of_key(text, "a.y.z.p") == 4  # inside an inline table: its line
    assert line_of_key(text, "a.nothing") == 2  # absent: the nearest written parent
    assert line_of_key(text, "arr[0].v") == 14
    assert line_of_key(text, "elsewhere") is None and line_of_key(text, "") is None


def test_example_rule_keys_have_lines() -> None:
    text = EXAMPLE.read_text()
    line = line_of_key(text, "collections.beneficiaries.rules.born_before_registration.other")
    assert line is not None and "born_before_registration =" in text.splitlines()[line - 1]
    line = line_of_key(text, "collections.beneficiaries.fields.members.items.fields.sex.values")
    assert line is not None and text.splitlines()[line - 1].startswith("sex = ")


# ------------------------------------------------------------------------------------------------
# Any damage to a config is a ConfigError, never another exception.
# ------------------------------------------------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["string", "list", "object", "enum", "compare", "<=", "members[].sex", "lww"]),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, (*prefix, i))
    return out


@examples(300)
@given(data=st.data())
def test_any_damaged_config_fails_with_a_config_error(data: st.DataObject) -> None:
    config = tomllib.loads(EXAMPLE.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(config)))
        target: Any = config
        for step in path[:-1]:
            target = target[step]
        if data.draw(st.booleans()) and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(toml_values)
    try:
        collections_from_dict(config, str(EXAMPLE))
    except ConfigError as e:
        error: ConfigError | None = e
    else:
        error = None
    assert error is None or error.reason  # anything else raised fails the test
