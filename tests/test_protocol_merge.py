"""Per-field merge: the state is a function of the set of changes applied, whatever the order.

Histories are small on purpose (three origins, two records, three fields, HLCs 1..6, four values) so
that equal HLCs across origins, equal values, deletes racing updates and re-deliveries are common.
Every stamp (hlc, origin) is unique, as a node's clock guarantees for its own changes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import canon, examples

from protocol.change import Change
from protocol.merge import (
    NO_STAMP,
    RecordState,
    Stamp,
    apply_change,
    concurrent_fields,
    conflict_transition,
    may_write,
    value_rank,
)

ORIGINS = ["nA", "nB", "nC"]
KEYS = ["r1", "r2"]
FIELDS = ["a", "b", "c"]
VALUES = st.sampled_from([None, 0, 1, "x"])


@st.composite
def histories(draw: st.DrawFn, max_size: int = 14) -> list[Change]:
    n = draw(st.integers(0, max_size))
    stamps = draw(
        st.lists(
            st.tuples(st.integers(1, 6), st.sampled_from(ORIGINS)),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    seqs: Counter[str] = Counter()
    history = []
    for hlc, origin in stamps:
        seqs[origin] += 1
        op = draw(st.sampled_from(["upsert", "upsert", "delete"]))
        fields = {} if op == "delete" else draw(st.dictionaries(st.sampled_from(FIELDS), VALUES))
        history.append(
            Change(
                "c",
                draw(st.sampled_from(KEYS)),
                op,  # type: ignore[arg-type]
                fields,
                hlc,
                draw(st.integers(0, hlc - 1)),
                origin,
                seqs[origin],
            )
        )
    return history


@st.composite
def deliveries(draw: st.DrawFn, history: list[Change]) -> list[Change]:
    """The history in a random order, with random re-deliveries mixed in."""
    repeats = draw(st.lists(st.sampled_from(history), max_size=6)) if history else []
    return draw(st.permutations(history + repeats))


def replay(changes: list[Change]) -> dict[str, RecordState]:
    states: dict[str, RecordState] = {}
    for change in changes:
        apply_change(states.setdefault(change.key, RecordState()), change)
    return states


def snapshot(states: dict[str, RecordState]) -> Any:
    return canon(
        {
            key: (s.values, {f: list(v) for f, v in s.stamps.items()}, list(s.tombstone))
            for key, s in states.items()
        }
    )


def oracle(history: list[Change]) -> dict[str, RecordState]:
    """The intended state, computed directly: per field the highest-stamped write, if it is above
    the highest delete's stamp."""
    out: dict[str, RecordState] = {}
    for key in {c.key for c in history}:
        mine = [c for c in history if c.key == key]
        tomb = max(((c.hlc, c.origin) for c in mine if c.op == "delete"), default=NO_STAMP)
        state = RecordState(tombstone=tomb)
        for name in FIELDS:
            writes = [c for c in mine if c.op == "upsert" and name in c.fields]
            if writes:
                best = max(writes, key=lambda c: (c.hlc, c.origin))
                if (best.hlc, best.origin) > tomb:
                    state.values[name] = best.fields[name]
                    state.stamps[name] = (best.hlc, best.origin)
        out[key] = state
    return out


def check_invariants(state: RecordState) -> None:
    assert state.values.keys() == state.stamps.keys()
    assert all(stamp > state.tombstone for stamp in state.stamps.values())
    assert state.alive == bool(state.values)
    assert state.version == max((s[0] for s in state.stamps.values()), default=state.tombstone[0])


@examples(200)
@given(data=st.data(), history=histories())
def test_convergent_in_any_order_with_any_repeats(
    data: st.DataObject, history: list[Change]
) -> None:
    """Two replicas receiving the same set in different orders, with duplicates, end identical --
    and equal to the directly computed intended state."""
    first = replay(data.draw(deliveries(history)))
    second = replay(data.draw(deliveries(history)))
    assert snapshot(first) == snapshot(second) == snapshot(oracle(history))
    for state in first.values():
        check_invariants(state)


@examples(100)
@given(history=histories(max_size=8), data=st.data())
def test_commutative(history: list[Change], data: st.DataObject) -> None:
    if len(history) < 2:
        return
    a, b = data.draw(st.sampled_from(history)), data.draw(st.sampled_from(history))
    prefix = data.draw(st.lists(st.sampled_from(history), max_size=4))
    ab, ba = replay([*prefix, a, b]), replay([*prefix, b, a])
    assert snapshot(ab) == snapshot(ba)


