"""HQ never acknowledges a change it did not apply (issue 9, defect 2, HQ side).

A node whose database went back in time (restored from a backup, then written to) reuses batch and
change sequence numbers HQ already holds, for other writes. HQ refuses such a batch with 409
"diverged" and changes nothing; the body tells the node where HQ stands (its batch and change high
marks and the highest stamp it holds from the node), which is what the agent's recovery needs.
A byte-identical resend, or a change resent identically inside a new batch, is still no error.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from hq_fixtures import DAY_MS, Harness, make_changes, running_hq, seal_batch

from hq_server.store import IngestStatus, SQLiteHQStore
from protocol.change import Change
from protocol.hlc import system_ms
from protocol.identity import NodeIdentity

DIVERGED_KEYS = {
    "error",
    "message",
    "node",
    "batch",
    "seqs",
    "hq_acked_through",
    "hq_change_seq",
    "hq_max_hlc",
}


async def diverged(hq: Harness, data: bytes) -> dict[str, Any]:
    """POST `data`, expect 409 diverged in the contract's shape, and prove nothing changed."""
    before = hq.snapshot()
    response = await hq.post(data)
    body: dict[str, Any] = await response.json()
    assert response.status == 409, body
    assert set(body) == DIVERGED_KEYS, body
    assert body["error"] == "diverged"
    assert hq.snapshot() == before
    return body


async def two_batches(hq: Harness) -> tuple[NodeIdentity, list[Change]]:
    """An enrolled node that sent batches 1 (changes 1-3) and 2 (changes 4-5), and the changes."""
    node = await hq.enroll()
    changes = make_changes(node, 1, 5)
    assert await hq.acked(await hq.post(seal_batch(node, 1, changes[:3]))) == 1
    assert await hq.acked(await hq.post(seal_batch(node, 2, changes[3:]))) == 2
    return node, changes


async def test_a_new_batch_reusing_change_seqs_with_other_content_is_refused(
    tmp_path: Path,
) -> None:
    """The restore case: batch 3 is new to HQ, but its changes 4 and 5 are not -- HQ holds other
    writes under those numbers. Acking it would make the agent delete writes HQ never stored."""
    async with running_hq(tmp_path) as hq:
        node, sent = await two_batches(hq)
        top = sent[-1].hlc
        reused = make_changes(node, 4, 3, key_prefix="after-restore", hlc_ms=system_ms() + 50)
        body = await diverged(hq, seal_batch(node, 3, reused))
        assert body["node"] == node.node_id
        assert body["batch"] == 3
        assert body["seqs"] == [4, 5]
        assert (body["hq_acked_through"], body["hq_change_seq"], body["hq_max_hlc"]) == (2, 5, top)
        for text in (node.node_id, "4", "5", "restore", "renumber"):
            assert text in body["message"], body["message"]
        # The recovery works: the same writes renumbered above HQ's marks are stored.
        renumbered = [
            replace(c, seq=body["hq_change_seq"] + i + 1, hlc=body["hq_max_hlc"] + i + 1)
            for i, c in enumerate(reused)
        ]
        batch = body["hq_acked_through"] + 1
        assert await hq.acked(await hq.post(seal_batch(node, batch, renumbered))) == 3
        assert await hq.store.changelog_count() == 8


