"""HQ under the collections' conflict policies: the review queue, the lww log, source_of_truth
enforcement and clock bounding, on a real SQLite store fed the way ingest feeds it."""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hq_fixtures import DAY_MS, FakeWall, running_hq, seal_batch
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples

from hq_server.conflicts import Correction, Judge, Writer
from hq_server.store import SQLiteHQStore, StoreError
from protocol.change import Change
from protocol.collections import load_collections
from protocol.hlc import MAX_HLC, pack, physical_ms, system_ms
from protocol.identity import NodeIdentity
from protocol.merge import FieldPolicies, RecordState, apply_change, field_policies

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "collections.example.toml"
POLICIES = field_policies(load_collections(EXAMPLE))
HQ_ORIGIN = "nhq0000000000000000000000000"
YEAR_MS = 365 * DAY_MS


@asynccontextmanager
async def opened(tmp_path: Path, wall: FakeWall) -> AsyncIterator[SQLiteHQStore]:
    store = SQLiteHQStore(tmp_path / "hq.db", wall=wall, policies=POLICIES, origin=HQ_ORIGIN)
    async with store:
        yield store


class Node:
    """An enrolled node that numbers its changes and batches like an agent does."""

    def __init__(self, store: SQLiteHQStore, identity: NodeIdentity) -> None:
        self.store, self.id = store, identity.node_id
        self.seq = self.batch = 0

    @classmethod
    async def enrol(cls, store: SQLiteHQStore, name: str, groups: tuple[str, ...] = ()) -> Node:
        identity = NodeIdentity.generate()
        issued = await store.create_token(name, DAY_MS, actor="test", groups=groups)
        await store.enroll(issued.token, identity.public_key)
        return cls(store, identity)

    def change(self, key: str, fields: dict[str, Any], hlc: int, parent: int) -> Change:
        self.seq += 1
        return Change("beneficiaries", key, "upsert", fields, hlc, parent, self.id, self.seq)

    def delete(self, key: str, hlc: int, parent: int) -> Change:
        self.seq += 1
        return Change("beneficiaries", key, "delete", {}, hlc, parent, self.id, self.seq)

    async def send(self, *changes: Change, offset_ms: int | None = None) -> None:
        self.batch += 1
        await self.store.ingest(self.id, self.batch, list(changes), clock_offset_ms=offset_ms)


async def base_record(store: SQLiteHQStore, node: Node, at: int) -> int:
    """A registered household (as the field creates it); returns its version."""
    await node.send(
        node.change(
            "B1",
            {"given_name": "Amina", "household_size": 4, "registration_status": "registered"},
            at,
            0,
        )
    )
    return at


async def test_review_conflict_is_queued_once_with_both_sides_and_the_ancestor(
    tmp_path: Path,
) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        left = a.change("B1", {"household_size": 5}, v + 10, v)
        right = b.change("B1", {"household_size": 6}, v + 20, v)
        await a.send(left)
        assert await store.list_conflicts() == []
        await b.send(right)
        await b.send(right)  # a resend is a duplicate, not a second conflict
        (entry,) = await store.list_conflicts()
        assert (entry.collection, entry.key, entry.field, entry.policy, entry.status) == (
            "beneficiaries",
            "B1",
            "household_size",
            "review",
            "open",
        )
        assert [(s["value"], s["origin"]) for s in entry.sides] == [(6, b.id), (5, a.id)]
        assert entry.ancestor == {"value": 4, "hlc": v, "origin": a.id}
        # Provisional value: the highest stamp, as on every replica.
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["household_size"] == 6