@examples(100)
@given(history=histories(), data=st.data())
def test_idempotent(history: list[Change], data: st.DataObject) -> None:
    """Applying a change again changes nothing and reports nothing; so does replaying everything."""
    order = data.draw(deliveries(history))
    states = replay(order)
    before = snapshot(states)
    for change in order:
        assert apply_change(states[change.key], change) is False
    assert snapshot(states) == before
    assert snapshot(replay(order + order)) == before


@examples(100)
@given(history=histories(), data=st.data())
def test_reports_visible_changes_exactly(history: list[Change], data: st.DataObject) -> None:
    """apply_change returns True exactly when the record's visible values changed."""
    states: dict[str, RecordState] = {}
    for change in data.draw(deliveries(history)):
        state = states.setdefault(change.key, RecordState())
        before = canon(dict(state.values))
        changed = apply_change(state, change)
        assert changed == (canon(state.values) != before)
        check_invariants(state)


@examples(50)
@given(history=histories())
def test_storage_round_trip(history: list[Change]) -> None:
    for state in replay(history).values():
        stored = json.loads(json.dumps(state.to_storage()))
        restored = RecordState.from_storage(*stored)
        assert snapshot({"k": restored}) == snapshot({"k": state})


def upsert(fields: dict[str, Any], hlc: int, origin: str, parent: int = 0) -> Change:
    return Change("c", "k", "upsert", fields, hlc, parent, origin, hlc)


def delete(hlc: int, origin: str, parent: int = 0) -> Change:
    return Change("c", "k", "delete", {}, hlc, parent, origin, hlc)


def state_after(*changes: Change) -> RecordState:
    state = RecordState()
    for change in changes:
        apply_change(state, change)
    return state


@pytest.mark.parametrize(("low", "high"), [("nA", "nB"), ("n1", "na"), ("", "n")])
def test_equal_hlc_is_won_by_the_higher_node_id(low: str, high: str) -> None:
    one, two = upsert({"a": "low"}, 5, low), upsert({"a": "high"}, 5, high)
    assert state_after(one, two).values == state_after(two, one).values == {"a": "high"}
    assert state_after(one, two).stamps == {"a": (5, high)}


def test_delete_at_the_same_stamp_beats_the_upsert() -> None:
    assert not state_after(upsert({"a": 1}, 5, "nA"), delete(5, "nA")).alive
    assert not state_after(delete(5, "nA"), upsert({"a": 1}, 5, "nA")).alive


def test_later_write_resurrects_only_the_fields_it_writes() -> None:
    state = state_after(
        upsert({"a": 1, "b": 2}, 3, "nA"), delete(4, "nB"), upsert({"b": 9}, 5, "nC")
    )
    assert state.values == {"b": 9}
    assert state.tombstone == (4, "nB")
    assert state.version == 5


def test_delete_keeps_fields_written_after_it() -> None:
    state = state_after(upsert({"a": 1}, 3, "nA"), upsert({"b": 2}, 6, "nA"), delete(4, "nB"))
    assert state.values == {"b": 2}


def test_version_of_a_deleted_record_is_its_tombstone() -> None:
    assert state_after(upsert({"a": 1}, 3, "nA"), delete(4, "nB")).version == 4
    assert RecordState().version == 0
    assert not RecordState().alive


# -- concurrent_fields ---------------------------------------------------------------------------


@examples(75)
@given(history=histories(), probe=histories(max_size=1))
def test_concurrent_fields_definition(history: list[Change], probe: list[Change]) -> None:
    """Written by the change, held by the record, stamped after the writer's parent by another node;
    or every field of an update when another node deleted the record after the writer's parent."""
    if not probe:
        return
    (change,) = probe
    state = replay(history).get(change.key, RecordState())
    tomb_hlc, tomb_origin = state.tombstone
    if change.op == "upsert" and tomb_hlc > change.parent and tomb_origin != change.origin:
        assert concurrent_fields(state, change) == list(change.fields)
        return
    expected = [
        name
        for name in change.fields
        if name in state.stamps
        and state.stamps[name][0] > change.parent
        and state.stamps[name][1] != change.origin
    ]
    assert concurrent_fields(state, change) == expected


def test_writer_who_saw_the_current_version_is_not_concurrent() -> None:
    state = state_after(upsert({"a": 1, "b": 2}, 3, "nA"), upsert({"b": 3}, 5, "nB"))
    assert concurrent_fields(state, upsert({"a": 7, "b": 7}, 9, "nC", parent=state.version)) == []


