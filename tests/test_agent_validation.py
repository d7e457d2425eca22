"""Validation at the edge: with `agent.collections_file`, records are checked against the
collection's types and rules before they are stored, through the local API and the CLI alike."""

from __future__ import annotations

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
from agent.capture.validate import EdgeValidator
from agent.cli import main
from agent.config import load_agent_config
from agent.store import AgentStore
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
async def test_a_record_breaking_a_rule_is_refused_naming_key_field_and_rule(
    client: TestClient[Any, Any], change: dict[str, Any], field: str, rule: str
) -> None:
    records = [good(0), good(1) | change, good(2)]
    body = "\n".join(json.dumps(r) for r in records)
    answer = await client.post(f"{BASE}/bulk", data=body)
    assert answer.status == 422
    errors = (await answer.json())["errors"]
    assert any(
        e["line"] == 2
        and e["key"] == records[1]["beneficiary_id"]
        and e["field"].startswith(field)
        and e["rule"] == rule
        for e in errors
    ), errors
    # All or nothing: the good lines were not stored either.
    assert (await client.get(f"{BASE}/records/{records[0]['beneficiary_id']}")).status == 404


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
