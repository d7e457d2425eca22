"""Validation at the edge: with `agent.collections_file`, records are checked against the
collection's types and rules before they are stored, through the local API and the CLI alike."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from agent import fieldgen
from agent.capture.api import create_app
from agent.capture.errorqueue import entry_for
from agent.capture.validate import EdgeValidator
from agent.cli import main
from agent.config import load_agent_config
from agent.store import AgentStore, Write
from protocol.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BASE = "/v1/collections/beneficiaries"


def agent_config(tmp_path: Path, extra: str = "") -> Path:
    for name in ("collections.example.toml", "admin_codes.example.csv"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\ndata_dir = "{tmp_path / "data"}"\ncollections_file = "collections.example.toml"\n'
        '[collections.beneficiaries]\nkey = "beneficiary_id"\n'
        '[collections.distributions]\nkey = "distribution_id"\n' + extra
    )
    return path


def shaped(record: dict[str, Any]) -> dict[str, Any]:
    """A beneficiary as the agent stores it: the example's transform adds a display name."""
    return record | {"display_name": f"{record['given_name']} {record['family_name']}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    config = load_agent_config(agent_config(tmp_path))
    store = await AgentStore.open(tmp_path / "agent.db", "nvalid")
    validator = EdgeValidator.for_agent(config, store.clock.physical)
    assert validator is not None
    async with TestClient(TestServer(create_app(store, config, validator))) as c:
        yield c
    await store.close()


def good(n: int = 0) -> dict[str, Any]:
    return next(iter(fieldgen.beneficiaries(1, seed=11, start=n)))


async def test_generated_records_pass_and_are_stored(client: TestClient[Any, Any]) -> None:
    body = "\n".join(json.dumps(r) for r in fieldgen.beneficiaries(50, seed=11))
    answer = await client.post(f"{BASE}/bulk", data=body)
    assert answer.status == 200, await answer.text()
    assert (await answer.json())["changed"] == 50


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"household_size": 9}, "household_size", "household_size_matches_members"),
        ({"birth_date": "2099-01-01"}, "birth_date", "birth_date_not_in_future"),
        ({"admin3": "XX99-99-999"}, "admin3", "admin3_known"),
        ({"sex": "robot"}, "sex", "enum"),
        ({"household_size": "four"}, "household_size", "type"),
    ],
)
async def test_a_record_breaking_a_rule_goes_to_the_error_queue_naming_key_field_and_rule(
    client: TestClient[Any, Any], change: dict[str, Any], field: str, rule: str
) -> None:
    records = [good(0), good(1) | change, good(2)]
    body = "\n".join(json.dumps(r) for r in records)
    answer = await client.post(f"{BASE}/bulk", data=body)
    assert answer.status == 200
    result = await answer.json()
    assert (result["accepted"], result["queued_errors"]) == (2, 1)
    assert any(
        e["line"] == 2
        and e["key"] == records[1]["beneficiary_id"]
        and e["field"].startswith(field)
        and e["rule"] == rule
        for e in result["errors"]
    ), result["errors"]
    # The good records are stored; the refused one is kept in the queue, not dropped.
    assert (await client.get(f"{BASE}/records/{records[0]['beneficiary_id']}")).status == 200
    assert (await client.get(f"{BASE}/records/{records[1]['beneficiary_id']}")).status == 404
    (entry,) = (await (await client.get("/v1/errors")).json())["errors"]
    assert entry["key"] == records[1]["beneficiary_id"] and entry["payload"] == records[1]
    assert entry["errors"][0]["stage"] in ("schema", "rules")


async def test_the_same_refused_record_sent_twice_is_queued_once(
    client: TestClient[Any, Any],
) -> None:
    body = json.dumps(good(6) | {"sex": "robot"})
    for _ in range(2):
        assert (await client.post(f"{BASE}/bulk", data=body)).status == 200
    assert len((await (await client.get("/v1/errors")).json())["errors"]) == 1


async def test_fix_and_resubmit_through_the_api_stores_the_record(
    client: TestClient[Any, Any],
) -> None:
    record = good(7)
    await client.post(f"{BASE}/bulk", data=json.dumps(record | {"household_size": 12}))
    (entry,) = (await (await client.get("/v1/errors")).json())["errors"]
    refused = await client.post(f"/v1/errors/{entry['id']}/resubmit")
    assert refused.status == 422  # not fixed yet: still refused, still queued
    fixed = await client.put(f"/v1/errors/{entry['id']}", json=record)
    assert (await fixed.json()) == {"ready": True, "errors": []}
    assert (await client.post(f"/v1/errors/{entry['id']}/resubmit")).status == 200
    stored = await client.get(f"{BASE}/records/{record['beneficiary_id']}")
    assert (await stored.json()) == shaped(record)
    assert (await (await client.get("/v1/errors")).json())["errors"] == []
    again = await client.post(f"/v1/errors/{entry['id']}/resubmit")
    assert again.status == 404


