"""Edges of the conflict and reference-table rules found in review: reserved collections,
source_of_truth at the agent's edge, review heads holding lists, groups from enrolment."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hq_fixtures import running_hq, seal_batch
from test_e2e_conflicts import COLLECTIONS, Agent
from test_hq_conflicts import EXAMPLE, Node, base_record

from agent.capture.validate import EdgeValidator
from agent.config import load_agent_config
from agent.demo import LocalDeployment
from agent.store import AgentStore, Write
from hq_server.store import SQLiteHQStore
from protocol.change import Change
from protocol.collections import ReferenceTable, load_collections
from protocol.config import ConfigError
from protocol.hlc import pack, system_ms
from protocol.merge import field_policies
from protocol.references import REFERENCES_COLLECTION, table_record

POLICIES = field_policies(load_collections(EXAMPLE))
ME, OTHER = "nme000000000000000000000000000", "nother0000000000000000000000"


async def test_nodes_cannot_write_hqs_reserved_collections(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        table = table_record(ReferenceTable("admin3", frozenset({"ZZ"})), pushed_by="me")
        forged = Change(
            REFERENCES_COLLECTION, "admin3", "upsert", table, pack(system_ms()), 0, node.node_id, 1
        )
        before = hq.snapshot()
        response = await hq.post(seal_batch(node, 1, [forged]))
        assert response.status == 422 and "reserved" in (await response.json())["message"]
        assert hq.snapshot() == before


def test_an_agent_config_cannot_accept_a_reserved_collection(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[collections._references]\nkey = "name"\n')
    with pytest.raises(ConfigError, match="reserved"):
        load_agent_config(path)


async def test_hq_systems_write_declared_collections_under_stored_names(tmp_path: Path) -> None:
    async with running_hq(tmp_path, collections_file=str(EXAMPLE)) as hq:
        store = hq.store
        assert isinstance(store, SQLiteHQStore)
        node = await Node.enrol(store, "field")
        await base_record(store, node, pack(system_ms()))
        token = (await store.create_api_token("case-management", actor="cli:ops")).token
        auth = {"Authorization": f"Bearer {token}"}
        undeclared = await hq.client.patch(
            f"/v1/admin/records/{REFERENCES_COLLECTION}/admin3", json={"codes": ["X"]}, headers=auth
        )
        assert undeclared.status == 404 and "not declared" in (await undeclared.json())["message"]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


async def test_the_edge_refuses_changing_an_owned_value_but_not_setting_an_empty_one(
    store_path: Path,
) -> None:
    store = await AgentStore.open(store_path, ME, POLICIES)
    try:
        created = {"given_name": "A", "household_size": 1}
        assert (await store.write([Write("beneficiaries", "B1", "upsert", created)]))[0].seq
        # registration_status holds no value yet: its initial value is anyone's to set.
        initial = Write("beneficiaries", "B1", "upsert", {"registration_status": "registered"})
        assert (await store.write([initial]))[0].refused is None
        change = Write("beneficiaries", "B1", "upsert", {"registration_status": "verified"})
        assert (await store.write([change]))[0].refused is not None
        # Deleted, then registered again: the initial value is anyone's again.
        assert (await store.write([Write("beneficiaries", "B1", "delete", {})]))[0].seq
        again = Write(
            "beneficiaries", "B1", "upsert", {**created, "registration_status": "verified"}
        )
        assert (await store.write([again]))[0].refused is None
    finally:
        await store.close()


async def test_review_heads_keep_list_values_as_lists(store_path: Path) -> None:
    policies = {"c": field_policies(load_collections(EXAMPLE))["beneficiaries"]}
    policies["c"] = type(policies["c"])(review=frozenset({"members"}))
    store = await AgentStore.open(store_path, ME, policies)
    try:
        (first,) = await store.write([Write("c", "k", "upsert", {"members": [1]})])
        assert first.hlc is not None
        await store.write([Write("c", "k", "upsert", {"members": [1, 2]})])
        theirs = Change(
            "c", "k", "upsert", {"members": [1, 2]}, first.hlc + 10**9, first.hlc, OTHER, 1
        )
        await store.apply_feed([theirs], 1)
        # Equal lists from both sides: no conflict, and no stale row in the conflicts table.
        assert await store.open_conflicts() == []
    finally:
        await store.close()
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT count(*) FROM conflicts").fetchone() == (0,)


async def test_a_pushed_table_of_the_wrong_kind_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "collections.toml").write_text(
        '[references.units]\nvalues = { kg = "kilogram" }\n'
        '[collections.c]\nkey = "id"\nallow_unknown_fields = true\n'
        '[collections.c.fields]\nid = { type = "string" }\n'
    )
    (tmp_path / "agent.toml").write_text(
        f'[agent]\ndata_dir = "{tmp_path / "d"}"\ncollections_file = "collections.toml"\n'
        '[collections.c]\nkey = "id"\n'
    )
    store = await AgentStore.open(tmp_path / "agent.db", ME)
    try:
        codes_only = table_record(ReferenceTable("units", frozenset({"kg"})), pushed_by="hq")
        pushed = Change(
            REFERENCES_COLLECTION, "units", "upsert", codes_only, pack(system_ms()), 0, "nhq", 1
        )
        await store.apply_feed([pushed], 1)
        validator = EdgeValidator.for_agent(load_agent_config(tmp_path / "agent.toml"), system_ms)
        assert validator is not None
        assert await validator.load_references(store) == []
        assert validator.references["units"].values == {"kg": "kilogram"}
    finally:
        await store.close()


def test_groups_given_at_enrolment_are_known_before_the_first_sync(tmp_path: Path) -> None:
    d = LocalDeployment(tmp_path, hq_settings={"collections_file": str(COLLECTIONS)})
    try:
        d.start_hq()
        agent = Agent(d, "office-g", "field-registration")
        with sqlite3.connect(d.root / "office-g" / "agent.db") as db:
            (groups,) = db.execute("SELECT v FROM meta WHERE k = 'groups'").fetchone()
        assert json.loads(groups) == ["group:field-registration"]
        assert agent.config.exists()
    finally:
        d.shutdown()
