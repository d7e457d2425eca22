"""The edge pipeline in the agent, through the local API with a real store: transforms stored
and forwarded as configured, device-only fields never in the outbox, append_only records never
changed, summary and exceptions modes keeping records local, summary outbox rows coalesced."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.capture.api import create_app
from agent.capture.validate import EdgeValidator
from agent.config import load_agent_config
from agent.store import AgentStore
from protocol.change import Change
from protocol.merge import RecordState, apply_change

COLLECTIONS = """
[references.regions]
values = { R1 = "North", R2 = "South" }

[collections.people]
key = "id"
[collections.people.fields]
id = { type = "string" }
given = { type = "string", required = true }
family = { type = "string", required = true }
region = { type = "string" }
secret = { type = "string" }
[collections.people.transform]
lookup = { region_name = { field = "region", table = "regions" } }
derive = { label = "{given} {family}" }
rename = { family = "surname" }
drop = ["secret"]

[collections.events]
key = "id"
mode = "append_only"
forward = "summary"
[collections.events.fields]
id = { type = "string" }
day = { type = "date", required = true }
site = { type = "string", required = true }
qty = { type = "decimal", required = true }
[collections.events.summary]
collection = "event_totals"
time_field = "day"
group_by = ["site"]
aggregates = { n = { op = "count" }, qty = { op = "sum", field = "qty" } }

[collections.alerts]
key = "id"
mode = "append_only"
forward = "exceptions"
[collections.alerts.fields]
id = { type = "string" }
qty = { type = "integer", required = true }
[collections.alerts.flags]
normal_quantity = { check = "compare", field = "qty", op = "<=", value = 100 }