async def test_discard_needs_a_reason_and_keeps_the_entry_listed(
    client: TestClient[Any, Any],
) -> None:
    await client.post(f"{BASE}/bulk", data=json.dumps(good(8) | {"sex": "robot"}))
    (entry,) = (await (await client.get("/v1/errors")).json())["errors"]
    assert (await client.post(f"/v1/errors/{entry['id']}/discard", json={})).status == 400
    done = await client.post(f"/v1/errors/{entry['id']}/discard", json={"reason": "duplicate"})
    assert done.status == 200
    (listed,) = (await (await client.get("/v1/errors?status=all")).json())["errors"]
    assert (listed["status"], listed["note"]) == ("discarded", "duplicate")


async def test_put_is_a_whole_record_and_patch_a_partial_update(
    client: TestClient[Any, Any],
) -> None:
    record = good(3)
    key = record["beneficiary_id"]
    partial = {"phone": "+254700000001"}
    refused = await client.put(f"{BASE}/records/{key}", json=partial)
    assert refused.status == 422  # a PUT must be a whole record: required fields are missing
    assert (await client.patch(f"{BASE}/records/{key}", json=partial)).status == 404
    assert (await client.put(f"{BASE}/records/{key}", json=record)).status == 200
    patched = await client.patch(f"{BASE}/records/{key}", json=partial)
    assert patched.status == 200, await patched.text()
    assert (await (await client.get(f"{BASE}/records/{key}")).json())["phone"] == partial["phone"]
    bad = await client.patch(f"{BASE}/records/{key}", json={"phone": "0700"})
    assert bad.status == 422
    assert (await bad.json())["errors"][0]["rule"] == "pattern"


def test_cli_errors_list_show_fix_resubmit(tmp_path: Path) -> None:
    config_path = agent_config(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--config", str(config_path)]).exit_code == 0
    config = load_agent_config(config_path)
    record = good(9)
    wrong = len(record["members"]) + 1

    async def queue_one() -> None:
        store = await AgentStore.open(config.db_path, "nx")
        try:
            validator = EdgeValidator.for_agent(config, store.clock.physical)
            assert validator is not None
            bad = record | {"household_size": wrong + 1}
            errors = validator.check(
                Write("beneficiaries", record["beneficiary_id"], "upsert", bad)
            )
            await store.queue_errors(
                [entry_for(bad, "beneficiaries", "beneficiary_id", 1, "t.ndjson", errors, 1)]
            )
        finally:
            await store.close()

    asyncio.run(queue_one())
    cfg = ["--config", str(config_path)]
    listed = runner.invoke(main, ["errors", "list", *cfg])
    assert (
        "household_size_matches_members" in listed.output
        and record["beneficiary_id"] in listed.output
    )
    entry_id = listed.output.split()[0]
    shown = runner.invoke(main, ["errors", "show", *cfg, entry_id])
    assert "household_size" in shown.output and f'"household_size": {wrong + 1}' in shown.output
    still = runner.invoke(
        main, ["errors", "fix", *cfg, entry_id, "--set", f"household_size={wrong}"]
    )
    assert still.exit_code == 1 and "household_size_matches_members" in still.output
    size = record["household_size"]
    fixed = runner.invoke(
        main, ["errors", "fix", *cfg, entry_id, "--set", f"household_size={size}"]
    )
    assert fixed.exit_code == 0, fixed.output
    stored = runner.invoke(main, ["errors", "resubmit", *cfg, entry_id])
    assert stored.exit_code == 0 and "stored" in stored.output
    got = runner.invoke(main, ["get", *cfg, "beneficiaries", record["beneficiary_id"]])
    assert json.loads(got.output) == shaped(record)
    assert "empty" in runner.invoke(main, ["errors", "list", *cfg]).output


def test_cli_put_refuses_with_the_rule_and_no_traceback(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--config", str(config)]).exit_code == 0
    bad = good(4) | {"household_size": 11}
    result = runner.invoke(main, ["put", "--config", str(config), "beneficiaries", json.dumps(bad)])
    assert result.exit_code == 1
    assert "household_size_matches_members" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    ok = runner.invoke(main, ["put", "--config", str(config), "beneficiaries", json.dumps(good(5))])
    assert ok.exit_code == 0, ok.stderr


def test_a_collection_missing_from_the_collections_file_is_a_config_error(tmp_path: Path) -> None:
    config = load_agent_config(agent_config(tmp_path, '[collections.visits]\nkey = "visit_id"\n'))
    with pytest.raises(ConfigError, match=r"collections\.visits"):
        EdgeValidator.for_agent(config, lambda: 0)
