"""The agent's store under the conflict policies: source_of_truth writes refused at the edge, review
conflicts from the feed tracked per field, a local resolution closing them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import review
from agent.capture.validate import EdgeValidator
from agent.config import load_agent_config
from agent.service import partial_check
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


RENAMED = """
[collections.people]
key = "id"
[collections.people.fields]
id = { type = "string" }
size = { type = "integer", min = 1, policy = "review", owner = "group:g" }
[collections.people.transform]
rename = { size = "hh_size" }
"""


async def test_a_renamed_review_field_is_resolved_under_its_wire_name(tmp_path: Path) -> None:
    (tmp_path / "collections.toml").write_text(RENAMED)
    (tmp_path / "agent.toml").write_text(
        f'[agent]\ndata_dir = "{tmp_path / "data"}"\ncollections_file = "collections.toml"\n'
        '[collections.people]\nkey = "id"\n'
    )
    config = load_agent_config(tmp_path / "agent.toml")
    policies = field_policies(load_collections(tmp_path / "collections.toml"))
    store = await AgentStore.open(tmp_path / "agent.db", ME, policies)
    try:
        validator = EdgeValidator.for_agent(config, store.clock.physical)
        check = partial_check(validator)
        (first,) = await store.write([Write("people", "p1", "upsert", {"id": "p1", "hh_size": 3})])
        assert first.hlc is not None
        mine = Write("people", "p1", "upsert", {"hh_size": 4})
        await store.write([mine])
        theirs = Change(
            "people", "p1", "upsert", {"hh_size": 5}, first.hlc + 10**9, first.hlc, OTHER, 1
        )
        await store.apply_feed([theirs], 1, ["group:g"])
        ((_, _, name, _),) = await store.open_conflicts()
        assert name == "hh_size"
        with pytest.raises(review.ReviewError) as refused:
            await review.resolve(store, "people", "p1", name, value=0, check=check)
        assert refused.value.status == 422  # min = 1, checked under the declared name
        await review.resolve(store, "people", "p1", name, take=2, check=check)
        assert await store.open_conflicts() == []
        assert (await store.get("people", "p1")) == {"id": "p1", "hh_size": 4}
    finally:
        await store.close()