async def test_one_reused_seq_with_other_fields_refuses_the_whole_batch(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node, sent = await two_batches(hq)
        other = [sent[3], replace(sent[4], fields={"name": "someone else"})]  # 4 as HQ holds it
        fresh = make_changes(node, 6, 2, key_prefix="new")
        body = await diverged(hq, seal_batch(node, 3, [*other, *fresh]))
        assert body["seqs"] == [5, 5]


async def test_a_known_batch_seq_with_other_content_names_the_batch_range(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        node, sent = await two_batches(hq)
        top = sent[-1].hlc
        other = make_changes(node, 1, 3, key_prefix="restored", hlc_ms=system_ms() + 50)
        body = await diverged(hq, seal_batch(node, 1, other))
        assert (body["node"], body["batch"], body["seqs"]) == (node.node_id, 1, [1, 3])
        assert (body["hq_acked_through"], body["hq_change_seq"], body["hq_max_hlc"]) == (2, 5, top)
        assert "batch 1" in body["message"]


async def test_identical_resends_are_still_acked(tmp_path: Path) -> None:
    """Byte-identical resends get the same ack; a change resent unchanged in a new batch (e.g.
    re-sealed) is skipped as a duplicate, and the rest of the batch is applied."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        changes = make_changes(node, 1, 5)
        first = seal_batch(node, 1, changes[:3])
        assert await hq.acked(await hq.post(first)) == 1
        before = hq.snapshot()
        assert await hq.acked(await hq.post(first)) == 1
        assert hq.snapshot() == before
        assert await hq.acked(await hq.post(seal_batch(node, 2, changes[2:]))) == 2
        assert await hq.store.changelog_count() == 5


async def test_high_marks_follow_ingest(tmp_path: Path) -> None:
    """hq_change_seq and hq_max_hlc are the node's own, kept at every applied batch: the highest
    stamp is not the last change's when the node's clock went back."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        early = make_changes(node, 1, 2)
        late = make_changes(node, 3, 2, key_prefix="c", hlc_ms=system_ms() - DAY_MS)
        assert await hq.acked(await hq.post(seal_batch(node, 1, early))) == 1
        assert await hq.acked(await hq.post(seal_batch(node, 2, late))) == 2
        other = make_changes(node, 1, 1, key_prefix="x")
        body = await diverged(hq, seal_batch(node, 1, other))
        assert (body["hq_change_seq"], body["hq_max_hlc"]) == (4, early[-1].hlc)
        assert body["seqs"] == [1, 1]


async def test_content_is_compared_by_value_not_by_encoding(tmp_path: Path) -> None:
    """The same fields in another order are the same change; True is not 1 (JSON keeps them
    apart, and so do HQ's records and sinks)."""
    async with SQLiteHQStore(tmp_path / "hq.db") as store:
        issued = await store.create_token("n", DAY_MS, actor="test")
        node = NodeIdentity.generate()
        await store.enroll(issued.token, node.public_key)
        change = replace(make_changes(node, 1, 1)[0], fields={"a": 1, "b": [1, 2]})
        assert (await store.ingest(node.node_id, 1, [change])).status is IngestStatus.APPLIED
        reordered = replace(change, fields={"b": [1, 2], "a": 1})
        again = await store.ingest(node.node_id, 2, [reordered])
        assert (again.status, again.skipped) == (IngestStatus.APPLIED, 1)
        truthy = replace(change, fields={"a": True, "b": [1, 2]})
        refused = await store.ingest(node.node_id, 3, [truthy])
        assert (refused.status, refused.seqs, refused.acked_through) == (
            IngestStatus.DIVERGED,
            (1, 1),
            2,
        )


async def test_a_known_batch_seq_with_the_same_stamps_but_other_fields_is_refused(
    tmp_path: Path,
) -> None:
    """The batch digest leaves out the fields (it must match resends of batches stored before it
    existed), so a reused batch number whose changes differ only in their values is compared
    change by change against the log: acking it would drop writes HQ never stored."""
    async with running_hq(tmp_path) as hq:
        node, sent = await two_batches(hq)
        other = [
            replace(c, fields={**c.fields, "note": "written after the restore"}) for c in sent[3:]
        ]
        body = await diverged(hq, seal_batch(node, 2, other))
        assert (body["batch"], body["seqs"]) == (2, [4, 5])
        # The batch as it was sent is still a duplicate, acked as before.
        assert await hq.acked(await hq.post(seal_batch(node, 2, sent[3:]))) == 2
