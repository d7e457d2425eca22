"""protocol.limits: the rules a change must keep, the same for agent and HQ (issue 9, defect 6)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits
from protocol.limits import (
    MAX_KEY_BYTES,
    change_problem,
    field_name_problem,
    key_problem,
    value_problem,
)
from protocol.summary import summary_key

SPEC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text("utf-8")


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("", "key_required"),
        (" ", "key_required"),
        ("a\x00", "key_chars"),
        ("a\r", "key_chars"),
        ("a\x85", "key_chars"),  # C1 NEL
        ("a\u2029", "key_chars"),
        ("x" * (MAX_KEY_BYTES + 1), "key_length"),
        ("€" * (MAX_KEY_BYTES // 3 + 1), "key_length"),
    ],
)
def test_bad_keys(key: str, rule: str) -> None:
    problem = key_problem(key)
    assert problem is not None and problem.rule == rule


@pytest.mark.parametrize("key", ["b1", " padded ", "Ünïcode ключ", "a b", "\u00a0x", "x" * 1024])
def test_good_keys(key: str) -> None:
    assert key_problem(key) is None


def test_names_and_values() -> None:
    assert field_name_problem("household_size") is None
    for bad in ("", "_op", "1x", "a-b", "a\x00", "é", "a" * 65):
        assert field_name_problem(bad) is not None, bad
    assert value_problem("x", {"a": [1, 2.5, None, True, "s", 2**64 - 1, -(2**63)]}) is None
    for bad in (b"", float("inf"), {1: 2}, [object()], 2**64):
        problem = value_problem("x", bad)
        assert problem is not None and problem.rule == "value_type", bad
    assert change_problem("c", "k", {"a": 1}) is None


@given(st.lists(st.text(min_size=0, max_size=400), min_size=1, max_size=4))
def test_summary_keys_always_keep_the_key_rules(groups: list[str]) -> None:
    key = summary_key("n" + "a" * 26, "2026-01-01", tuple(groups))
    assert key_problem(key) is None


def test_summary_keys_short_ones_unchanged_long_ones_distinct() -> None:
    assert summary_key("n1", "2026-01-01", ("a|b", None, True)) == "n1|2026-01-01|a%7Cb|~|true"
    assert summary_key("n1", "2026-01-01", ("a\nb",)) == "n1|2026-01-01|a%0Ab"
    long_a = summary_key("n1", "2026-01-01", ("x" * 2000 + "a",))
    long_b = summary_key("n1", "2026-01-01", ("x" * 2000 + "b",))
    assert long_a != long_b
    assert len(long_a.encode()) <= MAX_KEY_BYTES and "#" in long_a


def test_every_limit_and_rule_is_in_the_spec() -> None:
    match = re.search(r"^### 10\.1 [^\n]*\n(.*?)(?=^##)", SPEC, re.M | re.S)
    assert match, "docs/protocol.md has no section 10.1"
    text = match.group(1)
    for name in ("MAX_KEY_BYTES", "MAX_CHANGE_BYTES", "MAX_VALUE_DEPTH", "NAME_PATTERN"):
        value = getattr(limits, name)
        assert f"`{name}`" in text and str(value) in text, name
    rules = [r for r in re.findall(r"^    (\w+) {2,}", limits.__doc__ or "", re.M) if r != "rule"]
    assert len(rules) >= 9
    for rule in [*rules, "field_type"]:
        assert f"`{rule}`" in text, rule
