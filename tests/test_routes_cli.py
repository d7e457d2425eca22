"""`fieldsync-hq routes`, `route test` and `dlq`: the operator's view of routing."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_route_mapping import GRANT  # the golden source record, stated once

from hq_server.cli import main
from hq_server.routing.state import NewDeadLetter, RouterStore, RouteState, SourceChange
from hq_server.store import SQLiteHQStore

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_2024 = {
    "cost_centre": "CC-GRT-2024-001",
    "fiscal_year": "2024",
    "total_budget": 190000,
    "line_items": [
        {"category": "10-PERS", "amount": 150000},
        {"category": "20-TRVL", "amount": 25000},
        {"category": "30-SUPP", "amount": 15000},
    ],
}


@pytest.fixture
def hq_config(tmp_path: Path) -> Path:
    for name in ("routes.example.toml", "mappings.example.toml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    config = tmp_path / "hq.toml"
    config.write_text(
        f'[hq]\ndata_dir = "{tmp_path / "hq"}"\nroutes_file = "routes.example.toml"\n'
    )

    async def create() -> None:
        async with SQLiteHQStore(tmp_path / "hq" / "hq.db"):
            pass

    asyncio.run(create())
    return config


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_route_test_prints_the_golden_grants_to_finance_records(
    hq_config: Path, tmp_path: Path
) -> None:
    sample = tmp_path / "grant.json"
    sample.write_text(json.dumps(GRANT | {"status": "approved"}))
    code, out, err = run(
        "route", "test", "--config", str(hq_config), "grants-to-finance", "--input", str(sample)
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["target_key"] for line in lines] == [
        "CC-GRT-2024-001-2024",
        "CC-GRT-2024-001-2025",
    ]
    assert lines[0]["record"] == GOLDEN_2024
    assert lines[1]["record"]["total_budget"] == 223000


def test_route_test_shows_filtered_and_unmappable_samples(hq_config: Path, tmp_path: Path) -> None:
    sample = tmp_path / "grants.ndjson"
    sample.write_text(
        json.dumps(GRANT | {"status": "draft"})
        + "\n"
        + json.dumps({"status": "approved", "fy2024_travel": 1})
        + "\n"
    )
    code, out, _ = run(
        "route", "test", "--config", str(hq_config), "grants-to-finance", "--input", str(sample)
    )
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {"sample": 1, "filtered_out": True}
    assert "grant_id" in second["mapping_error"]


def test_route_test_unknown_route(hq_config: Path, tmp_path: Path) -> None:
    sample = tmp_path / "x.json"
    sample.write_text("{}")
    code, _, err = run("route", "test", "--config", str(hq_config), "nope", "--input", str(sample))
    assert code == 1
    assert "no route 'nope'" in err and "grants-to-finance" in err


@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_routes_inventory_lists_every_route_with_its_facts(hq_config: Path, fmt: str) -> None:
    code, out, err = run("routes", "--config", str(hq_config), "--format", fmt)
    assert code == 0, err
    for name in ("grants-to-finance", "beneficiaries-to-crm", "archive", "grants-to-old-erp"):
        assert name in out
    for fact in ("postgres", "finance-systems@example.org", "daily after 02:00", "retired"):
        assert fact in out
    if fmt == "json":
        entries = {e["name"]: e for e in json.loads(out)}
        assert entries["grants-to-old-erp"]["retired"].startswith("2026-06-30")
        assert entries["grants-to-finance"]["error_handling"].startswith("retry 8x")


def test_a_bad_routes_file_names_file_key_and_reason(hq_config: Path, tmp_path: Path) -> None:
    routes = tmp_path / "routes.example.toml"
    routes.write_text(routes.read_text().replace('type = "postgres"', 'type = "carrier-pigeon"'))
    code, _, err = run("routes", "--config", str(hq_config))
    assert code == 2
    assert "routes.example.toml" in err and "routes.grants-to-finance.sink.type" in err


def test_dlq_list_show_resubmit_discard_are_audited(hq_config: Path, tmp_path: Path) -> None:
    async def seed() -> None:
        async with SQLiteHQStore(tmp_path / "hq" / "hq.db") as store:
            rs = RouterStore(store)
            await rs.open()
            change = SourceChange(7, "nabc", 3, "grants", "g1", "upsert", {"grant_id": "g1"})
            dead = [
                NewDeadLetter(change, i, {"x": i}, f"k{i}", "rejected", f"400 bad {i}", 1, 1000)
                for i in range(3)
            ]
            await rs.save(RouteState("archive"), dead, 2000)

    asyncio.run(seed())
    code, out, _ = run("dlq", "list", "--config", str(hq_config))
    assert code == 0
    assert out.count("grants/g1") == 3 and "400 bad 1" in out
    code, out, _ = run("dlq", "show", "--config", str(hq_config), "2")
    shown = json.loads(out)
    assert shown["mapped"] == {"x": 1} and shown["record"] == {"grant_id": "g1"}
    assert shown["error"] == "400 bad 1" and shown["first_failed_at"].endswith("Z")
    code, out, _ = run("dlq", "resubmit", "--config", str(hq_config), "1")
    assert code == 0 and "resubmitted 1" in out
    code, out, err = run(
        "dlq",
        "discard",
        "--config",
        str(hq_config),
        "--route",
        "archive",
        "--all",
        "--reason",
        "test data",
    )
    assert code == 0 and "discarded 2" in out
    code, _, err = run("dlq", "discard", "--config", str(hq_config), "1", "--reason", "again")
    assert code == 1 and "not open" in err
    code, out, _ = run("audit", "--config", str(hq_config))
    actions = [json.loads(line)["action"] for line in out.splitlines()]
    # one entry per action that changed something; the refused second discard changed nothing
    assert actions.count("dlq.resubmit") == 1 and actions.count("dlq.discard") == 1
