"""The agent's store under the conflict policies: source_of_truth writes refused at the edge, review
conflicts from the feed tracked per field, a local resolution closing them."""

from __future__ import annotations

from pathlib import Path

from agent.store import AgentStore, Write
from protocol.change import Change
from protocol.collections import load_collections
from protocol.merge import field_policies

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "collections.example.toml"
POLICIES = field_policies(load_collections(EXAMPLE))
ME = "nme000000000000000000000000000"
OTHER = "nother0000000000000000000000"


async def opened(tmp_path: Path) -> AgentStore:
    return await AgentStore.open(tmp_path / "agent.db", ME, POLICIES)


def created() -> Write:
    fields = {"given_name": "Amina", "household_size": 4, "registration_status": "registered"}
    return Write("beneficiaries", "B1", "upsert", fields)


async def test_source_of_truth_field_is_the_owners_to_change(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    try:
        (first,) = await store.write([created()])
        assert first.seq is not None and first.refused is None  # the initial value is allowed
        change = Write("beneficiaries", "B1", "upsert", {"registration_status": "verified"})
        (result,) = await store.write([change])
        assert result.seq is None and result.refused is not None
        assert "registration_status (owned by hq:case-management)" in result.refused
        assert (await store.get("beneficiaries", "B1"))["registration_status"] == "registered"  # type: ignore[index]
        # Writing the same value again is no change, so not refused.
        same = Write("beneficiaries", "B1", "upsert", {"registration_status": "registered"})
        assert (await store.write([same]))[0].refused is None
    finally:
        await store.close()


async def test_review_conflict_from_the_feed_is_listed_and_resolved_locally(
    tmp_path: Path,
) -> None:
    store = await opened(tmp_path)
    try:
        (first,) = await store.write([created()])
        assert first.hlc is not None
        base = first.hlc
        mine = Write("beneficiaries", "B1", "upsert", {"household_size": 5})
        await store.write([mine])
        theirs = Change(
            "beneficiaries", "B1", "upsert", {"household_size": 6}, base + 10**9, base, OTHER, 1
        )
        await store.apply_feed([theirs], 1, ["group:field-registration"])
        assert await store.groups() == ["group:field-registration"]
        ((collection, key, name, heads),) = await store.open_conflicts()
        assert (collection, key, name) == ("beneficiaries", "B1", "household_size")
        assert sorted(h.value for h in heads) == [5, 6]
        # Resolving with the value shown now still writes a change that covers both sides.
        resolution = Write(
            "beneficiaries", "B1", "upsert", {"household_size": 6}, must_exist=True, resolves=True
        )
        (done,) = await store.write([resolution])
        assert done.seq is not None
        assert await store.open_conflicts() == []
        assert (await store.get("beneficiaries", "B1"))["household_size"] == 6  # type: ignore[index]
    finally:
        await store.close()
