"""Known defect found by the torture suite (seed 200, 128 keys wrong): HQ reverts a node's own
sequential update when the node's clock jumped twice (issue 10, clocks).

The node's HLC kept a forward jump (45 min ahead: it ran with a fast clock earlier, and an HLC never
goes back), and the batch carrying the update is sealed after its clock jumped to 2 h ahead. HQ
estimates the stamp's real time as stamp - offset = 75 min ago, before the value the update
replaces, and "restores" that value although the update's parent is that very value: an estimate
of a change's real time should never fall below its parent's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hq_fixtures import FakeWall, running_hq, seal_batch

from protocol.change import Change
from protocol.hlc import pack

MIN = 60 * 1000


@pytest.mark.xfail(
    strict=True,
    reason="issue 10: clock bounding estimates real time as stamp - batch offset, ignoring the "
    "parent; a node's own later update is reverted",
)
async def test_fast_clock_update_of_own_record_is_not_reverted(tmp_path: Path) -> None:
    wall = FakeWall()
    async with running_hq(tmp_path, wall=wall) as hq:
        node = await hq.enroll()
        t0 = wall.now
        first = Change(
            "items", "k1", "upsert", {"id": "k1", "w": "old"}, pack(t0), 0, node.node_id, 1
        )
        await hq.acked(await hq.post(seal_batch(node, 1, [first], time=pack(t0))))
        wall.advance(20 * 1000)
        now = wall.now
        update = Change(
            "items", "k1", "upsert", {"w": "new"}, pack(now + 45 * MIN), first.hlc, node.node_id, 2
        )
        await hq.acked(await hq.post(seal_batch(node, 2, [update], time=pack(now + 120 * MIN))))
        record = await hq.store.get_record("items", "k1")
        assert record is not None and record.data["w"] == "new", record.data
