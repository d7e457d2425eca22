"""agent.capture.api: the local HTTP API apps use while offline, against a real aiohttp server.

Writes answer only once stored; reads page by key; every error is a JSON body (rule + message,
and for record errors the line, key, field and rule), never HTML or a traceback; a refused
request stores nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import COLLECTION, KEY_FIELD, beneficiary, make_config, open_store, upsert
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from agent.capture.api import create_app
from agent.store import AgentStore
from protocol.change import Change
from protocol.hlc import pack, system_ms

RECORDS = f"/v1/collections/{COLLECTION}/records"
BULK = f"/v1/collections/{COLLECTION}/bulk"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], AgentStore]]:
    config = make_config(tmp_path)
    async with open_store(config.db_path, "napi") as store:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(store, config)))
        await client.start_server()
        try:
            yield client, store
        finally:
            await client.close()


async def json_of(response: ClientResponse, status: int) -> Any:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    assert "Traceback" not in text
    return json.loads(text)


def ndjson(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in records) + b"\n"


# ---- single records -----------------------------------------------------------------------------


async def test_put_get_and_idempotent_put(api: tuple[TestClient[Any, Any], AgentStore]) -> None:
    client, store = api
    record = beneficiary(1)
    body = {k: v for k, v in record.items() if k != KEY_FIELD}  # the URL names the key
    answer = await json_of(await client.put(f"{RECORDS}/b00001", json=body), 200)
    assert answer == {"key": "b00001", "changed": True, "seq": 1}
    assert await json_of(await client.get(f"{RECORDS}/b00001"), 200) == record
    again = await json_of(await client.put(f"{RECORDS}/b00001", json=record), 200)
    assert again == {"key": "b00001", "changed": False, "seq": None}
    partial = await json_of(await client.put(f"{RECORDS}/b00001", json={"village": "X"}), 200)
    assert partial == {"key": "b00001", "changed": True, "seq": 2}
    assert (await store.get(COLLECTION, "b00001")) == record | {"village": "X"}
    assert (await store.backlog())["changes"] == 2


async def test_post_creates_then_reports_unchanged(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = api
    record = beneficiary(2)
    created = await json_of(await client.post(RECORDS, json=record), 201)
    assert created == {"key": "b00002", "changed": True, "seq": 1}
    same = await json_of(await client.post(RECORDS, json=record), 200)
    assert same["changed"] is False
    numeric = await json_of(await client.post(RECORDS, json={KEY_FIELD: 77, "name": "n"}), 201)
    assert numeric["key"] == "77"
    assert await json_of(await client.get(f"{RECORDS}/77"), 200) == {KEY_FIELD: 77, "name": "n"}
    assert await store.get(COLLECTION, "b00002") == record


async def test_delete_then_get_is_404_json(api: tuple[TestClient[Any, Any], AgentStore]) -> None:
    client, store = api
    await client.post(RECORDS, json=beneficiary(3))
    deleted = await json_of(await client.delete(f"{RECORDS}/b00003"), 200)
    assert deleted == {"key": "b00003", "changed": True, "seq": 2}
    gone = await json_of(await client.get(f"{RECORDS}/b00003"), 404)
    assert gone["error"] == "not_found" and "b00003" in gone["message"]
    again = await json_of(await client.delete(f"{RECORDS}/b00003"), 404)
    assert "does not exist" in again["message"]
    assert (await store.backlog())["changes"] == 2
    # _op: delete through PUT works the same way.
    await client.post(RECORDS, json=beneficiary(4))
    put_delete = await client.put(f"{RECORDS}/b00004", json={"_op": "delete"})
    assert (await json_of(put_delete, 200))["changed"] is True
    assert await store.get(COLLECTION, "b00004") is None


async def test_unknown_collection_is_404_listing_the_known_ones(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = api
    for method, path in [
        ("GET", "/v1/collections/patients/records/x"),
        ("GET", "/v1/collections/patients/records"),
        ("PUT", "/v1/collections/patients/records/x"),
        ("POST", "/v1/collections/patients/bulk"),
    ]:
        response = await client.request(method, path, data=b'{"id": "x"}')
        answer = await json_of(response, 404)
        assert answer["error"] == "not_found"
        assert "'patients'" in answer["message"]
        assert "beneficiaries, distributions" in answer["message"]
    assert (await store.backlog())["changes"] == 0


# ---- refusals -----------------------------------------------------------------------------------

REFUSED: list[tuple[str, str, bytes, str, dict[str, Any]]] = [
    # (method, path, body, rule, expected error fields)
    ("PUT", f"{RECORDS}/b1", b'{"name": ', "json", {}),
    ("PUT", f"{RECORDS}/b1", b"\xff\xfe", "json", {}),
    ("POST", RECORDS, b"", "json", {}),
    ("PUT", f"{RECORDS}/b1", b'{"beneficiary_id": "b2"}', "key_matches", {"field": KEY_FIELD}),
    ("POST", RECORDS, b'{"name": "keyless"}', "key_required", {"field": KEY_FIELD}),
    ("POST", RECORDS, b'{"beneficiary_id": "b1", "x y": 1}', "field_name", {"key": "b1"}),
    ("POST", RECORDS, b'{"beneficiary_id": "b1", "v": NaN}', "json", {}),
    ("POST", RECORDS, b'{"beneficiary_id": "b1", "v": 123456789012345678901}', "json", {}),
    ("POST", RECORDS, b"[1, 2]", "record_is_object", {}),
    (
        "POST",
        BULK,
        b'{"beneficiary_id": "b1"}\n{"beneficiary_id": "b2", "bad-name": 1}\n',
        "field_name",
        {"line": 2, "key": "b2", "field": "bad-name"},
    ),
    ("POST", BULK, b'{"beneficiary_id": "b1"}\n\n{oops\n', "json", {"line": 3}),
]


@pytest.mark.parametrize(("method", "path", "body", "rule", "where"), REFUSED)
async def test_a_refused_write_stores_nothing(
    api: tuple[TestClient[Any, Any], AgentStore],
    method: str,
    path: str,
    body: bytes,
    rule: str,
    where: dict[str, Any],
) -> None:
    client, store = api
    response = await client.request(method, path, data=body)
    assert 400 <= response.status < 600
    assert "Traceback" not in await response.text()
    assert await store.list_records(COLLECTION) == []
    assert (await store.backlog())["changes"] == 0


@pytest.mark.parametrize(("method", "path", "body", "rule", "where"), REFUSED)
async def test_a_refused_write_is_a_422_naming_line_key_field_and_rule(
    api: tuple[TestClient[Any, Any], AgentStore],
    method: str,
    path: str,
    body: bytes,
    rule: str,
    where: dict[str, Any],
) -> None:
    client, _ = api
    answer = await json_of(await client.request(method, path, data=body), 422)
    assert answer["error"] == rule
    assert answer["message"]
    (error,) = answer["errors"]
    assert error["rule"] == rule
    assert {k: error.get(k) for k in where} == where
    assert f"[{rule}]" in error["text"]


async def test_bulk_counts_accepted_changed_and_unchanged(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = api
    records = [beneficiary(i) for i in range(10)]
    await client.post(BULK, data=ndjson(records[:3]))
    records[1] = records[1] | {"village": "Moved"}
    answer = await json_of(await client.post(BULK, data=ndjson(records)), 200)
    assert answer == {
        "accepted": 10,
        "changed": 8,
        "unchanged": 2,
        "first_seq": 4,
        "last_seq": 11,
        "queued_errors": 0,
        "errors": [],
    }
    assert await store.count(COLLECTION) == 10
    nothing = await json_of(await client.post(BULK, data=b"\n\n"), 200)
    assert nothing == {
        "accepted": 0,
        "changed": 0,
        "unchanged": 0,
        "first_seq": None,
        "last_seq": None,
        "queued_errors": 0,
        "errors": [],
    }
    deletes = ndjson([{KEY_FIELD: "b00000", "_op": "delete"}, {KEY_FIELD: "zz", "_op": "delete"}])
    answer = await json_of(await client.post(BULK, data=deletes), 200)
    assert (answer["changed"], answer["unchanged"]) == (1, 1)
    assert await store.count(COLLECTION) == 9


# ---- listing ------------------------------------------------------------------------------------


async def test_list_filters_and_pages_with_next_after(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, _ = api
    records = [beneficiary(i) for i in range(30)]
    await client.post(BULK, data=ndjson(records))

    answer = await json_of(
        await client.get(RECORDS, params={"village": "Village 1", "household_size": "5"}), 200
    )
    expected = [r for r in records if r["village"] == "Village 1" and r["household_size"] == 5]
    assert expected and answer == {"records": expected, "next_after": None}

    seen: list[dict[str, Any]] = []
    params: dict[str, str] = {"limit": "7"}
    pages = 0
    while True:
        page = await json_of(await client.get(RECORDS, params=params), 200)
        seen += page["records"]
        pages += 1
        if page["next_after"] is None:
            break
        assert len(page["records"]) == 7
        params["after"] = page["next_after"]
    assert seen == records and pages == 5


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("limit=0", "between 1 and 1000"),
        ("limit=1001", "between 1 and 1000"),
        ("limit=ten", "integer"),
        ("bad-name=1", "not a valid field name"),
    ],
)
async def test_bad_list_queries_are_400_json(
    api: tuple[TestClient[Any, Any], AgentStore], query: str, needle: str
) -> None:
    client, _ = api
    answer = await json_of(await client.get(f"{RECORDS}?{query}"), 400)
    assert answer["error"] == "bad_request" and needle in answer["message"]


async def test_status_reports_backlog_and_sync_state(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, _ = api
    await client.post(BULK, data=ndjson([beneficiary(i) for i in range(4)]))
    status = await json_of(await client.get("/v1/status"), 200)
    assert status["node_id"] == "napi"
    assert status["backlog_changes"] == 4 and status["backlog_bytes"] > 0
    assert status["sealed_batches_waiting"] == 0 and status["sealed_bytes_waiting"] == 0
    assert status["acked_batches"] == 0 and status["acked_changes"] == 0
    assert status["last_contact"] is None and status["last_error"] is None
    assert status["hq_clock_offset_ms"] == 0 and status["feed_cursor"] == 0
    assert {"bytes_sent", "last_error_at"} <= set(status)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/v1/nothing", 404),
        ("PATCH", f"{RECORDS}/b1", 422),  # no body: refused before anything else
        ("DELETE", RECORDS, 405),
        ("GET", BULK, 405),
    ],
)
async def test_routing_errors_are_json_too(
    api: tuple[TestClient[Any, Any], AgentStore], method: str, path: str, status: int
) -> None:
    client, _ = api
    answer = await json_of(await client.request(method, path), status)
    assert answer["error"] and answer["message"]


async def test_paging_covers_records_merged_from_the_feed(
    api: tuple[TestClient[Any, Any], AgentStore],
) -> None:
    client, store = api
    await store.write([upsert(beneficiary(i)) for i in (0, 2)])
    partial = Change(
        COLLECTION, "b00001", "upsert", {"name": "from HQ"}, pack(system_ms()), 0, "nhq", 1
    )
    await store.apply_feed([partial], cursor=1)

    keys: list[str] = []
    params = {"limit": "1"}
    for _ in range(10):
        page = await json_of(await client.get(RECORDS, params=params), 200)
        keys += [r.get(KEY_FIELD, "?") for r in page["records"]]
        if page["next_after"] is None:
            break
        params["after"] = page["next_after"]
    assert len(keys) == 3 and page["next_after"] is None, keys


@pytest.mark.parametrize(
    "body",
    [
        b'{"beneficiary_id": "d", "v": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}",
        b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000,
    ],
    ids=["orjson-path", "exact-path"],
)
async def test_unstorable_nesting_is_a_422(
    api: tuple[TestClient[Any, Any], AgentStore], body: bytes
) -> None:
    client, store = api
    response = await client.post(RECORDS, data=body)
    assert (await store.backlog())["changes"] == 0
    await json_of(response, 422)