[collections.cases]
key = "id"
forward = "exceptions"
[collections.cases.fields]
id = { type = "string" }
qty = { type = "integer", required = true }
note = { type = "string" }
[collections.cases.flags]
normal_quantity = { check = "compare", field = "qty", op = "<=", value = 100 }
"""


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], AgentStore]]:
    (tmp_path / "collections.toml").write_text(COLLECTIONS)
    (tmp_path / "agent.toml").write_text(
        f'[agent]\ndata_dir = "{tmp_path / "data"}"\ncollections_file = "collections.toml"\n'
        '[collections.people]\nkey = "id"\n[collections.events]\nkey = "id"\n'
        '[collections.alerts]\nkey = "id"\n[collections.event_totals]\nkey = "key"\n'
        '[collections.cases]\nkey = "id"\n'
    )
    config = load_agent_config(tmp_path / "agent.toml")
    store = await AgentStore.open(tmp_path / "agent.db", "node1")
    validator = EdgeValidator.for_agent(config, store.clock.physical)
    async with TestClient(TestServer(create_app(store, config, validator))) as client:
        yield client, store
    await store.close()


async def outbox(store: AgentStore) -> list[tuple[str, str, dict[str, Any]]]:
    return [(c.collection, c.key, c.fields) for c in await store.unsealed_changes(10_000, 1 << 30)]


async def test_transform_is_stored_and_sent_without_device_only_fields(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = setup
    record = {"id": "p1", "given": "Ana", "family": "Diaz", "region": "R2", "secret": "ID-9"}
    assert (await client.put("/v1/collections/people/records/p1", json=record)).status == 200
    stored = await (await client.get("/v1/collections/people/records/p1")).json()
    assert stored == {
        "id": "p1",
        "given": "Ana",
        "surname": "Diaz",
        "region": "R2",
        "secret": "ID-9",
        "region_name": "South",
        "label": "Ana Diaz",
    }
    ((_, _, sent),) = await outbox(store)
    assert "secret" not in sent and sent["label"] == "Ana Diaz" and sent["surname"] == "Diaz"
    # PATCH names declared fields; derived ones follow from the whole record.
    answer = await client.patch("/v1/collections/people/records/p1", json={"family": "Ruiz"})
    assert answer.status == 200
    patched = await (await client.get("/v1/collections/people/records/p1")).json()
    assert patched["surname"] == "Ruiz" and patched["label"] == "Ana Ruiz"
    sent = (await outbox(store))[-1][2]
    assert sent == {"surname": "Ruiz", "label": "Ana Ruiz"}
    # A change of a device-only field alone is stored and sends nothing.
    secret = await client.patch("/v1/collections/people/records/p1", json={"secret": "ID-10"})
    assert (await secret.json())["seq"] is None and (await secret.json())["changed"]
    assert len(await outbox(store)) == 2


async def test_unknown_lookup_code_goes_to_the_error_queue(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, _ = setup
    bad = {"id": "p2", "given": "B", "family": "C", "region": "R7"}
    answer = await client.post("/v1/collections/people/bulk", data=json.dumps(bad))
    assert (await answer.json())["queued_errors"] == 1
    (entry,) = (await (await client.get("/v1/errors")).json())["errors"]
    (error,) = entry["errors"]
    assert (error["stage"], error["rule"], error["field"]) == ("transform", "region_name", "region")


async def test_append_only_records_are_never_changed_or_deleted(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, _ = setup
    event = {"id": "e1", "day": "2026-01-02", "site": "S1", "qty": "2.5"}
    assert (await client.put("/v1/collections/events/records/e1", json=event)).status == 200
    again = await client.put("/v1/collections/events/records/e1", json=event)
    assert (await again.json())["changed"] is False  # a retry: accepted, changes nothing
    changed = await client.put("/v1/collections/events/records/e1", json=event | {"qty": "3"})
    assert changed.status == 422
    assert "append_only" in (await changed.json())["message"]
    deleted = await client.delete("/v1/collections/events/records/e1")
    assert deleted.status == 422
    written = await client.put("/v1/collections/event_totals/records/x", json={"key": "x"})
    assert written.status == 422  # the summaries are the agent's own


async def test_summary_records_coalesce_until_claimed_and_count_once(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = setup

    async def put(i: int, qty: str) -> None:
        event = {"id": f"e{i}", "day": "2026-01-02", "site": "S1", "qty": qty}
        answer = await client.put(f"/v1/collections/events/records/e{i}", json=event)
        assert (await answer.json())["seq"] is None  # kept on the agent

    await put(1, "1.5")
    await put(2, "2.25")
    await put(2, "2.25")  # the same record again: not counted twice
    ((collection, key, fields),) = await outbox(store)  # claims the row
    assert (collection, key) == ("event_totals", "node1|2026-01-02|S1")
    assert fields["n"] == 2 and fields["qty"] == "3.75" and fields["window_end"] == "2026-01-03"
    await put(3, "1")
    # The claimed row is never updated again: the increment is a new change of what changed.
    rows = await outbox(store)
    assert [r[2] for r in rows[1:]] == [{"n": 3, "qty": "4.75"}]
    await put(4, "1")
    rows = await outbox(store)
    assert [r[2] for r in rows[1:]] == [{"n": 3, "qty": "4.75"}, {"n": 4, "qty": "5.75"}]
    assert await store.count("events") == 4
    listed = await (await client.get("/v1/collections/events/records?site=S1")).json()
    assert len(listed["records"]) == 4
    totals = await (await client.get("/v1/collections/event_totals/records")).json()
    assert totals["records"][0]["n"] == 4 and totals["records"][0]["qty"] == "5.75"
    # Origin sequences stay contiguous.
    seqs = [c.seq for c in await store.unsealed_changes(100, 1 << 30)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_exceptions_forward_only_flagged_records_with_their_flags(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = setup
    normal = await client.put("/v1/collections/alerts/records/a1", json={"id": "a1", "qty": 5})
    assert (await normal.json())["seq"] is None
    flagged = await client.put("/v1/collections/alerts/records/a2", json={"id": "a2", "qty": 500})
    assert (await flagged.json())["seq"] is not None
    ((collection, key, fields),) = await outbox(store)
    assert (collection, key) == ("alerts", "a2")
    assert fields == {"id": "a2", "qty": 500, "flags": ["normal_quantity"]}
    local = await (await client.get("/v1/collections/alerts/records/a1")).json()
    assert local == {"id": "a1", "qty": 5}


async def test_a_record_sent_whole_on_its_first_flag_converges_with_hq(
    setup: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    """Kept locally, then flagged and sent whole: the agent's copy must count every sent field
    as written by that change, as HQ does, or a write stamped in between diverges."""
    client, store = setup
    first = await client.put(
        "/v1/collections/cases/records/c1", json={"id": "c1", "qty": 5, "note": "x"}
    )
    assert (await first.json())["seq"] is None  # kept on the agent
    flagged = await client.patch("/v1/collections/cases/records/c1", json={"qty": 999})
    assert (await flagged.json())["seq"] is not None
    (sent,) = await store.unsealed_changes(10, 1 << 20)
    assert sent.parent == 0 and sent.fields["note"] == "x"
    # Another node's write, stamped between the local write and the flagged one.
    between = Change("cases", "c1", "upsert", {"note": "y"}, sent.hlc - 1, 0, "nother", 1)
    await store.apply_feed([between], 1)
    at_hq = RecordState()
    for change in (sent, between):
        apply_change(at_hq, change)
    assert await store.get("cases", "c1") == at_hq.values
