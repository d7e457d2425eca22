"""The admin API (/v1/admin/conflicts...) on a real HQ server on 127.0.0.1 with a real SQLite
store: bearer tokens from `fieldsync-hq api-token`, listing, showing and resolving a real review
conflict, and every refusal (401/400/404/409) leaving the store as it was."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from click.testing import CliRunner
from hq_fixtures import Harness, running_hq
from test_hq_conflicts import EXAMPLE, Node, base_record

from hq_server.admin_api import CONFLICTS_PATH
from hq_server.cli import main
from hq_server.store import ApiTokenNotFound, SQLiteHQStore, StoreError
from protocol.hlc import pack, system_ms

NOTE = "called the household"


@dataclass
class Review:
    """A running HQ with two open review conflicts (B1, B2) and an admin-API token."""

    hq: Harness
    store: SQLiteHQStore
    token: str
    a: str  # node "kakuma-1": side 2 of each conflict
    b: str  # node "kakuma-2": side 1 (the higher stamp)
    v: int
    ids: list[int]

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def get(self, path: str, token: str | None = None) -> ClientResponse:
        return await self.hq.client.get(path, headers=self.headers(token))

    async def resolve(
        self, conflict_id: int, body: Any, *, raw: bytes | None = None, token: str | None = None
    ) -> ClientResponse:
        data = raw if raw is not None else json.dumps(body).encode()
        return await self.hq.client.post(
            f"{CONFLICTS_PATH}/{conflict_id}/resolve",
            data=data,
            headers={**self.headers(token), "Content-Type": "application/json"},
        )

    def state(self) -> tuple[list[tuple[Any, ...]], ...]:
        """Everything a refused request must leave as it was."""
        with sqlite3.connect(self.hq.config.hq.db_path) as conn:
            return tuple(
                conn.execute(sql).fetchall()
                for sql in (
                    "SELECT * FROM conflicts ORDER BY id",
                    "SELECT * FROM changelog ORDER BY seq",
                    "SELECT * FROM records ORDER BY collection, key",
                    "SELECT id FROM audit ORDER BY id",
                )
            )


@asynccontextmanager
async def review(tmp_path: Path) -> AsyncIterator[Review]:
    async with running_hq(tmp_path, collections_file=str(EXAMPLE)) as hq:
        store = hq.store
        assert isinstance(store, SQLiteHQStore)
        a = await Node.enrol(store, "kakuma-1")
        b = await Node.enrol(store, "kakuma-2")
        v = await base_record(store, a, pack(system_ms()))
        await a.send(
            a.change("B2", {"given_name": "Halima", "household_size": 2}, v + 1, 0),
            a.change("B1", {"household_size": 5}, v + 10, v),
            a.change("B2", {"household_size": 3}, v + 11, v + 1),
        )
        await b.send(
            b.change("B1", {"household_size": 6}, v + 20, v),
            b.change("B2", {"household_size": 4}, v + 21, v + 1),
        )
        ids = [e.id for e in await store.list_conflicts()]
        assert len(ids) == 2
        issued = await store.create_api_token("reviewer", actor="cli:ops")
        yield Review(hq, store, issued.token, a.id, b.id, v, ids)


async def test_list_show_and_resolve(tmp_path: Path) -> None:
    async with review(tmp_path) as r:
        response = await r.get(CONFLICTS_PATH)
        assert response.status == 200, await response.text()
        page = await response.json()
        assert [c["key"] for c in page["conflicts"]] == ["B1", "B2"]
        assert (page["more"], page["next_after"]) == (False, r.ids[1])
        first = page["conflicts"][0]
        assert [(s["side"], s["value"], s["node"]) for s in first["sides"]] == [
            (1, 6, "kakuma-2"),
            (2, 5, "kakuma-1"),
        ]
        assert first["ancestor"]["value"] == 4
        assert first["reviewer"] == "group:field-registration"

        shown = await r.get(f"{CONFLICTS_PATH}/{r.ids[0]}")
        assert shown.status == 200
        assert await shown.json() == first

        done = await r.resolve(r.ids[0], {"value": 5, "note": NOTE})
        assert done.status == 200, await done.text()
        doc = await done.json()
        assert doc["status"] == "resolved"
        resolution = doc["resolution"]
        assert (resolution["value"], resolution["node"], resolution["by"]) == (
            5,
            "HQ",
            "api:reviewer",
        )
        assert resolution["origin"] == r.hq.state.identity.node_id
        assert resolution["note"] == NOTE
        record = await r.store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["household_size"] == 5
        for node in (r.a, r.b):  # HQ's resolution flows to every node
            feed = await r.store.feed(node, 0, 100, max_bytes=1 << 20)
            hq_changes = [c for c in feed.changes if c.origin == resolution["origin"]]
            assert [c.fields for c in hq_changes] == [{"household_size": 5}]
            assert hq_changes[0].parent >= r.v + 20

        still_open = await (await r.get(CONFLICTS_PATH)).json()
        assert [c["id"] for c in still_open["conflicts"]] == [r.ids[1]]
        resolved = await (await r.get(f"{CONFLICTS_PATH}?status=resolved")).json()
        assert [c["id"] for c in resolved["conflicts"]] == [r.ids[0]]
        everything = await r.get(f"{CONFLICTS_PATH}?status=all&collection=beneficiaries")
        assert len((await everything.json())["conflicts"]) == 2
        other = await (await r.get(f"{CONFLICTS_PATH}?collection=distributions")).json()
        assert other["conflicts"] == []

        (entry,) = [e for e in await r.store.audit_log() if e.action == "conflict.resolve"]
        assert entry.actor == "api:reviewer"
        assert entry.detail["conflict"] == r.ids[0] and entry.detail["note"] == NOTE
        assert await r.store.verify_audit() is None


async def test_resolve_by_taking_a_side_and_twice_is_409(tmp_path: Path) -> None:
    async with review(tmp_path) as r:
        done = await r.resolve(r.ids[1], {"take": 2})
        assert done.status == 200, await done.text()
        assert (await done.json())["resolution"]["value"] == 3
        record = await r.store.get_record("beneficiaries", "B2")
        assert record is not None and record.data["household_size"] == 3
        before = r.state()
        for body in ({"take": 1}, {"value": 4}):
            again = await r.resolve(r.ids[1], body)
            assert again.status == 409
            error = await again.json()
            assert error["error"] == "not_open"
            assert f"conflict {r.ids[1]} is resolved, not open" in error["message"]
        assert r.state() == before


async def test_paging(tmp_path: Path) -> None:
    async with review(tmp_path) as r:
        first = await (await r.get(f"{CONFLICTS_PATH}?limit=1")).json()
        assert [c["id"] for c in first["conflicts"]] == [r.ids[0]]
        assert (first["more"], first["next_after"]) == (True, r.ids[0])
        url = f"{CONFLICTS_PATH}?limit=1&after={first['next_after']}"
        second = await (await r.get(url)).json()
        assert [c["id"] for c in second["conflicts"]] == [r.ids[1]]
        assert second["more"] is False


@pytest.mark.parametrize(
    ("body", "raw", "message"),
    [
        (None, b"{not json", "the body must be a JSON object"),
        (None, b"\xff\xfe", "the body must be a JSON object"),
        (None, b'{"value": NaN}', "NaN is not a JSON value"),
        (None, b'{"value": [1e999]}', "out of range"),
        ([5], None, "the body must be a JSON object"),
        ({}, None, "give exactly one of 'value'"),
        ({"value": 5, "take": 1}, None, "give exactly one of 'value'"),
        ({"value": 5, "by": "me"}, None, "unknown field(s) 'by'"),
        ({"value": 5, "note": 7}, None, "'note' must be a string"),
        ({"take": "1"}, None, "'take' must be a side number"),
        ({"take": True}, None, "'take' must be a side number"),
        ({"take": 0}, None, "'take' must be a side number"),
        ({"take": 3}, None, "has 2 side(s): take a number from 1 to 2"),
        ({"value": "five"}, None, "not a valid beneficiaries.household_size: household_size"),
        ({"value": 0}, None, "household_size must be at least 1"),
        ({"value": 1 << 70}, None, "household_size must be at most 30"),
    ],
)
async def test_bad_body_is_400_and_changes_nothing(
    tmp_path: Path, body: Any, raw: bytes | None, message: str
) -> None:
    async with review(tmp_path) as r:
        before = r.state()
        response = await r.resolve(r.ids[0], body, raw=raw)
        assert response.status == 400, await response.text()
        error = await response.json()
        assert error["error"] == "bad_request"
        assert message in error["message"]
        assert r.state() == before


async def test_unknown_conflict_is_404(tmp_path: Path) -> None:
    async with review(tmp_path) as r:
        before = r.state()
        for response in (
            await r.get(f"{CONFLICTS_PATH}/999"),
            await r.resolve(999, {"value": 1}),
            await r.resolve(999, {"take": 1}),
        ):
            assert response.status == 404
            assert await response.json() == {"error": "not_found", "message": "no conflict 999"}
        assert r.state() == before


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=closed", "'status' must be one of open, resolved, auto, all"),
        ("limit=0", "'limit' must be an integer from 1 to 1000"),
        ("limit=1001", "'limit' must be an integer from 1 to 1000"),
        ("after=-1", "'after' must be an integer"),
        ("after=²", "'after' must be an integer"),
    ],
)
async def test_bad_query_is_400(tmp_path: Path, query: str, message: str) -> None:
    async with review(tmp_path) as r:
        response = await r.get(f"{CONFLICTS_PATH}?{query}")
        assert response.status == 400
        assert message in (await response.json())["message"]


async def test_requests_without_a_valid_token_are_401_and_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with review(tmp_path) as r:
        revoked = await r.store.create_api_token("old", actor="cli:ops")
        assert await r.store.revoke_api_token("old", actor="cli:ops") is True
        bad_headers: list[dict[str, str]] = [
            {},
            {"Authorization": f"Basic {r.token}"},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + r.token[:-1]},
            {"Authorization": f"Bearer {revoked.token}"},
            {"Authorization": "Bearer " + "x" * 5000},
        ]
        before = r.state()
        for headers in bad_headers:
            calls = [
                r.hq.client.get(CONFLICTS_PATH, headers=headers),
                r.hq.client.get(f"{CONFLICTS_PATH}/{r.ids[0]}", headers=headers),
                r.hq.client.get(f"{CONFLICTS_PATH}/999", headers=headers),
                r.hq.client.post(
                    f"{CONFLICTS_PATH}/{r.ids[0]}/resolve", json={"take": 1}, headers=headers
                ),
            ]
            for call in calls:
                response = await call
                assert response.status == 401, (headers, await response.text())
                assert (await response.json())["error"] == "unauthorized"
                assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        assert r.state() == before
        # The good token works; no token, good or bad, ever reaches the log.
        assert (await r.get(CONFLICTS_PATH)).status == 200
        logged = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
        assert "/v1/admin/conflicts" in logged
        for token in (r.token, revoked.token, r.token[:-1]):
            assert token not in logged


async def test_api_tokens_from_the_cli_work_against_the_running_server(tmp_path: Path) -> None:
    async with review(tmp_path) as r:
        config = tmp_path / "cli.toml"
        config.write_text(
            f'[hq]\ndata_dir = "{r.hq.config.hq.data_dir}"\ncollections_file = "{EXAMPLE}"\n',
            encoding="utf-8",
        )

        def cli(*args: str) -> Any:
            return CliRunner().invoke(main, [*args[:2], "--config", str(config), *args[2:]])

        created = await asyncio.to_thread(cli, "api-token", "create", "triage")
        assert created.exit_code == 0, created.stderr
        token = created.stdout.strip()
        assert token.startswith("fsa_") and len(created.stdout.splitlines()) == 1
        assert (await r.get(CONFLICTS_PATH, token)).status == 200
        done = await r.resolve(r.ids[0], {"take": 1}, token=token)
        assert (await done.json())["resolution"]["by"] == "api:triage"

        duplicate = await asyncio.to_thread(cli, "api-token", "create", "triage")
        assert duplicate.exit_code == 1
        assert "already named 'triage'" in duplicate.stderr
        bad_name = await asyncio.to_thread(cli, "api-token", "create", "two words")
        assert bad_name.exit_code == 1 and "API token name 'two words'" in bad_name.stderr

        revoked = await asyncio.to_thread(cli, "api-token", "revoke", "triage")
        assert revoked.stdout == "revoked API token triage\n"
        assert (await r.get(CONFLICTS_PATH, token)).status == 401
        again = await asyncio.to_thread(cli, "api-token", "revoke", "triage")
        assert again.exit_code == 0 and "already revoked" in again.stdout
        unknown = await asyncio.to_thread(cli, "api-token", "revoke", "nobody")
        assert unknown.exit_code == 1
        assert unknown.stderr == "fieldsync-hq: no API token named 'nobody'\n"

        listed = json.loads((await asyncio.to_thread(cli, "api-token", "list", "--json")).stdout)
        assert [(t["name"], t["revoked_at"] is None) for t in listed] == [
            ("reviewer", True),
            ("triage", False),
        ]
        # A revoked name can be given to a new token; the old one stays revoked.
        renewed = await asyncio.to_thread(cli, "api-token", "create", "triage")
        assert renewed.exit_code == 0
        assert (await r.get(CONFLICTS_PATH, renewed.stdout.strip())).status == 200
        assert (await r.get(CONFLICTS_PATH, token)).status == 401

        audit = await r.store.audit_log()
        actions = [(e.actor, e.action, e.detail.get("name")) for e in audit]
        assert ("cli:ops", "api_token.create", "reviewer") in actions
        mine = [a for a in actions if a[2] == "triage"]
        assert [a[1] for a in mine] == ["api_token.create", "api_token.revoke", "api_token.create"]
        assert all(actor.startswith("cli:") for actor, _, _ in mine)
        resolutions = [e for e in audit if e.action == "conflict.resolve"]
        assert [e.actor for e in resolutions] == ["api:triage"]
        # Only hashes are stored: no token in the database or its audit log.
        with sqlite3.connect(r.hq.config.hq.db_path) as conn:
            dump = "\n".join(conn.iterdump())
        for secret in (r.token, token, renewed.stdout.strip()):
            assert secret not in dump


async def test_store_api_token_contract(tmp_path: Path) -> None:
    async with SQLiteHQStore(tmp_path / "hq.db") as store:
        issued = await store.create_api_token("a.b-c_1", actor="cli:ops")
        found = await store.check_api_token(issued.token)
        assert found is not None and (found.name, found.actor) == ("a.b-c_1", "api:a.b-c_1")
        assert await store.check_api_token(issued.token + "x") is None
        with pytest.raises(StoreError, match="already named"):
            await store.create_api_token("a.b-c_1", actor="cli:ops")
        for bad in ("", "-x", "a b", "x" * 65, "api:x"):
            with pytest.raises(StoreError, match="API token name"):
                await store.create_api_token(bad, actor="cli:ops")
        with pytest.raises(ApiTokenNotFound):
            await store.revoke_api_token("nope", actor="cli:ops")
        assert await store.revoke_api_token("a.b-c_1", actor="cli:ops") is True
        assert await store.revoke_api_token("a.b-c_1", actor="cli:ops") is False
        assert await store.check_api_token(issued.token) is None
        assert [e.action for e in await store.audit_log()] == [
            "api_token.create",
            "api_token.revoke",
        ]