def test_concurrent_write_by_another_node_is_reported_per_field() -> None:
    state = state_after(upsert({"a": 1, "b": 2}, 3, "nA"), upsert({"b": 3}, 5, "nB"))
    change = upsert({"a": 7, "b": 7, "c": 7}, 6, "nC", parent=3)
    assert concurrent_fields(state, change) == ["b"]  # a: seen; c: nobody else wrote it


def test_own_later_writes_are_not_concurrent() -> None:
    state = state_after(upsert({"a": 1}, 5, "nA"))
    assert concurrent_fields(state, upsert({"a": 2}, 4, "nA", parent=0)) == []


def test_equal_values_are_still_reported() -> None:
    """Documented: concurrent_fields does not compare values; a policy drops equal-value ones."""
    state = state_after(upsert({"a": 1}, 5, "nB"))
    assert concurrent_fields(state, upsert({"a": 1}, 6, "nA", parent=2)) == ["a"]


def test_update_concurrent_with_a_delete_is_reported() -> None:
    state = state_after(upsert({"a": 1}, 3, "nA"), delete(5, "nB", parent=3))
    assert concurrent_fields(state, upsert({"a": 2}, 6, "nC", parent=3)) == ["a"]


def test_same_stamp_from_one_origin_converges() -> None:
    one = Change("c", "k", "upsert", {"a": 1}, 5, 0, "nA", 1)
    two = Change("c", "k", "upsert", {"a": 2}, 5, 0, "nA", 2)
    assert state_after(one, two).values == state_after(two, one).values


def test_same_stamp_ties_break_on_the_value_type_too() -> None:
    """True == 1 in Python, but they are different values (JSON and msgpack keep them apart)."""
    one = Change("c", "k", "upsert", {"a": 1, "b": {"x": 1, "y": 2}}, 5, 0, "nA", 1)
    two = Change("c", "k", "upsert", {"a": True, "b": {"y": 2, "x": 1}}, 5, 0, "nA", 2)
    ab, ba = state_after(one, two), state_after(two, one)
    assert canon(ab.values) == canon(ba.values)
    assert value_rank({"x": 1, "y": 2}) == value_rank({"y": 2, "x": 1})


def test_a_delete_wins_a_stamp_tie_with_an_upsert() -> None:
    up = Change("c", "k", "upsert", {"a": 1}, 5, 0, "nA", 1)
    down = Change("c", "k", "delete", {}, 5, 0, "nA", 2)
    for order in ((up, down), (down, up)):
        state = state_after(*order)
        assert (state.alive, state.tombstone) == (False, (5, "nA"))


@st.composite
def reissued_histories(draw: st.DrawFn) -> list[Change]:
    """Histories where one origin reissued stamps (a node restored from an old backup): stamps
    repeat with other ops and values, each change with its own sequence."""
    history = draw(histories(max_size=10))
    again = draw(st.lists(st.sampled_from(history), max_size=5)) if history else []
    seqs = Counter(c.origin for c in history)
    for old in again:
        seqs[old.origin] += 1
        op = draw(st.sampled_from(["upsert", "upsert", "delete"]))
        fields = {} if op == "delete" else draw(st.dictionaries(st.sampled_from(FIELDS), TIES))
        history.append(replace(old, op=op, fields=fields, seq=seqs[old.origin]))  # type: ignore[arg-type]
    return history


TIES = st.sampled_from([None, 0, 1, True, 1.0, "x", [1], {"k": 1}])


def tie_oracle(history: list[Change]) -> dict[str, RecordState]:
    """As `oracle`, with the documented total order: per field the highest (stamp, value_rank)."""
    out: dict[str, RecordState] = {}
    for key in {c.key for c in history}:
        mine = [c for c in history if c.key == key]
        tomb = max(((c.hlc, c.origin) for c in mine if c.op == "delete"), default=NO_STAMP)
        state = RecordState(tombstone=tomb)
        for name in FIELDS:
            writes = [
                ((c.hlc, c.origin), value_rank(c.fields[name]), c.fields[name])
                for c in mine
                if c.op == "upsert" and name in c.fields
            ]
            if writes:
                best_stamp, _, best = max(writes, key=lambda w: (w[0], w[1]))
                if best_stamp > tomb:
                    state.values[name] = best
                    state.stamps[name] = best_stamp
        out[key] = state
    return out


