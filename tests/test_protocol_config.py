"""Typed TOML configuration: every bad key, type or value is refused with its dotted key path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples

from protocol.config import (
    ConfigError,
    at_least,
    between,
    build,
    documented_keys,
    listen_address,
    load,
    positive,
    setting,
)


@dataclass
class Link:
    batch_bytes: int = setting(65536, "Largest batch to seal, in bytes.", positive)
    retry_s: float = setting(2.5, "First retry delay, in seconds.", at_least(0.1))
    compress: bool = setting(True, "Compress batches with zstd.")


# setting() returns a dataclasses.field (a copy per instance for lists and dicts), which ruff's
# RUF009 cannot see: hence the noqa comments.
@dataclass
class Storage:
    path: Path = setting(Path("data/agent.db"), "SQLite database file.")  # noqa: RUF009
    spool: Path | None = setting(None, "Optional folder for bundles.")  # noqa: RUF009
    link: Link = field(default_factory=Link, metadata={"doc": "Link tuning."})


@dataclass
class Collection:
    key: str = setting("id", "Key field of the collection.")
    fields: list[str] = setting([], "Field names.")  # noqa: RUF009
    level: int = setting(3, "zstd level.", between(1, 19))


@dataclass
class Root:
    name: str = setting("office", "Display name of this node.")
    listen: str = setting("127.0.0.1:8470", "HOST:PORT of the local API.", listen_address)
    storage: Storage = field(default_factory=Storage)
    collections: dict[str, Collection] = setting({}, "Collections, by name.")  # noqa: RUF009
    tags: list[str] = setting([], "Free-form labels.")  # noqa: RUF009


@dataclass
class Required:
    token: str = dataclasses.field(metadata={"doc": "Enrolment token."})


# Every leaf of Root, with one valid value and values of the wrong type.
LEAVES: dict[str, tuple[Any, list[Any]]] = {
    "name": ("kakuma", [1, True, None, ["a"], {"a": 1}]),
    "listen": ("0.0.0.0:80", [80, None, False]),
    "tags": (["a", "b"], ["a", [1], [None], {"a": 1}]),
    "storage.path": ("/var/lib/x.db", [1, "", None, ["x"]]),
    "storage.spool": ("/mnt/usb", [1, "", ["x"]]),
    "storage.link.batch_bytes": (100, [1.5, "100", True, None]),
    "storage.link.retry_s": (3, ["3", True, None, [1.0]]),
    "storage.link.compress": (False, [0, 1, "true", None]),
    "collections.people.key": ("uid", [1, None]),
    "collections.people.fields": (["a"], ["a", [1], [1.5]]),
    "collections.people.level": (9, [9.0, "9", True]),
}
FAILED_CHECKS = {
    "listen": ["localhost", "127.0.0.1:65536", ":80", "127.0.0.1:http"],
    "storage.link.batch_bytes": [0, -1],
    "storage.link.retry_s": [0, 0.09, -5],
    "collections.people.level": [0, 20],
}


def nest(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def test_defaults() -> None:
    root = build(Root, {}, "x.toml")
    assert root == Root()
    assert root.storage.link.batch_bytes == 65536
    assert root.collections == {}
    assert root.tags == []


def test_list_and_dict_defaults_are_not_shared() -> None:
    one, two = build(Root, {}, "x.toml"), build(Root, {}, "x.toml")
    one.tags.append("x")
    one.collections["y"] = Collection()
    assert two.tags == []
    assert two.collections == {}


@pytest.mark.parametrize("path", list(LEAVES))
def test_valid_value_is_taken(path: str) -> None:
    good, _ = LEAVES[path]
    root = build(Root, nest(path, good), "x.toml")
    value = get(root, path)
    assert value == (Path(good) if "path" in path or "spool" in path else good)


def test_paths_become_path_objects_and_ints_pass_as_floats() -> None:
    root = build(Root, {"storage": {"path": "a.db", "link": {"retry_s": 3}}}, "x.toml")
    assert root.storage.path == Path("a.db")
    assert root.storage.spool is None
    assert root.storage.link.retry_s == 3


@pytest.mark.parametrize(
    ("path", "bad"), [(p, bad) for p, (_, bads) in LEAVES.items() for bad in bads], ids=repr
)
def test_wrong_type_names_the_key(path: str, bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        build(Root, nest(path, bad), "agent.toml")
    assert caught.value.key == path
    assert str(caught.value).startswith(f"agent.toml: {path}: ")
    assert "must be" in caught.value.reason


@pytest.mark.parametrize(
    ("path", "bad"), [(p, bad) for p, bads in FAILED_CHECKS.items() for bad in bads], ids=repr
)
def test_failed_check_names_the_key(path: str, bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        build(Root, nest(path, bad), "agent.toml")
    assert caught.value.key == path
    assert f"got {bad!r}" in caught.value.reason


section_paths = st.sampled_from(["", "storage.", "storage.link.", "collections.people."])
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)


@examples(100)
@given(section=section_paths, name=identifiers, value=st.integers() | st.text(max_size=5))
def test_unknown_key_at_any_depth_names_its_path(section: str, name: str, value: Any) -> None:
    known = {f.name for f in dataclasses.fields(Root)} | {"path", "spool", "link"}
    known |= {"batch_bytes", "retry_s", "compress", "key", "fields", "level"}
    if name in known:
        return
    with pytest.raises(ConfigError, match="unknown setting") as caught:
        build(Root, nest(section + name, value), "x.toml")
    assert caught.value.key == section + name
    assert f"x.toml: {section + name}: unknown setting (known: " in str(caught.value)


@examples(100)
@given(
    values=st.fixed_dictionaries(
        {},
        optional={path: st.sampled_from([good, *bads]) for path, (good, bads) in LEAVES.items()},
    )
)
def test_first_bad_value_is_reported_with_its_path(values: dict[str, Any]) -> None:
    """Any mix of good and bad leaves: accepted iff every leaf is good; else a bad leaf is named."""
    data: dict[str, Any] = {}
    for path, value in values.items():
        target = data
        *parents, last = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    bad = {
        p for p, v in values.items() if not (v == LEAVES[p][0] and type(v) is type(LEAVES[p][0]))
    }
    if not bad:
        build(Root, data, "x.toml")
        return
    with pytest.raises(ConfigError) as caught:
        build(Root, data, "x.toml")
    assert caught.value.key in bad


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"storage": 5}, "storage"),
        ({"storage": {"link": []}}, "storage.link"),
        ({"collections": ["people"]}, "collections"),
        ({"collections": {"people": "id"}}, "collections.people"),
    ],
)
def test_sections_and_tables_must_be_tables(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match="must be a table") as caught:
        build(Root, data, "x.toml")
    assert caught.value.key == key


def test_tables_of_sections() -> None:
    root = build(
        Root, {"collections": {"people": {"key": "uid"}, "sites": {"level": 19}}}, "x.toml"
    )
    assert root.collections == {"people": Collection(key="uid"), "sites": Collection(level=19)}


def test_required_setting() -> None:
    with pytest.raises(ConfigError, match="is required") as caught:
        build(Required, {}, "x.toml")
    assert caught.value.key == "token"
    assert build(Required, {"token": "t"}, "x.toml").token == "t"


def test_documented_keys_lists_nested_and_table_keys() -> None:
    assert documented_keys(Root) == {
        "name": "Display name of this node.",
        "listen": "HOST:PORT of the local API.",
        "storage.path": "SQLite database file.",
        "storage.spool": "Optional folder for bundles.",
        "storage.link.batch_bytes": "Largest batch to seal, in bytes.",
        "storage.link.retry_s": "First retry delay, in seconds.",
        "storage.link.compress": "Compress batches with zstd.",
        "collections.*.key": "Key field of the collection.",
        "collections.*.fields": "Field names.",
        "collections.*.level": "zstd level.",
        "tags": "Free-form labels.",
    }


def test_load_reads_toml_and_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "agent.toml"
    good.write_text(
        'name = "kakuma"\n[storage.link]\nbatch_bytes = 4096\n[collections.people]\nkey = "uid"\n'
    )
    root = load(Root, good)
    assert (root.name, root.storage.link.batch_bytes) == ("kakuma", 4096)
    assert root.collections["people"].key == "uid"
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage.link]\nbatch_bytes = 0\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: storage\.link\.batch_bytes: must be"):
        load(Root, bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load(Root, broken)
    assert caught.value.path == str(broken)
    assert caught.value.key == ""
    with pytest.raises(ConfigError, match="file not found"):
        load(Root, tmp_path / "missing.toml")


@dataclass
class Modes:
    mode: Literal["mutable", "append_only"] = setting("mutable", "Collection mode.")


def test_literal_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="mode"):
        build(Modes, {"mode": "sometimes"}, "x.toml")
