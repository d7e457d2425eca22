"""Edge transforms and forwarding modes in the collections config: what loads, what is refused
(file, line, dotted key, reason), and what the pure transform engine makes of a record."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.fieldgen import beneficiaries
from protocol.collections import CollectionsConfig, CollectionsConfigError, load_collections
from protocol.transforms import original, transform

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "collections.example.toml"

BASE = """\
[references.regions]
values = { R1 = "North", R2 = "South" }

[collections.people]
key = "id"
mode = "mutable"

[collections.people.fields]
id = { type = "string" }
given = { type = "string", required = true }
family = { type = "string" }
region = { type = "string" }
secret = { type = "string" }
gps = { type = "object", fields = { lat = { type = "decimal" } } }

[collections.people.transform]
lookup = { region_name = { field = "region", table = "regions" } }
derive = { label = "{family}, {given} ({region_name})" }
rename = { given = "first_name" }
drop = ["secret"]

[collections.events]
key = "id"
mode = "append_only"

[collections.events.fields]
id = { type = "string" }
day = { type = "date", required = true }
site = { type = "string", required = true }
lines = { type = "list", items = { type = "object", fields = { unit = { type = "string" }, qty = { type = "decimal" } } } }
"""


def load(tmp_path: Path, text: str = BASE) -> CollectionsConfig:
    path = tmp_path / "collections.toml"
    path.write_text(text)
    return load_collections(path)


def test_example_transform_keeps_every_generated_beneficiary_valid() -> None:
    config = load_collections(EXAMPLE)
    ben = config["beneficiaries"]
    assert ben.transform is not None and ben.transform.drop == {"id_document_number"}
    assert ben.owner("household_size") == "group:field-registration"
    for record in beneficiaries(200, seed=3):
        fields, local_only, problems = transform(ben, record, config.references)
        assert not problems
        assert fields["display_name"] == f"{record['given_name']} {record['family_name']}"
        assert local_only == {"id_document_number"}


def test_lookup_derive_rename_drop(tmp_path: Path) -> None:
    config = load(tmp_path)
    people = config["people"]
    record = {"id": "p1", "given": "Ana", "family": "Diaz", "region": "R2", "secret": "x"}
    fields, local_only, problems = transform(people, record, config.references)
    assert problems == []
    assert fields == {
        "id": "p1",
        "first_name": "Ana",
        "family": "Diaz",
        "region": "R2",
        "secret": "x",
        "region_name": "South",
        "label": "Diaz, Ana (South)",
    }
    assert local_only == {"secret"}
    # A renamed field keeps its conflict settings under its wire name.
    assert people.policy("first_name") == "lww"
    # The inverse gives the declared shape back (what a PATCH is laid over).
    assert original(people, fields) == record


def test_missing_placeholder_gives_null_and_unknown_code_is_a_transform_problem(
    tmp_path: Path,
) -> None:
    config = load(tmp_path)
    people = config["people"]
    fields, _, problems = transform(people, {"id": "p1", "given": "Ana"}, config.references)
    assert fields["label"] is None and fields["region_name"] is None and not problems
    _, _, problems = transform(
        people, {"id": "p1", "given": "A", "region": "R9"}, config.references
    )
    (problem,) = problems
    assert (problem.field, problem.rule, problem.stage) == ("region", "region_name", "transform")
    assert "'R9'" in problem.message and "regions" in problem.message


def test_lookup_default_and_csv_lookup_table(tmp_path: Path) -> None:
    (tmp_path / "codes.csv").write_text("code,name\nR1,North\nR2,South\n")
    text = BASE.replace(
        'values = { R1 = "North", R2 = "South" }', 'file = "codes.csv"\nvalue_column = "name"'
    ).replace('table = "regions" }', 'table = "regions", default = "elsewhere" }')
    config = load(tmp_path, text)
    people = config["people"]
    refs = config.references
    assert transform(people, {"id": "1", "given": "a", "region": "R1"}, refs)[0]["region_name"] == (
        "North"
    )
    assert transform(people, {"id": "1", "given": "a", "region": "R7"}, refs)[0]["region_name"] == (
        "elsewhere"
    )


SUMMARY = """
forward = "summary"
[collections.events.summary]
collection = "event_totals"
time_field = "day"
group_by = ["site", "lines[].unit"]
aggregates = { n = { op = "count" }, qty = { op = "sum", field = "lines[].qty" } }
"""


def test_summary_config_loads(tmp_path: Path) -> None:
    text = BASE.replace('mode = "append_only"\n', 'mode = "append_only"\n' + SUMMARY, 1)
    # The summary table comes after the [collections.events] keys but before its fields.
    config = load(tmp_path, text)
    summary = config["events"].summary
    assert summary is not None and summary.each == "lines" and summary.window == "day"
    assert summary.field_names == ("site", "unit", "node", "window_start", "window_end", "n", "qty")


BAD = [
    # (replace this, with that, the dotted key, words of the reason)
    ('drop = ["secret"]', 'drop = ["nope"]', "collections.people.transform.drop", "declared field"),
    ('drop = ["secret"]', 'drop = ["id"]', "collections.people.transform.drop", "key field"),
    ('drop = ["secret"]', 'drop = ["given"]', "collections.people.transform.drop", "renamed"),
    (
        'rename = { given = "first_name" }',
        'rename = { given = "family" }',
        "collections.people.transform.rename.given",
        "declared field",
    ),
    (
        "derive = { label",
        "derive = { family",
        "collections.people.transform.derive.family",
        "declared field",
    ),
    (
        '"{family}, {given} ({region_name})"',
        '"{family"',
        "collections.people.transform.derive.label",
        "never closed",
    ),
    (
        '"{family}, {given} ({region_name})"',
        '"{gps}"',
        "collections.people.transform.derive.label",
        "a template takes one value",
    ),
    (
        '"{family}, {given} ({region_name})"',
        '"{nowhere}"',
        "collections.people.transform.derive.label",
        "no field 'nowhere'",
    ),
    (
        'table = "regions" }',
        'table = "other" }',
        "collections.people.transform.lookup.region_name.table",
        "no reference table 'other'",
    ),
    (
        'lookup = { region_name = { field = "region", table = "regions" } }',
        'lookup = { region_name = { field = "gps", table = "regions" } }',
        "collections.people.transform.lookup.region_name.field",
        "looks up codes",
    ),
    (
        'drop = ["secret"]',
        'drop = ["secret"]\nshape = 1',
        "collections.people.transform.shape",
        "unknown setting",
    ),
    (
        'mode = "mutable"',
        'mode = "mutable"\nforward = "summary"',
        "collections.people.transform",
        "nothing to transform",
    ),
    (
        'mode = "append_only"',
        'mode = "append_only"\nforward = "summary"',
        "collections.events.summary",
        "is required",
    ),
    (
        'mode = "append_only"',
        'mode = "append_only"\nforward = "exceptions"',
        "collections.events.flags",
        "is required",
    ),
    (
        'mode = "append_only"',
        'mode = "append_only"\nflags_field = "why"',
        "collections.events.flags_field",
        "exceptions",
    ),
    (
        'mode = "append_only"',
        'mode = "append_only"\nforward = "everything"',
        "collections.events.forward",
        "must be one of",
    ),
]


@pytest.mark.parametrize(("old", "new", "key", "reason"), BAD)
def test_bad_transform_and_forward_settings(
    tmp_path: Path, old: str, new: str, key: str, reason: str
) -> None:
    assert old in BASE
    with pytest.raises(CollectionsConfigError) as caught:
        load(tmp_path, BASE.replace(old, new, 1))
    error = caught.value
    assert error.key == key and reason in error.reason, str(error)
    assert error.line is not None and str(error).startswith(f"{tmp_path / 'collections.toml'}:")


BAD_SUMMARY = [
    ('time_field = "day"', 'time_field = "site"', "summary.time_field", "date or datetime"),
    ('group_by = ["site", "lines[].unit"]', 'group_by = ["lines"]', "summary.group_by", "a list"),
    (
        'group_by = ["site", "lines[].unit"]',
        'group_by = ["site", "site"]',
        "summary.group_by",
        "names another field",
    ),
    (
        'qty = { op = "sum", field = "lines[].qty" }',
        'qty = { op = "sum", field = "site" }',
        "summary.aggregates.qty.field",
        "sum takes",
    ),
    (
        'n = { op = "count" }',
        'n = { op = "count", field = "site" }',
        "summary.aggregates.n.field",
        "reads no field",
    ),
    ('n = { op = "count" }', 'node = { op = "count" }', "summary.aggregates.node", "another field"),
    ('collection = "event_totals"', 'collection = "people"', "summary.collection", "declared"),
    ('time_field = "day"', 'time_field = "day"\nwindow = "hour"', "summary.window", "hours"),
    (
        'time_field = "day"',
        'time_field = "day"\nwindow = "fortnight"',
        "summary.window",
        "must be one of",
    ),
]


@pytest.mark.parametrize(("old", "new", "key", "reason"), BAD_SUMMARY)
def test_bad_summary_settings(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    text = BASE.replace('mode = "append_only"\n', 'mode = "append_only"\n' + SUMMARY, 1)
    assert old in text
    with pytest.raises(CollectionsConfigError) as caught:
        load(tmp_path, text.replace(old, new, 1))
    assert caught.value.key == "collections.events." + key, str(caught.value)
    assert reason in caught.value.reason and caught.value.line is not None


def test_summary_needs_an_append_only_collection(tmp_path: Path) -> None:
    text = BASE.replace('mode = "append_only"\n', 'mode = "mutable"\n' + SUMMARY, 1)
    with pytest.raises(CollectionsConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.key == "collections.events.forward"
    assert "append_only" in caught.value.reason


def test_exceptions_flags_field_may_not_shadow_a_field(tmp_path: Path) -> None:
    flags = (
        'mode = "append_only"\nforward = "exceptions"\nflags_field = "site"\n'
        '[collections.events.flags]\nsmall = { check = "compare", field = "lines[].qty", '
        'op = "<=", value = 100 }\n'
    )
    with pytest.raises(CollectionsConfigError) as caught:
        load(tmp_path, BASE.replace('mode = "append_only"\n', flags, 1))
    assert caught.value.key == "collections.events.flags_field"
    ok = load(tmp_path, BASE.replace('mode = "append_only"\n', flags.replace('"site"', '"why"'), 1))
    assert [r.name for r in ok["events"].flags] == ["small"]