@examples(200)
@given(data=st.data(), history=reissued_histories())
def test_reissued_stamps_converge_in_any_order(data: st.DataObject, history: list[Change]) -> None:
    first = replay(data.draw(deliveries(history)))
    second = replay(data.draw(deliveries(history)))
    assert snapshot(first) == snapshot(second) == snapshot(tie_oracle(history))
    for state in first.values():
        check_invariants(state)
    first_review = replay_review(data.draw(deliveries(history)))
    second_review = replay_review(data.draw(deliveries(history)))
    assert review_snapshot(first_review) == review_snapshot(second_review)
    assert snapshot(first_review) == snapshot(first)
    for key, state in first_review.items():
        for heads in state.heads.values():
            # Stored in one order, and the visible value is the first head's.
            ranked = [(h.stamp, value_rank(h.value)) for h in heads]
            assert ranked == sorted(ranked, reverse=True)
        for name, heads in state.heads.items():
            assert canon(state.values.get(name)) == canon(heads[0].value), (key, name)


def stamp(state: RecordState, name: str) -> Stamp:
    return state.stamps.get(name, NO_STAMP)


def test_stamps_only_move_up() -> None:
    state = state_after(upsert({"a": 1}, 5, "nB"))
    apply_change(state, upsert({"a": 2}, 4, "nC"))
    apply_change(state, upsert({"a": 3}, 5, "nA"))
    assert (state.values["a"], stamp(state, "a")) == (1, (5, "nB"))


# -- review: heads and conflicts -----------------------------------------------------------------

REVIEW = frozenset({"a", "b"})


def replay_review(changes: list[Change]) -> dict[str, RecordState]:
    states: dict[str, RecordState] = {}
    for change in changes:
        apply_change(states.setdefault(change.key, RecordState()), change, REVIEW)
    return states


def review_snapshot(states: dict[str, RecordState]) -> Any:
    return canon(
        {
            key: (
                snapshot({key: s}),
                {f: sorted(canon(list(h)) for h in heads) for f, heads in s.heads.items()},
                sorted(s.conflicts()),
            )
            for key, s in states.items()
        }
    )


def heads_oracle(history: list[Change]) -> dict[str, dict[str, set[tuple[int, str]]]]:
    """Per record and review field: the live writes no other live write has seen, computed from
    the definition (a write is live when its stamp is above the record's highest delete)."""
    out: dict[str, dict[str, set[tuple[int, str]]]] = {}
    for key in {c.key for c in history}:
        mine = [c for c in history if c.key == key]
        tomb = max(((c.hlc, c.origin) for c in mine if c.op == "delete"), default=NO_STAMP)
        for name in sorted(REVIEW):
            live = [
                c
                for c in mine
                if c.op == "upsert" and name in c.fields and (c.hlc, c.origin) > tomb
            ]
            heads = {(c.hlc, c.origin) for c in live if not any(o.parent >= c.hlc for o in live)}
            if heads:
                out.setdefault(key, {})[name] = heads
    return out


@examples(200)
@given(data=st.data(), history=histories())
def test_review_heads_converge_and_match_their_definition(
    data: st.DataObject, history: list[Change]
) -> None:
    first = replay_review(data.draw(deliveries(history)))
    second = replay_review(data.draw(deliveries(history)))
    assert review_snapshot(first) == review_snapshot(second)
    # Values are lww whatever the policy: the same as without review.
    assert snapshot(first) == snapshot(oracle(history))
    got = {
        key: {f: {h.stamp for h in heads} for f, heads in s.heads.items()}
        for key, s in first.items()
        if s.heads
    }
    assert got == heads_oracle(history)
    for state in first.values():
        for heads in state.heads.values():
            # The visible value is always one of the heads: the highest stamp.
            assert heads[0].stamp == max(h.stamp for h in heads)


@examples(150)
@given(data=st.data(), history=histories())
def test_review_conflicts_are_queued_exactly_once_whatever_the_order(
    data: st.DataObject, history: list[Change]
) -> None:
    """HQ's queue, simulated with `conflict_transition`: whatever the arrival order (with
    re-deliveries), every field whose heads disagree at the end has exactly one open entry, and no
    other field has one."""

    def queue(order: list[Change]) -> dict[tuple[str, str], int]:
        states: dict[str, RecordState] = {}
        opened: Counter[tuple[str, str]] = Counter()
        for change in order:
            state = states.setdefault(change.key, RecordState())
            before = {f: state.conflict(f) for f in REVIEW}
            apply_change(state, change, REVIEW)
            for name in REVIEW:
                step = conflict_transition(before[name], state.conflict(name))
                if step == "opened":
                    assert opened[(change.key, name)] == 0, "opened twice"
                    opened[(change.key, name)] += 1
                elif step == "closed":
                    opened[(change.key, name)] -= 1
        return {k: v for k, v in opened.items() if v}

    one = queue(data.draw(deliveries(history)))
    two = queue(data.draw(deliveries(history)))
    expected = {
        (key, name): 1 for key, s in replay_review(history).items() for name in s.conflicts()
    }
    assert one == two == expected


