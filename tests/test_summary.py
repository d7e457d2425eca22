"""Summary forwarding, the pure part: what records add to summary records, exactly, per group and
window; checked against totals computed here independently of protocol.summary."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fieldgen import distributions
from protocol.collections import Summary, collections_from_dict, load_collections
from protocol.summary import add, contributions, summary_key, window

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = load_collections(ROOT / "config" / "collections.example.toml")
_EXAMPLE_SUMMARY = EXAMPLE["distributions"].summary
assert _EXAMPLE_SUMMARY is not None
SUMMARY: Summary = _EXAMPLE_SUMMARY


def fold(summary: Summary, records: list[dict[str, Any]], node: str) -> dict[str, dict[str, Any]]:
    """Summary records after every record was added, one at a time (as the agent does)."""
    held: dict[str, dict[str, Any]] = {}
    for record in records:
        for delta in contributions(summary, record, node):
            held[delta.key] = add(summary, held.get(delta.key), delta)
    return held


def independent_totals(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    """(site, day, unit) -> [lines, exact quantity, largest], without protocol.summary."""
    out: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0), Decimal("-1")])
    for r in records:
        for line in r["items"]:
            entry = out[(r["site"], r["distribution_date"], line["unit"])]
            quantity = Decimal(str(line["quantity"]))
            entry[0] += 1
            entry[1] += quantity
            entry[2] = max(entry[2], quantity)
    return {k: tuple(v) for k, v in out.items()}


def test_example_summary_matches_independent_totals() -> None:
    records = list(distributions(3000, seed=5))
    held = fold(SUMMARY, records, "node-a")
    got = {
        (v["site"], v["window_start"], v["unit"]): (
            v["lines"],
            Decimal(v["quantity"]),
            Decimal(v["largest"]),
        )
        for v in held.values()
    }
    assert got == independent_totals(records)
    some = next(iter(held.values()))
    assert some["node"] == "node-a" and isinstance(some["quantity"], str)
    day = some["window_start"]
    assert some["window_end"] > day and len(day) == 10


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 200))
def test_order_and_nodes_do_not_change_the_totals(seed: int, count: int) -> None:
    """Any order, any split over nodes: summed per group, the nodes' records give the same totals
    (what HQ computes)."""
    records = list(distributions(count, seed=seed % 1000 + 1))
    whole = fold(SUMMARY, records, "n")
    rng = random.Random(seed)
    rng.shuffle(records)
    parts = [fold(SUMMARY, records[i::3], f"node{i}") for i in range(3)]
    merged: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for part in parts:
        for v in part.values():
            key = (v["site"], v["window_start"], v["unit"])
            merged[key][0] += v["lines"]
            merged[key][1] += Decimal(v["quantity"])
    expected = {
        (v["site"], v["window_start"], v["unit"]): [v["lines"], Decimal(v["quantity"])]
        for v in whole.values()
    }
    assert dict(merged) == expected


def _summary(window_kind: str, time_type: str = "date") -> Summary:
    config = collections_from_dict(
        {
            "collections": {
                "e": {
                    "key": "id",
                    "mode": "append_only",
                    "forward": "summary",
                    "fields": {
                        "id": {"type": "string"},
                        "t": {"type": time_type, "required": True},
                        "n": {"type": "integer"},
                        "flag": {"type": "boolean"},
                    },
                    "summary": {
                        "collection": "e_totals",
                        "time_field": "t",
                        "window": window_kind,
                        "group_by": ["flag"],
                        "aggregates": {
                            "rows": {"op": "count"},
                            "total": {"op": "sum", "field": "n"},
                            "low": {"op": "min", "field": "n"},
                            "first": {"op": "min", "field": "t"},
                        },
                    },
                }
            }
        }
    )
    summary = config["e"].summary
    assert summary is not None
    return summary


def test_windows_in_utc() -> None:
    assert window(_summary("day"), "2026-03-04") == ("2026-03-04", "2026-03-05")
    assert window(_summary("week"), "2026-03-04") == ("2026-03-02", "2026-03-09")  # Monday
    assert window(_summary("month"), "2026-12-31") == ("2026-12-01", "2027-01-01")
    hour = _summary("hour", "datetime")
    assert window(hour, "2026-03-04T23:30:00-02:00") == (
        "2026-03-05T01:00:00Z",
        "2026-03-05T02:00:00Z",
    )
    assert window(_summary("day", "datetime"), "2026-03-04T23:30:00-02:00") == (
        "2026-03-05T00:00:00Z",
        "2026-03-06T00:00:00Z",
    )


def test_integers_missing_values_and_keys() -> None:
    summary = _summary("month")
    records = [
        {"id": "1", "t": "2026-01-05", "n": 4, "flag": True},
        {"id": "2", "t": "2026-01-09", "flag": True},  # no n: counted, not summed
        {"id": "3", "t": "2026-01-02", "n": -2, "flag": True},
        {"id": "4", "t": "2026-01-02", "n": 7},  # no flag: its own group
    ]
    held = fold(summary, records, "a|b")
    key = summary_key("a|b", "2026-01-01", (True,))
    assert key == "a%7Cb|2026-01-01|true"
    assert held[key] == {
        "flag": True,
        "node": "a|b",
        "window_start": "2026-01-01",
        "window_end": "2026-02-01",
        "rows": 3,
        "total": 2,
        "low": -2,
        "first": "2026-01-02",
    }
    assert held[summary_key("a|b", "2026-01-01", (None,))]["total"] == 7
    assert summary_key("a|b", "2026-01-01", (None,)).endswith("|~")


def test_decimal_sums_are_exact() -> None:
    records = [
        {
            "site": "S",
            "distribution_date": "2026-01-01",
            "items": [{"item": "oil", "quantity": 0.1, "unit": "l"}],
        }
        for _ in range(1000)
    ]
    (held,) = fold(SUMMARY, records, "n").values()
    assert held["quantity"] == "100" and held["lines"] == 1000 and held["largest"] == "0.1"
