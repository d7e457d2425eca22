"""HQ's side of the conflict rules: what applying one change means for the conflict queue, and
which corrections HQ must author so that every replica ends up where the policies say.

Merging stays the pure, convergent `protocol.merge.apply_change`; this module only *observes*
each merge (before/after) and answers with:

- queue events: a `review` field's conflict opened, updated (new heads) or closed; an `lww` loser
  logged as auto-resolved;
- corrections: field values HQ writes back as a change of its own, which every replica applies like
  any other change. Two situations need one:
  * `source_of_truth`: a node outside the owner wrote the field of an existing record (its agent
    should have refused it) -- HQ restores the value it replaced;
  * clock bounding: a change stamped far in HQ's future won a field over a write that was made
    *later* in real time, or a change lost to such a stamp although it is the later edit -- HQ
    writes the later edit's value again. A stamp's real time is estimated from the node's clock
    offset (its batch's sealing time against HQ's clock), so one wrong laptop clock cannot win every
    last-writer-wins contest for the next two years.

Corrections are ordinary changes authored by HQ, so convergence holds: nothing is rewritten.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.change import Change, Op
from protocol.hlc import physical_ms
from protocol.merge import (
    NO_POLICIES,
    NO_STAMP,
    FieldPolicies,
    Head,
    RecordState,
    Stamp,
    apply_change,
    concurrent_fields,
    conflict_transition,
    may_write,
    value_rank,
)


@dataclass(frozen=True, slots=True)
class Side:
    """One side of a conflict: a value and who wrote it when."""

    value: Any
    hlc: int
    origin: str
    parent: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"value": self.value, "hlc": self.hlc, "origin": self.origin}
        if self.parent is not None:
            out["parent"] = self.parent
        return out

    @classmethod
    def of_head(cls, head: Head) -> Side:
        return cls(head.value, head.hlc, head.origin, head.parent)


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """What a change did to the conflict queue for one field.

    kind: "opened" | "updated" | "closed" (review), or "auto" (logged, already settled: lww
    losers, refused source_of_truth writes, clock-bounded stamps).
    """

    kind: str
    field: str
    policy: str
    sides: tuple[Side, ...]  # review: the heads; auto: (winner, loser)
    note: str = ""


@dataclass(slots=True)
class Correction:
    """Field values HQ writes back as a change of its own. The change stands for the write whose
    values it restores (`stands_for`, already resolved through earlier stand-ins; NO_STAMP for a
    non-owner's initial value) and carries that write's real time: later comparisons (owner
    writes, wrong clocks) are made against that write, not against HQ's stamp."""

    fields: dict[str, Any]
    stands_for: Stamp
    real_ms: int
    # "delete": HQ deletes the record again, for a delete that was made later in real time than
    # a fast clock's edit that outranks it; fields written later still are then written again.
    op: Op = "upsert"


@dataclass(slots=True)
class Verdict:
    events: list[QueueEvent] = field(default_factory=list)
    # One per restored write: a change stands for one write, so fields restored from different
    # writes go in different changes.
    corrections: list[Correction] = field(default_factory=list)
    skewed: int | None = None  # the change's estimated real time (ms) when its stamp is skewed
    real_ms: int | None = None  # a correction's real time: that of the write it restores
    # Stamps that count as another for source_of_truth from now on (kept by the store): a
    # non-owner's initial value counts as NO_STAMP, so any owner write outranks it.
    stand_ins: list[tuple[Stamp, str, Stamp]] = field(default_factory=list)

    def restore(self, name: str, value: Any, stands_for: Stamp, real_ms: int) -> None:
        for correction in self.corrections:
            if correction.stands_for == stands_for:
                correction.fields[name] = value
                return
        self.corrections.append(Correction({name: value}, stands_for, real_ms))


@dataclass(frozen=True, slots=True)
class Writer:
    """Who wrote a change: a node with its groups, or HQ itself (`hq`: may write anything).

    For HQ's corrections, `stands_for` is the write the correction restores and `real_ms` its real
    time: a correction is stamped above the record's version, which may be far ahead."""

    principals: frozenset[str] = frozenset()
    hq: bool = False
    clock_offset_ms: int | None = None  # the node's clock minus HQ's, from this batch
    stands_for: Stamp | None = None
    real_ms: int | None = None


HQ_WRITER = Writer(hq=True)


class Judge:
    """Applies changes to record states under the collections' policies (see the module doc).

    `now_ms` is HQ's wall clock for this ingest; `max_ahead_ms` the configured bound
    (hq.max_clock_ahead_s); `skewed_time` maps a stamp already known as skewed to its estimated
    real time, and `stand_ins` maps (stamp, field) of an HQ correction to the stamp of the write
    it    restored (the store keeps both).
    """

    def __init__(
        self,
        policies: Mapping[str, FieldPolicies],
        *,
        now_ms: int,
        max_ahead_ms: int,
        skewed_time: Mapping[Stamp, int],
        stand_ins: Mapping[tuple[Stamp, str], Stamp] | None = None,
    ) -> None:
        self.policies = policies
        self.now_ms = now_ms
        self.max_ahead_ms = max_ahead_ms
        self.skewed_time = dict(skewed_time)
        self.stand_ins = dict(stand_ins or {})

    def is_skewed(self, hlc: int) -> bool:
        return physical_ms(hlc) > self.now_ms + self.max_ahead_ms

    def real_time(self, stamp: Stamp) -> int:
        """Best estimate of when a write was made, in HQ's clock (ms)."""
        known = self.skewed_time.get(stamp)
        return known if known is not None else physical_ms(stamp[0])

    def effective(self, stamp: Stamp, name: str) -> Stamp:
        """The stamp a write counts with for source_of_truth: an HQ correction counts as the
        write it restored, a non-owner's initial value as nothing."""
        return self.stand_ins.get((stamp, name), stamp)

    def _stand_in(self, verdict: Verdict, stamp: Stamp, name: str, counts_as: Stamp) -> None:
        self.stand_ins[(stamp, name)] = counts_as
        verdict.stand_ins.append((stamp, name, counts_as))

    def apply(self, state: RecordState, change: Change, writer: Writer) -> Verdict:
        rules = self.policies.get(change.collection, NO_POLICIES)
        verdict = Verdict()
        stamp: Stamp = (change.hlc, change.origin)
        if writer.stands_for is not None:
            for name in change.fields:
                self._stand_in(verdict, stamp, name, writer.stands_for)
        if writer.hq and writer.real_ms is not None:
            # A correction counts with the real time of the write it restores, not HQ's clock,
            # wherever its stamp is.
            self.skewed_time[stamp] = verdict.real_ms = verdict.skewed = writer.real_ms
        elif self.is_skewed(change.hlc):
            if writer.hq:
                estimate = self.now_ms
            else:
                estimate = physical_ms(change.hlc) - max(0, writer.clock_offset_ms or 0)
            verdict.skewed = min(self.now_ms, max(0, estimate))
            self.skewed_time[stamp] = verdict.skewed
        if rules.append_only:
            apply_change(state, change, rules.review)
            return verdict
        if change.op == "delete":
            self._delete(state, change, rules, writer, verdict)
            return verdict
        if stamp <= state.tombstone:
            self._dead_on_arrival(state, change, rules, writer, verdict)
            return verdict
        tomb = state.tombstone
        if (
            verdict.skewed is not None
            and not writer.hq
            and tomb != NO_STAMP
            and self.real_time(tomb) > verdict.skewed
        ):
            # Stamped above a delete made later in real time: the edit must not revive the
            # record. It is applied (replicas converge), then HQ deletes the record again.
            apply_change(state, change, rules.review)
            self._delete_again(change, tomb, verdict)
            return verdict
        concurrent = set(concurrent_fields(state, change))
        if verdict.skewed is not None and not writer.hq:
            # A node whose clock runs ahead declares a parent far ahead too, which would make it
            # look as if it had seen everything; it cannot have seen a write made later in real
            # time. (Not for HQ's own changes, or its corrections would fight each other.)
            concurrent.update(
                name
                for name in change.fields
                if name in state.stamps and self.real_time(state.stamps[name]) > verdict.skewed
            )
        previous = {
            name: (state.values.get(name), state.stamps.get(name, NO_STAMP))
            for name in change.fields
        }
        before_heads = {f: state.conflict(f) for f in rules.review if f in change.fields}
        apply_change(state, change, rules.review)
        self._review_events(state, before_heads, verdict)
        for name, value in change.fields.items():
            old_value, old_stamp = previous[name]
            # On a stamp tie (one origin reissued a stamp) the stamp alone does not say who won.
            won = state.stamps.get(name) == stamp and (
                old_stamp != stamp or value_rank(state.values[name]) == value_rank(value)
            )
            policy = rules.policy(name)
            if policy == "source_of_truth" and not writer.hq:
                # "Creating": the field holds no value here yet (a registration carries its
                # initial status); a non-owner never replaces a value HQ holds.
                owner = may_write(rules.owners[name], writer.principals, creating=False)
                if not owner and old_stamp == NO_STAMP:
                    if won:  # the initial value: allowed, but any owner write outranks it
                        self._stand_in(verdict, stamp, name, NO_STAMP)
                    continue
                if not owner:
                    if won and old_value == value:
                        # Rewrote the value already there: it counts as the write it replaced.
                        self._stand_in(verdict, stamp, name, self.effective(old_stamp, name))
                    elif won:
                        verdict.restore(
                            name,
                            old_value,
                            self.effective(old_stamp, name),
                            self.real_time(old_stamp),
                        )
                        note = (
                            f"only {rules.owners[name]} writes this field: the write was reverted"
                        )
                        sides = (Side(old_value, *old_stamp), Side(value, *stamp))
                        verdict.events.append(QueueEvent("auto", name, policy, sides, note))
                    continue
                current = state.stamps[name]
                if (
                    not won
                    and stamp > self.effective(current, name)
                    and state.values[name] == value
                ):
                    # Outranked by a stand-in holding the same value: that value is now the
                    # owner's, as of this write.
                    self._stand_in(verdict, current, name, stamp)
                    continue
                if not won and stamp > self.effective(current, name):
                    # An owner's write outranked only by HQ's revert of an older value, or by a
                    # non-owner's initial value: the owner's write stands.
                    verdict.restore(name, value, stamp, self.real_time(stamp))
                    note = "an owner's write was outranked by a non-owner's value: reinstated"
                    sides = (Side(value, *stamp), Side(state.values[name], *current))
                    verdict.events.append(QueueEvent("auto", name, policy, sides, note))
                    continue
            if name not in concurrent or old_stamp == NO_STAMP:
                continue
            if policy == "review":
                continue  # the heads decide, and a person; never corrected behind their back
            current_value = state.values.get(name)
            if won and old_value != value:
                was = self.real_time(self.effective(old_stamp, name))
                if verdict.skewed is not None and self.real_time(stamp) < was:
                    verdict.restore(name, old_value, self.effective(old_stamp, name), was)
                    note = "stamped ahead by a wrong clock; the later edit was restored"
                    winner, loser = Side(old_value, *old_stamp), Side(value, *stamp)
                    verdict.events.append(QueueEvent("auto", name, "clock", (winner, loser), note))
                elif policy == "lww":
                    sides = (Side(value, *stamp), Side(old_value, *old_stamp))
                    verdict.events.append(QueueEvent("auto", name, policy, sides))
            elif not won and current_value != value:
                current = state.stamps[name]
                counts_as = self.effective(current, name)
                if (
                    current in self.skewed_time or counts_as in self.skewed_time
                ) and self.real_time(counts_as) < self.real_time(stamp):
                    verdict.restore(name, value, self.effective(stamp, name), self.real_time(stamp))
                    note = "the winning stamp came from a wrong clock; the later edit was restored"
                    winner, loser = Side(value, *stamp), Side(current_value, *current)
                    verdict.events.append(QueueEvent("auto", name, "clock", (winner, loser), note))
                elif policy == "lww":
                    sides = (Side(current_value, *current), Side(value, *stamp))
                    verdict.events.append(QueueEvent("auto", name, policy, sides))
        return verdict

    def _delete(
        self,
        state: RecordState,
        change: Change,
        rules: FieldPolicies,
        writer: Writer,
        verdict: Verdict,
    ) -> None:
        """A delete; one stamped ahead by a wrong clock does not remove edits made later in
        real time: HQ writes them again (lww between deletes and updates, by real time)."""
        before = {name: (state.values[name], state.stamps[name]) for name in state.stamps}
        before_heads = {f: state.conflict(f) for f in state.heads}
        apply_change(state, change, rules.review)
        self._review_events(state, before_heads, verdict)
        if verdict.skewed is None:
            if writer.hq:
                return
            outranking = [
                s for s in state.stamps.values() if s in self.skewed_time and s[1] != change.origin
            ]
            if any(self.real_time(s) < physical_ms(change.hlc) for s in outranking):
                # A fast clock's edit, made before this delete in real time, outranks it.
                self._delete_again(change, (change.hlc, change.origin), verdict)
            return
        for name, (value, stamp) in before.items():
            if name not in state.stamps and self.real_time(stamp) > verdict.skewed:
                verdict.restore(name, value, self.effective(stamp, name), self.real_time(stamp))
        if verdict.corrections:
            note = "a delete stamped ahead by a wrong clock; the later edits were restored"
            sides = (Side(None, change.hlc, change.origin),)
            verdict.events.append(QueueEvent("auto", "*", "clock", sides, note))

    def _delete_again(self, change: Change, delete: Stamp, verdict: Verdict) -> None:
        """HQ deletes the record again, counting with `delete`'s real time: its own delete is
        stamped above everything, so the edits made later in real time than `delete` are then
        written again (the skewed-delete rule in `_delete`)."""
        verdict.corrections.append(Correction({}, delete, self.real_time(delete), op="delete"))
        note = "an edit from a wrong clock outranked a later delete: deleted again"
        sides = (Side(None, *delete), Side(None, change.hlc, change.origin))
        verdict.events.append(QueueEvent("auto", "*", "clock", sides, note))

    def _dead_on_arrival(
        self,
        state: RecordState,
        change: Change,
        rules: FieldPolicies,
        writer: Writer,
        verdict: Verdict,
    ) -> None:
        """An upsert at or below the record's tombstone: dead -- unless the tombstone came from a
        wrong clock and the upsert was made later in real time; then HQ writes it again."""
        tomb = state.tombstone
        stamp: Stamp = (change.hlc, change.origin)
        if tomb not in self.skewed_time or self.real_time(stamp) <= self.real_time(tomb):
            return
        for name, value in change.fields.items():
            owner = rules.owners.get(name)
            if owner and not writer.hq and not may_write(owner, writer.principals, creating=False):
                continue  # a non-owner's write to an owned field is not brought back
            verdict.restore(name, value, stamp, self.real_time(stamp))
        if verdict.corrections:
            note = "an edit made after a delete stamped ahead by a wrong clock: restored"
            sides = (Side(None, *tomb),)
            verdict.events.append(QueueEvent("auto", "*", "clock", sides, note))

    @staticmethod
    def _review_events(
        state: RecordState, before: Mapping[str, list[Head] | None], verdict: Verdict
    ) -> None:
        for name, was in before.items():
            now = state.conflict(name)
            step = conflict_transition(was, now)
            if step is not None:
                heads = now if now is not None else state.heads.get(name, [])
                verdict.events.append(
                    QueueEvent(step, name, "review", tuple(Side.of_head(h) for h in heads))
                )


def skew_candidates(states: Collection[RecordState], now_ms: int, max_ahead_ms: int) -> set[Stamp]:
    """Stamps in `states` beyond HQ's clock bound: the only ones that can be skewed (the store
    looks these up before judging)."""
    limit = now_ms + max_ahead_ms
    return {
        stamp
        for state in states
        for stamp in (*state.stamps.values(), state.tombstone)
        if physical_ms(stamp[0]) > limit
    }