def test_concurrent_review_writes_with_different_values_conflict_both_ways() -> None:
    base = upsert({"a": 4}, 1, "nA")
    left, right = upsert({"a": 5}, 3, "nA", parent=1), upsert({"a": 6}, 4, "nB", parent=1)
    for order in ([base, left, right], [base, right, left], [right, left, base]):
        state = RecordState()
        for change in order:
            apply_change(state, change, REVIEW)
        assert state.values == {"a": 6}  # provisional: the highest stamp, the same everywhere
        conflict = state.conflict("a")
        assert conflict is not None and [h.value for h in conflict] == [6, 5]


def test_equal_values_converge_without_a_conflict() -> None:
    state = RecordState()
    for change in (upsert({"a": 5}, 3, "nA", 1), upsert({"a": 5}, 4, "nB", 1)):
        apply_change(state, change, REVIEW)
    assert state.conflict("a") is None


def test_a_write_that_saw_both_heads_resolves_the_conflict() -> None:
    state = RecordState()
    for change in (upsert({"a": 5}, 3, "nA", 1), upsert({"a": 6}, 4, "nB", 1)):
        apply_change(state, change, REVIEW)
    apply_change(state, upsert({"a": 5}, 7, "hq", parent=state.version), REVIEW)
    assert state.conflict("a") is None and state.values == {"a": 5}
    # A late copy of a side the resolution had seen changes nothing.
    apply_change(state, upsert({"a": 6}, 4, "nB", 1), REVIEW)
    assert state.conflict("a") is None and state.values == {"a": 5}


def test_a_write_that_saw_only_one_side_keeps_the_conflict_open() -> None:
    state = RecordState()
    for change in (upsert({"a": 5}, 3, "nA", 1), upsert({"a": 6}, 6, "nB", 1)):
        apply_change(state, change, REVIEW)
    apply_change(state, upsert({"a": 7}, 8, "nA", parent=3), REVIEW)
    conflict = state.conflict("a")
    assert conflict is not None and sorted(h.value for h in conflict) == [6, 7]


def test_heads_survive_storage() -> None:
    state = RecordState()
    for change in (upsert({"a": 5}, 3, "nA", 1), upsert({"a": {"x": [1]}}, 4, "nB", 1)):
        apply_change(state, change, REVIEW)
    stored = json.loads(json.dumps([*state.to_storage(), state.heads_to_storage()]))
    assert RecordState.from_storage(*stored) == state


@pytest.mark.parametrize(
    ("owner", "writer", "creating", "allowed"),
    [
        ("hq:case-management", {"group:kakuma"}, False, False),
        ("hq:case-management", {"hq:case-management"}, False, True),
        ("group:kakuma", {"group:kakuma", "group:north"}, False, True),
        ("group:kakuma", {"group:north"}, True, True),  # the initial value of a new record
        (None, set(), False, True),
    ],
)
def test_may_write(owner: str | None, writer: set[str], creating: bool, allowed: bool) -> None:
    assert may_write(owner, writer, creating=creating) is allowed


def test_policies_follow_a_renamed_field_to_its_wire_name() -> None:
    from protocol.collections import collections_from_dict
    from protocol.merge import field_policies

    config = collections_from_dict(
        {
            "collections": {
                "people": {
                    "key": "id",
                    "fields": {
                        "id": {"type": "string"},
                        "size": {"type": "integer", "policy": "review"},
                        "status": {"type": "string", "policy": "source_of_truth", "owner": "hq:x"},
                    },
                    "transform": {"rename": {"size": "household_size"}},
                }
            }
        }
    )
    policies = field_policies(config)["people"]
    assert policies.review == frozenset({"household_size"})
    assert policies.owners == {"status": "hq:x"}


@pytest.mark.xfail(
    strict=True,
    reason="parent is the record's version, not the field's: a writer who saw a later write to "
    "another field counts as having seen a concurrent write to the review field",
)
def test_review_conflict_hidden_by_a_write_to_another_field() -> None:
    state = RecordState()
    changes = (
        upsert({"a": 4, "c": "x"}, 1, "nA"),
        upsert({"a": 5}, 10, "nB", parent=1),  # b edits the review field
        upsert({"c": "y"}, 20, "nC", parent=1),  # c edits another field
        upsert({"a": 6}, 30, "nA", parent=20),  # a saw c's write, never b's
    )
    for change in changes:
        apply_change(state, change, REVIEW)
    assert state.conflict("a") is not None