async def test_resolution_at_hq_is_a_change_that_covers_both_sides(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        await a.send(a.change("B1", {"household_size": 5}, v + 10, v))
        await b.send(b.change("B1", {"household_size": 6}, v + 20, v))
        (entry,) = await store.list_conflicts()
        done = await store.resolve_conflict(entry.id, 5, actor="cli:alice", note="visited")
        assert done.status == "resolved"
        assert done.resolution is not None
        assert (done.resolution["value"], done.resolution["origin"]) == (5, HQ_ORIGIN)
        assert (done.resolution["by"], done.resolution["note"]) == ("cli:alice", "visited")
        assert await store.list_conflicts() == []
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["household_size"] == 5
        # Both nodes get HQ's resolution in their feed.
        for node in (a, b):
            page = await store.feed(node.id, 0, 100, max_bytes=1 << 20)
            hq = [c for c in page.changes if c.origin == HQ_ORIGIN]
            assert [c.fields for c in hq] == [{"household_size": 5}]
            assert hq[0].parent >= v + 20
        with pytest.raises(StoreError, match="not open"):
            await store.resolve_conflict(entry.id, 6, actor="cli:alice")
        audit = await store.audit_log()
        assert audit[-1].action == "conflict.resolve" and audit[-1].actor == "cli:alice"


async def test_resolution_from_a_node_closes_the_conflict(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        await a.send(a.change("B1", {"household_size": 5}, v + 10, v))
        await b.send(b.change("B1", {"household_size": 6}, v + 20, v))
        # Node a received b's side (its version is now v + 20) and decided.
        await a.send(a.change("B1", {"household_size": 6}, v + 30, v + 20))
        (entry,) = await store.list_conflicts(status=None)
        assert entry.status == "resolved"
        assert entry.resolution is not None and entry.resolution["origin"] == a.id


async def test_equal_concurrent_values_converge_silently(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        await a.send(a.change("B1", {"household_size": 5, "given_name": "Ami"}, v + 10, v))
        await b.send(b.change("B1", {"household_size": 5, "given_name": "Ami"}, v + 20, v))
        assert await store.list_conflicts(status=None) == []


async def test_lww_loser_is_logged_as_auto_resolved(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        await b.send(b.change("B1", {"given_name": "Aminata"}, v + 20, v))
        await a.send(a.change("B1", {"given_name": "Amina B."}, v + 10, v))
        assert await store.list_conflicts() == []  # nothing waits for a person
        (entry,) = await store.list_conflicts(status="auto")
        assert (entry.field, entry.policy) == ("given_name", "lww")
        assert [s["value"] for s in entry.sides] == ["Aminata", "Amina B."]  # winner first


async def test_source_of_truth_write_by_a_non_owner_is_reverted(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        field = await Node.enrol(store, "field", groups=("kakuma",))
        v = await base_record(store, field, pack(wall()))
        await field.send(field.change("B1", {"registration_status": "verified"}, v + 10, v))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["registration_status"] == "registered"
        (entry,) = await store.list_conflicts(status="auto")
        assert entry.policy == "source_of_truth" and "hq:case-management" in entry.note
        page = await store.feed(field.id, 0, 100, max_bytes=1 << 20)
        (fix,) = [c for c in page.changes if c.origin == HQ_ORIGIN]
        assert fix.fields == {"registration_status": "registered"} and fix.hlc > v + 10


async def test_group_owner_writes_its_source_of_truth_field(tmp_path: Path) -> None:
    policies = dict(POLICIES)
    b = policies["beneficiaries"]
    policies["beneficiaries"] = type(b)(
        review=b.review, owners={"registration_status": "group:kakuma"}, reviewers=b.reviewers
    )
    wall = FakeWall()
    store = SQLiteHQStore(tmp_path / "hq.db", wall=wall, policies=policies, origin=HQ_ORIGIN)
    async with store:
        owner = await Node.enrol(store, "owner", groups=("group:kakuma",))
        other = await Node.enrol(store, "other", groups=("north",))
        v = await base_record(store, other, pack(wall()))
        await owner.send(owner.change("B1", {"registration_status": "verified"}, v + 10, v))
        await other.send(other.change("B1", {"registration_status": "inactive"}, v + 20, v + 10))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["registration_status"] == "verified"


@pytest.mark.parametrize("skewed_first", [True, False])
async def test_a_clock_two_years_ahead_cannot_override_a_newer_edit(
    tmp_path: Path, skewed_first: bool
) -> None:
    """Node `late` (clock right) edits the name an hour after node `ahead` (clock two years
    ahead) did, without having seen that edit. The later edit must stand, in either order of
    arrival; HQ says why in its log."""
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        ahead, late = await Node.enrol(store, "ahead"), await Node.enrol(store, "late")
        v = await base_record(store, late, pack(wall()))
        early_edit = ahead.change(
            "B1", {"given_name": "From the past"}, pack(wall() + 2 * YEAR_MS), v
        )
        wall.advance(3_600_000)
        newer_edit = late.change("B1", {"given_name": "Newer"}, pack(wall()), v)
        if skewed_first:
            await ahead.send(early_edit, offset_ms=2 * YEAR_MS)
            await late.send(newer_edit)
        else:
            await late.send(newer_edit)
            await ahead.send(early_edit, offset_ms=2 * YEAR_MS)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["given_name"] == "Newer"
        clock_entries = [
            e for e in await store.list_conflicts(status="auto") if e.policy == "clock"
        ]
        assert len(clock_entries) == 1 and "wrong clock" in clock_entries[0].note
        # A later edit by the fast node that saw the current version still wins, as it should
        # (stamped by its clock, which is above the record's version).
        wall.advance(60_000)
        stamp = max(pack(wall() + 2 * YEAR_MS), record.version + 1)
        await ahead.send(
            ahead.change("B1", {"given_name": "Seen and changed"}, stamp, record.version),
            offset_ms=2 * YEAR_MS,
        )
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["given_name"] == "Seen and changed"


async def test_node_groups_are_audited_and_normalised(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        node = await Node.enrol(store, "n", groups=("kakuma",))
        assert (await store.get_node(node.id)).groups == ("group:kakuma",)  # type: ignore[union-attr]
        changed = await store.set_groups(node.id, ["b", "group:a", "b"], actor="cli:ops")
        assert changed.groups == ("group:a", "group:b")
        assert (await store.audit_log())[-1].action == "node.groups"
        with pytest.raises(StoreError, match="node group"):
            await store.set_groups(node.id, ["bad name"], actor="cli:ops")


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "hq.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE nodes (node_id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key BLOB NOT NULL,
            enrolled_at INTEGER NOT NULL, revoked_at INTEGER, acked_through INTEGER NOT NULL
            DEFAULT 0, last_contact INTEGER, clock_offset_ms INTEGER, flagged_reason TEXT);
        CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, node_name TEXT NOT NULL,
            created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER,
            used_by_node TEXT);
        CREATE TABLE records (collection TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL,
            stamps TEXT NOT NULL, tombstone TEXT, version INTEGER NOT NULL,
            updated_seq INTEGER NOT NULL, PRIMARY KEY (collection, key));
        INSERT INTO records VALUES ('c', 'k', '{"a":1}', '{"a":[5,"n1"]}', NULL, 5, 1);
        """
    )
    conn.commit()
    conn.close()
    async with opened(tmp_path, FakeWall()) as store:
        record = await store.get_record("c", "k")
        assert record is not None and record.data == {"a": 1} and record.state.heads == {}
        node = await Node.enrol(store, "n", groups=("x",))
        assert (await store.get_node(node.id)).groups == ("group:x",)  # type: ignore[union-attr]


async def test_through_the_server_a_fast_clock_is_flagged_and_bounded(tmp_path: Path) -> None:
    """Real HQ server, sealed batches: the node whose clock runs two years ahead is flagged, and
    its edit -- made before the other node's, by real time -- does not override the newer one."""
    async with running_hq(tmp_path, collections_file=str(EXAMPLE)) as hq:
        good, ahead = await hq.enroll(name="good"), await hq.enroll(name="ahead")
        now = system_ms()
        base = Change(
            "beneficiaries",
            "B1",
            "upsert",
            {"given_name": "Amina"},
            pack(now - 60_000),
            0,
            good.node_id,
            1,
        )
        assert await hq.acked(await hq.post(seal_batch(good, 1, [base]))) == 1
        skew = 2 * YEAR_MS
        early = Change(
            "beneficiaries",
            "B1",
            "upsert",
            {"given_name": "Older edit"},
            pack(now - 20_000 + skew),
            base.hlc,
            ahead.node_id,
            1,
        )
        newer = Change(
            "beneficiaries",
            "B1",
            "upsert",
            {"given_name": "Newer edit"},
            pack(now - 5_000),
            base.hlc,
            good.node_id,
            2,
        )
        assert await hq.acked(await hq.post(seal_batch(good, 2, [newer]))) == 2
        sealed = seal_batch(ahead, 1, [early], time=pack(system_ms() + skew))
        assert await hq.acked(await hq.post(sealed)) == 1
        record = await hq.store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["given_name"] == "Newer edit"
        node = await hq.store.get_node(ahead.node_id)
        assert node is not None and node.flagged_reason and "ahead" in node.flagged_reason
        # The correction reaches the fast node too: HQ's own change in its feed.
        page = await hq.store.feed(ahead.node_id, 0, 100, max_bytes=1 << 20)
        assert [c.fields for c in page.changes if c.origin not in (good.node_id,)] == [
            {"given_name": "Newer edit"}
        ]


@pytest.mark.parametrize("parent_offset", [0, 1])
async def test_a_change_whose_parent_is_not_below_its_stamp_is_refused(
    tmp_path: Path, parent_offset: int
) -> None:
    """The conflict rules order writes by "W saw V" (W.parent >= V.hlc): a change that claims to
    have seen itself would break that order, so ingest refuses it and changes nothing."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        stamp = pack(system_ms())
        bad = Change("c", "k", "upsert", {"a": 1}, stamp, stamp + parent_offset, node.node_id, 1)
        before = hq.snapshot()
        response = await hq.post(seal_batch(node, 1, [bad]))
        assert response.status == 400
        assert "parent" in (await response.json())["message"]
        assert hq.snapshot() == before


async def test_enrolment_tokens_never_look_like_command_line_options(tmp_path: Path) -> None:
    """`fieldsync-agent enroll URL TOKEN`: a token starting with '-' would be taken for an option
    (about one token in 64 did, before tokens got their prefix)."""
    async with opened(tmp_path, FakeWall()) as store:
        for _ in range(200):
            issued = await store.create_token("n", DAY_MS, actor="test")
            assert issued.token.startswith("fse_")


# -- source_of_truth under any arrival order (hypothesis) -----------------------------------------

OWNER, INTRUDER = "nOwner", "nIntruder"
OWNED = ("status", "level")  # two owned fields: HQ's corrections and stand-ins are per field
SOT = {"beneficiaries": FieldPolicies(owners=dict.fromkeys(OWNED, "group:own"))}
WRITERS = {
    OWNER: Writer(frozenset({f"node:{OWNER}", "group:own"})),
    INTRUDER: Writer(frozenset({f"node:{INTRUDER}"})),
}


@st.composite
def sot_histories(draw: st.DrawFn) -> list[Change]:
    n = draw(st.integers(1, 10))
    stamps = draw(
        st.lists(
            st.tuples(st.integers(1, 8), st.sampled_from([OWNER, INTRUDER])),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    seqs: dict[str, int] = {}
    out = []
    for hlc, origin in stamps:
        seqs[origin] = seqs.get(origin, 0) + 1
        names = draw(st.lists(st.sampled_from([*OWNED, "note"]), min_size=1, unique=True))
        fields = {name: draw(st.sampled_from(["a", "b", "c"])) for name in names}
        parent = draw(st.integers(0, hlc - 1))
        out.append(
            Change("beneficiaries", "k", "upsert", fields, hlc, parent, origin, seqs[origin])
        )
    return out


def hq_replay(order: list[Change]) -> tuple[RecordState, list[Change]]:
    """HQ over `order`, one batch per change, as the store runs it: a fresh Judge per batch that
    knows only the stand-ins saved for the writes the record holds; returns HQ's state and the
    corrections HQ authored."""
    state, authored = RecordState(), list[Change]()
    saved: dict[tuple[tuple[int, str], str], tuple[int, str]] = {}
    for node_change in order:
        judge = Judge(
            SOT,
            now_ms=10**12,
            max_ahead_ms=10**9,
            skewed_time={},
            stand_ins={(s, n): saved[(s, n)] for n, s in state.stamps.items() if (s, n) in saved},
        )
        pending: deque[tuple[Change, Writer] | Correction] = deque(
            [(node_change, WRITERS[node_change.origin])]
        )
        while pending:
            item = pending.popleft()
            if isinstance(item, Correction):
                change = Change(
                    "beneficiaries",
                    "k",
                    "upsert",
                    item.fields,
                    state.version + 1,
                    state.version,
                    HQ_ORIGIN,
                    len(authored) + 1,
                )
                authored.append(change)
                writer = Writer(hq=True, stands_for=item.stands_for, real_ms=item.real_ms)
            else:
                change, writer = item
            verdict = judge.apply(state, change, writer)
            saved.update(((stamp, name), to) for stamp, name, to in verdict.stand_ins)
            pending.extendleft(reversed(verdict.corrections))
    return state, authored


@examples(150)
@given(history=sot_histories(), data=st.data())
def test_source_of_truth_converges_and_non_owners_never_have_the_last_word(
    history: list[Change], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(history))
    at_hq, corrections = hq_replay(order)
    # Another replica applies the same set -- the nodes' changes and HQ's corrections -- in any
    # order, with repeats: it ends where HQ is.
    everything = history + corrections
    replica = RecordState()
    for change in data.draw(st.permutations(everything + everything[:3])):
        apply_change(replica, change)
    assert (replica.values, replica.stamps) == (at_hq.values, at_hq.stamps)
    # For each owned field the owner's latest write has the last word, whatever the order; with
    # no owner write, some node's value stands (a non-owner may set the initial value of an
    # empty field: whichever reaches HQ first).
    for name in OWNED:
        owned = [c for c in history if c.origin == OWNER and name in c.fields]
        if owned:
            assert at_hq.values[name] == max(owned, key=lambda c: c.hlc).fields[name]
        elif name in at_hq.values:
            assert at_hq.values[name] in [c.fields[name] for c in history if name in c.fields]


# -- found in review: each of these failed before its fix -----------------------------------------


def owned_by_group_office() -> dict[str, FieldPolicies]:
    b = POLICIES["beneficiaries"]
    owners = {"registration_status": "group:office"}
    return {"beneficiaries": FieldPolicies(review=b.review, owners=owners)}


async def test_an_owner_write_outranked_by_a_revert_of_an_older_value_stands(
    tmp_path: Path,
) -> None:
    wall = FakeWall()
    store = SQLiteHQStore(
        tmp_path / "hq.db", wall=wall, policies=owned_by_group_office(), origin=HQ_ORIGIN
    )
    async with store:
        owner = await Node.enrol(store, "owner", groups=("office",))
        other = await Node.enrol(store, "other")
        v = await base_record(store, owner, pack(wall()))
        # The non-owner's write (t+1 s) arrives first and is reverted with a stamp of "now" ...
        wall.advance(10_000)
        await other.send(other.change("B1", {"registration_status": "suspended"}, v + 1_000, v))
        # ... then the owner's write made offline at t+5 s: it must stand.
        await owner.send(owner.change("B1", {"registration_status": "verified"}, v + 5_000, v))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["registration_status"] == "verified"


async def test_a_node_that_never_saw_a_record_cannot_overwrite_its_owned_field(
    tmp_path: Path,
) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        # b registers the same household (parent 0: it never saw it) with another status.
        await b.send(b.change("B1", {"registration_status": "suspended"}, v + 10, 0))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["registration_status"] == "registered"


async def test_corrections_keep_the_restored_edits_real_time_and_hq_stamps_stay_near_now(
    tmp_path: Path,
) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        b, ahead, d = [await Node.enrol(store, n) for n in ("b", "ahead", "d")]
        t = wall()
        v = await base_record(store, b, pack(t))
        await b.send(b.change("B1", {"given_name": "by b"}, pack(t + 2_000), v))
        wall.advance(10_000)
        skewed = ahead.change("B1", {"given_name": "by ahead"}, pack(t + 1_000 + 2 * YEAR_MS), v)
        await ahead.send(skewed, offset_ms=2 * YEAR_MS)
        # d edited at t+3 s, later than b: d's edit must win over HQ's restoration of b's.
        await d.send(d.change("B1", {"given_name": "by d"}, pack(t + 3_000), v))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["given_name"] == "by d"
        # A day later, an unrelated change HQ writes is stamped near HQ's clock, not 2 years on.
        wall.advance(DAY_MS)
        change = await store.write_record(
            "beneficiaries", "B3", {"given_name": "by hq"}, actor="test", action="test.write"
        )
        assert physical_ms(change.hlc) - wall() < 60_000


async def test_a_delete_stamped_ahead_does_not_swallow_later_edits(tmp_path: Path) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        b, ahead = await Node.enrol(store, "b"), await Node.enrol(store, "ahead")
        t = wall()
        v = await base_record(store, b, pack(t))
        wall.advance(10_000)
        delete = ahead.delete("B1", pack(t + 1_000 + 2 * YEAR_MS), v)
        await ahead.send(delete, offset_ms=2 * YEAR_MS)
        # b edits a minute later in real time, not having seen the delete.
        await b.send(b.change("B1", {"given_name": "still here"}, pack(t + 60_000), v))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data.get("given_name") == "still here"
        assert any(c.policy == "clock" for c in await store.list_conflicts(status="auto"))


async def test_a_conflict_left_open_by_a_policy_change_can_still_be_resolved(
    tmp_path: Path,
) -> None:
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        a, b = await Node.enrol(store, "a"), await Node.enrol(store, "b")
        v = await base_record(store, a, pack(wall()))
        await a.send(a.change("B1", {"household_size": 5}, v + 10, v))
        await b.send(b.change("B1", {"household_size": 6}, v + 20, v))
    # household_size is no longer under review in the collections file.
    store = SQLiteHQStore(tmp_path / "hq.db", wall=wall, policies={}, origin=HQ_ORIGIN)
    async with store:
        (entry,) = await store.list_conflicts()
        done = await store.resolve_conflict(entry.id, 5, actor="cli:ops")
        assert done.status == "resolved" and done.resolution is not None
        assert (done.resolution["value"], done.resolution["by"]) == (5, "cli:ops")
        assert await store.list_conflicts() == []


def test_hq_checks_a_renamed_review_field_under_its_declared_name() -> None:
    from hq_server.admin_api import resolution_problems
    from hq_server.store import ConflictEntry
    from protocol.collections import collections_from_dict

    collections = collections_from_dict(
        {
            "collections": {
                "people": {
                    "key": "id",
                    "fields": {
                        "id": {"type": "string"},
                        "size": {"type": "integer", "min": 1, "policy": "review"},
                    },
                    "transform": {"rename": {"size": "hh_size"}},
                }
            }
        }
    )
    entry = ConflictEntry(
        1, "people", "p1", "hh_size", "review", "open", [], None, None, "", 0, None, None
    )
    assert resolution_problems(collections, entry, 0, system_ms())
    assert resolution_problems(collections, entry, 3, system_ms()) == []


# -- found in the second review: order-dependence across batches ----------------------------------


def office_store(tmp_path: Path, wall: FakeWall, *owned: str) -> SQLiteHQStore:
    owners = dict.fromkeys(owned, "group:office")
    policies = {"beneficiaries": FieldPolicies(owners=owners)}
    return SQLiteHQStore(tmp_path / "hq.db", wall=wall, policies=policies, origin=HQ_ORIGIN)


async def owner_and_other(store: SQLiteHQStore) -> tuple[Node, Node]:
    """A node of group:office (the owner in `office_store`) and one outside it."""
    return await Node.enrol(store, "o", groups=("office",)), await Node.enrol(store, "x")


async def send_in_order(first_a: bool, a: tuple[Node, Change], b: tuple[Node, Change]) -> None:
    for node, change in (a, b) if first_a else (b, a):
        await node.send(change)


@pytest.mark.parametrize("owner_first", [True, False])
async def test_a_revert_of_a_revert_still_counts_as_the_original_write(
    tmp_path: Path, owner_first: bool
) -> None:
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status") as store:
        owner, other = await owner_and_other(store)
        v = await base_record(store, owner, pack(wall()))
        wall.advance(10_000)
        await other.send(other.change("B1", {"registration_status": "suspended"}, v + 1_000, v))
        reverted = await store.get_record("beneficiaries", "B1")
        assert reverted is not None
        c1 = reverted.version
        late_owner = owner.change("B1", {"registration_status": "verified"}, v + 5_000, v)
        again = other.change("B1", {"registration_status": "inactive"}, c1 + 1_000, c1)
        await send_in_order(owner_first, (owner, late_owner), (other, again))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["registration_status"] == "verified"


@pytest.mark.parametrize("owner_first", [True, False])
async def test_fields_restored_from_different_writes_keep_their_own_rank(
    tmp_path: Path, owner_first: bool
) -> None:
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status", "given_name") as store:
        owner = await Node.enrol(store, "o", groups=("office",))
        owner2 = await Node.enrol(store, "o2", groups=("office",))
        other = await Node.enrol(store, "x")
        v = await base_record(store, owner, pack(wall()))
        await owner.send(owner.change("B1", {"registration_status": "verified"}, v + 3_000, v))
        wall.advance(10_000)
        both = {"given_name": "X", "registration_status": "suspended"}
        intruder = other.change("B1", both, v + 4_000, v + 3_000)
        late = owner2.change("B1", {"given_name": "Owner late"}, v + 2_000, v)
        await send_in_order(owner_first, (owner2, late), (other, intruder))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None
        assert (record.data["given_name"], record.data["registration_status"]) == (
            "Owner late",
            "verified",
        )


@pytest.mark.parametrize("owner_first", [True, False])
async def test_after_a_delete_from_a_wrong_clock_the_owner_still_has_the_last_word(
    tmp_path: Path, owner_first: bool
) -> None:
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status") as store:
        owner, other = await owner_and_other(store)
        ahead = await Node.enrol(store, "ahead")
        t = wall()
        v = await base_record(store, owner, pack(t))
        wall.advance(10_000)
        delete = ahead.delete("B1", pack(t + 500 + 2 * YEAR_MS), v)
        await ahead.send(delete, offset_ms=2 * YEAR_MS)
        by_owner = owner.change("B1", {"registration_status": "verified"}, pack(t + 1_000), v)
        by_other = other.change("B1", {"registration_status": "suspended"}, pack(t + 2_000), v)
        await send_in_order(owner_first, (owner, by_owner), (other, by_other))
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data.get("registration_status") == "verified"


async def test_a_stamp_at_the_end_of_the_clock_range_is_refused(tmp_path: Path) -> None:
    """HQ must be able to write above every stamp it accepts, or one broken clock would make
    HQ's corrections overflow and strand honest nodes' batches."""
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()
        bad = Change("c", "k", "upsert", {"a": 1}, MAX_HLC, 0, node.node_id, 1)
        before = hq.snapshot()
        response = await hq.post(seal_batch(node, 1, [bad]))
        assert response.status == 400
        assert "end of the clock's range" in (await response.json())["message"]
        assert hq.snapshot() == before


# -- found in the third review ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["OX", "XO"])
async def test_an_owner_write_of_two_fields_keeps_both_against_a_non_owners_initial_values(
    tmp_path: Path, order: str
) -> None:
    """Stand-ins are per field: the owner confirming s1's value must not hand the non-owner's
    s2 the owner's rank."""
    wall = FakeWall()
    async with office_store(tmp_path, wall, "s1", "s2") as store:
        owner, other = await owner_and_other(store)
        t = pack(wall())
        await owner.send(owner.change("B1", {"given_name": "Amina"}, t, 0))
        sends = {
            "X": (other, other.change("B1", {"s1": "b", "s2": "b"}, t + 36, t)),
            "O": (owner, owner.change("B1", {"s1": "b", "s2": "a"}, t + 33, t)),
        }
        for key in order:
            node, change = sends[key]
            await node.send(change)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and (record.data["s1"], record.data["s2"]) == ("b", "a")


@pytest.mark.parametrize("order", ["WNS", "WSN", "SWN", "NWS"])
async def test_a_revert_counts_with_the_real_time_of_the_value_it_restores(
    tmp_path: Path, order: str
) -> None:
    """An owner's edit made later in real time (from a fast clock) beats the older owner value a
    revert restored, whatever the order: the revert counts with that value's real time."""
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status") as store:
        owner, other = await owner_and_other(store)
        fast = await Node.enrol(store, "fast", groups=("office",))
        t = wall()
        created = {"given_name": "Amina", "registration_status": "registered"}
        await owner.send(owner.change("B1", created, pack(t), 0))
        status = "registration_status"
        sends = {
            "W": (owner, owner.change("B1", {status: "verified"}, pack(t + 1_000), pack(t)), None),
            "N": (
                other,
                other.change("B1", {status: "suspended"}, pack(t + 2_000), pack(t + 1_000)),
                None,
            ),
            "S": (
                fast,
                fast.change("B1", {status: "inactive"}, pack(t + 5_000 + 2 * YEAR_MS), pack(t)),
                2 * YEAR_MS,
            ),
        }
        wall.advance(10_000)
        for key in order:
            node, change, offset = sends[key]
            await node.send(change, offset_ms=offset)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data[status] == "inactive"


@pytest.mark.parametrize("order", ["ND", "DN"])
async def test_a_delete_from_a_wrong_clock_never_brings_back_a_non_owners_value(
    tmp_path: Path, order: str
) -> None:
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status") as store:
        owner, other = await owner_and_other(store)
        ahead = await Node.enrol(store, "ahead")
        t = wall()
        created = {"given_name": "Amina", "registration_status": "registered"}
        await owner.send(owner.change("B1", created, pack(t), 0))
        wall.advance(10_000)
        delete = ahead.delete("B1", pack(t + 500 + 2 * YEAR_MS), pack(t))
        status = other.change("B1", {"registration_status": "suspended"}, pack(t + 2_000), pack(t))
        sends = {"D": (ahead, delete, 2 * YEAR_MS), "N": (other, status, None)}
        for key in order:
            node, change, offset = sends[key]
            await node.send(change, offset_ms=offset)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and "registration_status" not in record.data


# -- found in the fourth review (fuzzing through the store) ---------------------------------------


async def fast_and_normal(store: SQLiteHQStore, wall: FakeWall) -> tuple[Node, Node, int]:
    """A record B1 (given_name, phone) written at `t`, a node whose clock will run two years
    ahead and one whose clock is right; returns them and `t`."""
    base, fast, n = [await Node.enrol(store, x) for x in ("base", "fast", "n")]
    t = wall()
    await base.send(base.change("B1", {"given_name": "A", "phone": "0"}, pack(t), 0))
    return fast, n, t


@pytest.mark.parametrize(("order", "one_batch"), [("NF", True), ("NF", False), ("FN", True)])
async def test_a_fast_clock_is_bounded_after_its_first_write_too(
    tmp_path: Path, order: str, one_batch: bool
) -> None:
    """After its first write the fast node's parent (the record's version) is far ahead, as if it
    had seen everything; it cannot have seen an edit made later in real time."""
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        fast, n, t = await fast_and_normal(store, wall)
        skew = 2 * YEAR_MS
        f1 = fast.change("B1", {"given_name": "F"}, pack(t + 1_000 + skew), pack(t))
        f2 = fast.change("B1", {"phone": "F"}, pack(t + 2_000 + skew), pack(t + 1_000 + skew))
        n1 = n.change("B1", {"phone": "N"}, pack(t + 10_000), pack(t))
        wall.advance(60_000)
        for who in order:
            if who == "N":
                await n.send(n1)
            elif one_batch:
                await fast.send(f1, f2, offset_ms=skew)
            else:
                await fast.send(f1, offset_ms=skew)
                await fast.send(f2, offset_ms=skew)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.data["phone"] == "N"


@pytest.mark.parametrize("one_batch", [True, False])
async def test_an_owner_delete_after_its_reinstated_write_deletes_the_record(
    tmp_path: Path, one_batch: bool
) -> None:
    """HQ reinstates the owner's write over a non-owner's initial value; the owner's delete, made
    later, must still delete the record (HQ's correction is stamped just above the record)."""
    wall = FakeWall()
    async with office_store(tmp_path, wall, "registration_status") as store:
        owner, other = await owner_and_other(store)
        t = wall()
        await owner.send(owner.change("B1", {"given_name": "A"}, pack(t), 0))
        verified = owner.change("B1", {"registration_status": "verified"}, pack(t + 1_000), pack(t))
        initial = other.change(
            "B1", {"registration_status": "registered"}, pack(t + 2_000), pack(t)
        )
        delete = owner.delete("B1", pack(t + 3_000), pack(t + 1_000))
        wall.advance(60_000)
        await other.send(initial)
        if one_batch:
            await owner.send(verified, delete)
        else:
            await owner.send(verified)
            await owner.send(delete)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.deleted


@pytest.mark.parametrize("order", ["SD", "DS"])
async def test_a_delete_made_later_in_real_time_removes_a_fast_clocks_earlier_edit(
    tmp_path: Path, order: str
) -> None:
    """The fast clock's edit outranks the delete by stamp; HQ deletes the record again, counting
    with the delete's real time, and a convergent replica ends the same."""
    wall = FakeWall()
    async with opened(tmp_path, wall) as store:
        fast, n, t = await fast_and_normal(store, wall)
        skew = 2 * YEAR_MS
        edit = fast.change("B1", {"phone": "S"}, pack(t + 7_000 + skew), pack(t))
        delete = n.delete("B1", pack(t + 26_000), pack(t))
        wall.advance(60_000)
        for who in order:
            if who == "S":
                await fast.send(edit, offset_ms=skew)
            else:
                await n.send(delete)
        record = await store.get_record("beneficiaries", "B1")
        assert record is not None and record.deleted
        assert any(c.policy == "clock" for c in await store.list_conflicts(status="auto"))
