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

from protocol.change import Change
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
class Verdict:
    events: list[QueueEvent] = field(default_factory=list)
    corrections: dict[str, Any] = field(default_factory=dict)  # field -> value HQ writes back
    skewed: int | None = None  # the change's estimated real time (ms) when its stamp is skewed


@dataclass(frozen=True, slots=True)
class Writer:
    """Who wrote a change: a node with its groups, or HQ itself (`hq`: may write anything)."""

    principals: frozenset[str] = frozenset()
    hq: bool = False
    clock_offset_ms: int | None = None  # the node's clock minus HQ's, from this batch


HQ_WRITER = Writer(hq=True)


class Judge:
    """Applies changes to record states under the collections' policies (see the module doc).

    `now_ms` is HQ's wall clock for this ingest; `max_ahead_ms` the configured bound
    (hq.max_clock_ahead_s); `skewed_time` maps a stamp already known as skewed to its estimated
    real time (the store keeps them).
    """

    def __init__(
        self,
        policies: Mapping[str, FieldPolicies],
        *,
        now_ms: int,
        max_ahead_ms: int,
        skewed_time: Mapping[Stamp, int],
    ) -> None:
        self.policies = policies
        self.now_ms = now_ms
        self.max_ahead_ms = max_ahead_ms
        self.skewed_time = dict(skewed_time)

    def is_skewed(self, hlc: int) -> bool:
        return physical_ms(hlc) > self.now_ms + self.max_ahead_ms

    def real_time(self, stamp: Stamp) -> int:
        """Best estimate of when a write was made, in HQ's clock (ms)."""
        known = self.skewed_time.get(stamp)
        return known if known is not None else physical_ms(stamp[0])

    def apply(self, state: RecordState, change: Change, writer: Writer) -> Verdict:
        rules = self.policies.get(change.collection, NO_POLICIES)
        verdict = Verdict()
        stamp: Stamp = (change.hlc, change.origin)
        if self.is_skewed(change.hlc):
            offset = writer.clock_offset_ms or 0
            estimate = physical_ms(change.hlc) - max(0, offset) if not writer.hq else self.now_ms
            verdict.skewed = min(self.now_ms, max(0, estimate))
            self.skewed_time[stamp] = verdict.skewed
        if rules.append_only or change.op == "delete":
            before_heads = {f: state.conflict(f) for f in state.heads}
            apply_change(state, change, rules.review)
            self._review_events(state, before_heads, rules, verdict)
            return verdict
        concurrent = set(concurrent_fields(state, change))
        previous = {
            name: (state.values.get(name), state.stamps.get(name, NO_STAMP))
            for name in change.fields
        }
        before_heads = {f: state.conflict(f) for f in rules.review if f in change.fields}
        apply_change(state, change, rules.review)
        self._review_events(state, before_heads, rules, verdict)
        creating = change.parent == 0
        for name, value in change.fields.items():
            old_value, old_stamp = previous[name]
            won = state.stamps.get(name) == stamp
            policy = rules.policy(name)
            if (
                policy == "source_of_truth"
                and won
                and not writer.hq
                and not may_write(rules.owners[name], writer.principals, creating=creating)
                and old_value != value
            ):
                verdict.corrections[name] = old_value
                verdict.events.append(
                    QueueEvent(
                        "auto",
                        name,
                        policy,
                        (Side(old_value, *old_stamp), Side(value, *stamp)),
                        f"only {rules.owners[name]} writes this field: the write was reverted",
                    )
                )
                continue
            if name not in concurrent or old_stamp == NO_STAMP:
                continue
            if policy == "review":
                continue  # the heads decide, and a person; never corrected behind their back
            current_value = state.values.get(name)
            if won and old_value != value:
                if self.real_time(stamp) < self.real_time(old_stamp) and verdict.skewed is not None:
                    verdict.corrections[name] = old_value
                    note = "stamped ahead by a wrong clock; the later edit was restored"
                    winner, loser = Side(old_value, *old_stamp), Side(value, *stamp)
                    verdict.events.append(QueueEvent("auto", name, "clock", (winner, loser), note))
                elif policy == "lww":
                    verdict.events.append(
                        QueueEvent(
                            "auto", name, policy, (Side(value, *stamp), Side(old_value, *old_stamp))
                        )
                    )
            elif not won and current_value != value:
                current = state.stamps[name]
                if self.real_time(current) < self.real_time(stamp) and current in self.skewed_time:
                    verdict.corrections[name] = value
                    note = "the winning stamp came from a wrong clock; the later edit was restored"
                    winner, loser = Side(value, *stamp), Side(current_value, *current)
                    verdict.events.append(QueueEvent("auto", name, "clock", (winner, loser), note))
                elif policy == "lww":
                    verdict.events.append(
                        QueueEvent(
                            "auto",
                            name,
                            policy,
                            (Side(current_value, *current), Side(value, *stamp)),
                        )
                    )
        return verdict

    @staticmethod
    def _review_events(
        state: RecordState,
        before: Mapping[str, list[Head] | None],
        rules: FieldPolicies,
        verdict: Verdict,
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
        for stamp in state.stamps.values()
        if physical_ms(stamp[0]) > limit
    }
