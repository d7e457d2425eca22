"""HQ systems write through the admin API (PATCH /v1/admin/records/...): the case management
system owns registration_status (hq:case-management in config/collections.example.toml); other
tokens may not change it, bad values are refused, and the write reaches every node's feed."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hq_fixtures import running_hq
from test_hq_conflicts import EXAMPLE, Node, base_record

from hq_server.store import SQLiteHQStore
from protocol.collections import ReferenceTable
from protocol.hlc import pack, system_ms
from protocol.references import REFERENCES_COLLECTION, read_table, table_record

ADMIN_CODES = EXAMPLE.parent / "admin_codes.example.csv"

PATH = "/v1/admin/records/beneficiaries/B1"


def snapshot(db: Path) -> tuple[list[Any], ...]:
    with sqlite3.connect(db) as conn:
        return tuple(
            conn.execute(sql).fetchall()
            for sql in (
                "SELECT * FROM records ORDER BY collection, key",
                "SELECT seq FROM changelog ORDER BY seq",
                "SELECT id FROM audit ORDER BY id",
            )
        )


async def test_the_owning_system_writes_its_field_and_every_node_gets_it(tmp_path: Path) -> None:
    async with running_hq(tmp_path, collections_file=str(EXAMPLE)) as hq:
        store = hq.store
        assert isinstance(store, SQLiteHQStore)
        node = await Node.enrol(store, "field")
        await base_record(store, node, pack(system_ms()))
        owner = (await store.create_api_token("case-management", actor="cli:ops")).token
        other = (await store.create_api_token("grants", actor="cli:ops")).token

        def headers(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        before = snapshot(hq.config.hq.db_path)
        refused = await hq.client.patch(
            PATH, json={"registration_status": "verified"}, headers=headers(other)
        )
        assert refused.status == 403
        assert "hq:case-management" in (await refused.json())["message"]
        bad = await hq.client.patch(
            PATH, json={"registration_status": "approved"}, headers=headers(owner)
        )
        assert bad.status == 400 and "registration_status" in (await bad.json())["message"]
        missing = await hq.client.patch(
            "/v1/admin/records/beneficiaries/NOPE",
            json={"registration_status": "verified"},
            headers=headers(owner),
        )
        assert missing.status == 404
        rekey = await hq.client.patch(PATH, json={"beneficiary_id": "X"}, headers=headers(owner))
        assert rekey.status == 400
        assert snapshot(hq.config.hq.db_path) == before

        done = await hq.client.patch(
            PATH, json={"registration_status": "verified"}, headers=headers(owner)
        )
        assert done.status == 200, await done.text()
        body = await done.json()
        assert body["record"]["registration_status"] == "verified"
        page = await store.feed(node.id, 0, 100, max_bytes=1 << 20)
        assert {"registration_status": "verified"} in [c.fields for c in page.changes]
        audit = (await store.audit_log())[-1]
        assert (audit.actor, audit.action) == ("api:case-management", "record.write")
        # A lww field is any system's to write.
        lww = await hq.client.patch(PATH, json={"given_name": "Amina K."}, headers=headers(other))
        assert lww.status == 200


async def test_hq_checks_codes_against_the_newest_table_it_sent(tmp_path: Path) -> None:
    async with running_hq(tmp_path, collections_file=str(EXAMPLE)) as hq:
        store = hq.store
        assert isinstance(store, SQLiteHQStore)
        node = await Node.enrol(store, "field")
        await base_record(store, node, pack(system_ms()))
        token = (await store.create_api_token("case-management", actor="cli:ops")).token
        auth = {"Authorization": f"Bearer {token}"}
        new_code = {"admin3": "JO01-01-999"}
        refused = await hq.client.patch(PATH, json=new_code, headers=auth)
        assert refused.status == 400 and "admin3" in (await refused.json())["message"]
        codes = read_table("admin3", ADMIN_CODES, column="admin3").codes | {"JO01-01-999"}
        table = table_record(ReferenceTable("admin3", frozenset(codes)), pushed_by="cli:ops")
        await store.write_record(
            REFERENCES_COLLECTION, "admin3", table, actor="cli:ops", action="reference.push"
        )
        accepted = await hq.client.patch(PATH, json=new_code, headers=auth)
        assert accepted.status == 200, await accepted.text()
