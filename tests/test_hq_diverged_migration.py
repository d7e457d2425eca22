"""HQ schema 2 -> 3 (the nodes' high marks), from a committed database of the old schema.

tests/fixtures/hq-v2.db was made by tests/fixtures/make_hq_v2.py with the code before the
migration: the upgrade must keep every node, record, log entry, token and audit entry, and know
each node's high marks from its change log, so a restored node is refused with the right marks.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from hq_fixtures import make_changes, running_hq, seal_batch

from hq_server.store import SCHEMA_VERSION, SQLiteHQStore
from protocol.hlc import pack
from protocol.identity import NodeIdentity
from protocol.transport import b64

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_MS = 1_780_000_000_000  # as in make_hq_v2.py
BASE = pack(FIXTURE_MS)


def copy_fixture(tmp_path: Path) -> tuple[Path, NodeIdentity]:
    data_dir = tmp_path / "hq"
    data_dir.mkdir(mode=0o700)
    db = data_dir / "hq.db"
    shutil.copyfile(FIXTURES / "hq-v2.db", db)
    db.chmod(0o600)
    key = tmp_path / "node.key"
    shutil.copyfile(FIXTURES / "hq-v2.node.key", key)
    key.chmod(0o600)  # git keeps no modes
    return db, NodeIdentity.load(key)


def table(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def test_v2_database_migrates_with_every_row_and_the_nodes_high_marks(
    tmp_path: Path,
) -> None:
    db, node = copy_fixture(tmp_path)
    names = ("nodes", "changelog", "records", "tokens", "conflicts", "audit", "batch_digests")
    columns = {
        name: ", ".join(r[1] for r in table(db, f"PRAGMA table_info({name})")) for name in names
    }
    kept = {name: table(db, f"SELECT {columns[name]} FROM {name} ORDER BY 1, 2") for name in names}
    async with SQLiteHQStore(db) as store:
        nodes = {n.name: n for n in await store.list_nodes()}
        assert await store.verify_audit() is None
    assert table(db, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    for name, rows in kept.items():  # every old column of every row, as it was
        assert table(db, f"SELECT {columns[name]} FROM {name} ORDER BY 1, 2") == rows, name
    assert table(db, "SELECT COUNT(*) FROM tokens WHERE reenroll_node IS NOT NULL") == [(0,)]
    one, two = nodes["field-1"], nodes["field-2"]
    assert one.node_id == node.node_id
    assert (one.acked_through, one.change_seq, one.max_hlc) == (2, 9, BASE + 103)
    assert (two.acked_through, two.change_seq, two.max_hlc) == (1, 1, BASE + 50)
    assert not two.active
    assert one.groups == ("group:north",)


async def test_a_migrated_hq_refuses_reused_seqs_and_takes_the_next_ones(tmp_path: Path) -> None:
    _, node = copy_fixture(tmp_path)
    async with running_hq(tmp_path) as hq:
        reused = make_changes(node, 9, 2, key_prefix="after-restore")
        response = await hq.post(seal_batch(node, 3, reused))
        body = await response.json()
        assert response.status == 409, body
        assert (body["error"], body["seqs"], body["hq_change_seq"]) == ("diverged", [9, 9], 9)
        assert (body["hq_acked_through"], body["hq_max_hlc"]) == (2, BASE + 103)
        fresh = make_changes(node, 10, 2, key_prefix="after-restore")
        assert await hq.acked(await hq.post(seal_batch(node, 3, fresh))) == 3
        assert await hq.store.changelog_count() == 12
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert (stored.change_seq, stored.max_hlc) == (11, fresh[-1].hlc)


async def test_a_v2_token_enrols_new_keys_only_after_the_upgrade(tmp_path: Path) -> None:
    """Tokens made before re-enrolment tokens existed could enrol any key: after the upgrade
    they enrol new keys only, so an enrolled node cannot take them (defect 5)."""
    _, node = copy_fixture(tmp_path)
    token = (FIXTURES / "hq-v2.token").read_text().strip()
    async with running_hq(tmp_path) as hq:
        body = {"token": token, "public_key": b64(node.public_key)}
        response = await hq.client.post("/v1/enroll", json=body)
        assert (response.status, (await response.json())["error"]) == (403, "already_enrolled")
        fresh = NodeIdentity.generate()
        body = {"token": token, "public_key": b64(fresh.public_key)}
        response = await hq.client.post("/v1/enroll", json=body)
        answer = await response.json()
        assert (response.status, answer["name"]) == (200, "field-3"), answer
