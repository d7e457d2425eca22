"""POST /v1/enroll: one-time tokens, expiry, key checks, re-enrolment, audit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hq_fixtures import FakeWall, Harness, make_changes, running_hq, seal_batch, unb64

from hq_server.store import AmbiguousNode, NodeNotFound, StoreError
from protocol.identity import NodeIdentity
from protocol.transport import b64


async def enroll_json(hq: Harness, body: Any) -> tuple[int, dict[str, Any]]:
    response = await hq.client.post("/v1/enroll", json=body)
    return response.status, await response.json()


async def refused(hq: Harness, body: Any, status: int, error: str) -> None:
    before = hq.snapshot()
    got_status, answer = await enroll_json(hq, body)
    assert (got_status, answer["error"]) == (status, error), answer
    assert answer["message"]
    assert hq.snapshot() == before


async def test_good_token_enrols_and_pins_hq(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = NodeIdentity.generate()
        token = await hq.token("field-7")
        status, answer = await enroll_json(
            hq, {"token": token, "public_key": b64(node.public_key), "name": "laptop-7"}
        )
        assert status == 200, answer
        assert answer["node_id"] == node.node_id
        assert answer["name"] == "field-7"  # the operator's name for the token wins
        assert answer["hq_node_id"] == hq.state.identity.node_id
        assert unb64(answer["hq_public_key"]) == hq.hq_public_key
        assert abs(answer["hq_time"] - hq.state.clock.physical()) < 10_000
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert (stored.name, stored.acked_through, stored.active) == ("field-7", 0, True)
        actions = [entry.action for entry in await hq.store.audit_log()]
        assert actions == ["token.create", "node.enroll"]
        assert await hq.store.verify_audit() is None
        # The token itself is never stored, only its hash.
        assert all(token not in str(row) for row in hq.snapshot().tokens)


async def test_reused_token_is_refused(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        token = await hq.token()
        first = NodeIdentity.generate()
        status, _ = await enroll_json(hq, {"token": token, "public_key": b64(first.public_key)})
        assert status == 200
        second = NodeIdentity.generate()
        await refused(hq, {"token": token, "public_key": b64(second.public_key)}, 403, "token_used")
        await refused(hq, {"token": token, "public_key": b64(first.public_key)}, 403, "token_used")


async def test_expired_and_unknown_tokens_are_refused(tmp_path: Path) -> None:
    wall = FakeWall()
    async with running_hq(tmp_path, wall=wall) as hq:
        token = await hq.token(ttl_ms=60_000)
        wall.advance(60_001)
        key = b64(NodeIdentity.generate().public_key)
        await refused(hq, {"token": token, "public_key": key}, 403, "token_expired")
        await refused(hq, {"token": "made-up", "public_key": key}, 403, "token_invalid")


async def test_bad_keys_and_bodies_are_400_and_do_not_use_the_token(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        token = await hq.token()
        await refused(hq, {"token": token, "public_key": "not base64!"}, 400, "corrupt")
        await refused(hq, {"token": token, "public_key": b64(b"short")}, 400, "bad_request")
        await refused(hq, {"token": token, "public_key": 42}, 400, "bad_request")
        await refused(hq, {"token": token}, 400, "bad_request")
        await refused(hq, {"public_key": b64(b"\0" * 32)}, 400, "bad_request")
        await refused(hq, ["a", "list"], 400, "bad_request")
        before = hq.snapshot()
        response = await hq.client.post("/v1/enroll", data=b"{not json")
        assert response.status == 400
        assert hq.snapshot() == before
        # The token was not consumed by any of the refusals above.
        node = NodeIdentity.generate()
        status, _ = await enroll_json(hq, {"token": token, "public_key": b64(node.public_key)})
        assert status == 200


async def test_reenrolling_a_key_keeps_its_high_water_mark(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll(name="field-1")
        batch = seal_batch(node, 1, make_changes(node, 1, 3))
        assert await hq.acked(await hq.post(batch)) == 1
        token = await hq.token("field-1", reenroll=True)
        status, answer = await enroll_json(
            hq, {"token": token, "public_key": b64(node.public_key), "name": "laptop"}
        )
        assert (status, answer["node_id"], answer["name"]) == (200, node.node_id, "field-1")
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert (stored.name, stored.acked_through, stored.change_seq) == ("field-1", 1, 3)
        # Batch 1 (resent as it was) is still a duplicate: nothing is replayed.
        assert await hq.acked(await hq.post(batch)) == 1
        assert await hq.store.changelog_count() == 3


async def test_an_enrolled_key_with_an_ordinary_token_is_refused(tmp_path: Path) -> None:
    """Defect 5: any fresh token let an enrolled key rename its node and take other groups."""
    async with running_hq(tmp_path) as hq:
        owner = await hq.token("field-1", groups=["north"])
        node = NodeIdentity.generate()
        status, _ = await enroll_json(hq, {"token": owner, "public_key": b64(node.public_key)})
        assert status == 200
        other = await hq.token("finance-office", groups=["finance"])
        body = {"token": other, "public_key": b64(node.public_key), "name": "finance-office"}
        await refused(hq, body, 403, "already_enrolled")
        stored = await hq.store.get_node(node.node_id)
        assert stored is not None
        assert (stored.name, stored.groups) == ("field-1", ("group:north",))
        _, answer = await enroll_json(hq, body)
        assert "--reenroll" in answer["message"] and node.node_id in answer["message"]
        # The refused token was not used up: a new key can still enrol with it.
        fresh = NodeIdentity.generate()
        status, answer = await enroll_json(
            hq, {"token": other, "public_key": b64(fresh.public_key)}
        )
        assert (status, answer["name"], answer["groups"]) == (
            200,
            "finance-office",
            ["group:finance"],
        )


async def test_a_reenrolment_token_serves_its_own_node_only(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        one = await hq.enroll(name="field-1")
        two = await hq.enroll(name="field-2")
        token = await hq.token("field-1", reenroll=True)
        await refused(hq, {"token": token, "public_key": b64(two.public_key)}, 403, "wrong_node")
        stranger = b64(NodeIdentity.generate().public_key)
        await refused(hq, {"token": token, "public_key": stranger}, 403, "wrong_node")
        status, _ = await enroll_json(hq, {"token": token, "public_key": b64(one.public_key)})
        assert status == 200


async def test_reenrolment_keeps_groups_unless_the_token_gives_some(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        token = await hq.token("field-1", groups=["north"])
        node = NodeIdentity.generate()
        await enroll_json(hq, {"token": token, "public_key": b64(node.public_key)})
        key = b64(node.public_key)
        same = await hq.token(node.node_id, reenroll=True)  # by id works too
        _, answer = await enroll_json(hq, {"token": same, "public_key": key})
        assert answer["groups"] == ["group:north"]
        regroup = await hq.token("field-1", reenroll=True, groups=["south"])
        _, answer = await enroll_json(hq, {"token": regroup, "public_key": key})
        assert answer["groups"] == ["group:south"]


async def test_reenrolment_tokens_need_one_active_node(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        with pytest.raises(NodeNotFound, match="no node"):
            await hq.token("nobody", reenroll=True)
        node = await hq.enroll(name="field-1")
        await hq.enroll(name="field-1")
        with pytest.raises(AmbiguousNode):
            await hq.token("field-1", reenroll=True)
        await hq.store.revoke_node(node.node_id, actor="test")
        with pytest.raises(StoreError, match="revoked"):
            await hq.token(node.node_id, reenroll=True)


async def test_every_enrolment_is_audited(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = NodeIdentity.generate()
        key = b64(node.public_key)
        token = await hq.token("field-1")
        await enroll_json(hq, {"token": "fse_made-up", "public_key": key, "name": "lap"})
        await enroll_json(hq, {"token": token, "public_key": key, "name": "lap"})
        await enroll_json(hq, {"token": token, "public_key": key, "name": "lap"})
        await enroll_json(hq, {"token": await hq.token("x"), "public_key": key})
        entries = [e for e in await hq.store.audit_log() if e.action.startswith("node.")]
        assert [(e.action, e.detail.get("code")) for e in entries] == [
            ("node.enroll_refused", "token_invalid"),
            ("node.enroll", None),
            ("node.enroll_refused", "token_used"),
            ("node.enroll_refused", "already_enrolled"),
        ]
        assert all(e.actor == node.node_id and e.detail["node_id"] == node.node_id for e in entries)
        assert entries[1].detail["name_hint"] == "lap"
        assert await hq.store.verify_audit() is None
        assert token not in str([e.detail for e in entries])


async def test_revoked_key_cannot_reenrol(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        await hq.store.revoke_node(node.node_id, actor="test")
        token = await hq.token()
        await refused(hq, {"token": token, "public_key": b64(node.public_key)}, 403, "key_revoked")
