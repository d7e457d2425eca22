"""The history checker: pure functions from what was written and what HQ and the sinks hold to a
verdict. No I/O here, so tests/test_torture.py can feed it histories with known defects and make
sure it reports them (a checker that cannot fail proves nothing).

What counts as what (the table `format_table` prints):

    acknowledged   writes the agents answered 2xx
    lost           an acknowledged write that is not in HQ's change log (an upsert is looked up by
                   its unique write id, wherever it is numbered; a delete by its change id, then by
                   any delete of its key from its node)
    duplicated     one change id twice in the change log, or one write (write id; a delete: one
                   more delete of a key than writes of that delete could explain) applied twice
    unexpected     a change or an HQ record that no write explains: unknown write id, a refused
                   write applied, a change from an origin that is not a torture agent, a key no
                   one wrote
    wrong final    a key whose value at HQ is not what its writes allow: the last acknowledged
                   write, or an indeterminate one issued after it (a late one: at any time);
                   absent only if no write of the key was acknowledged; fields compared whole
    sink ...       per route: delivered (distinct idempotency keys), lost (a change in the log the
                   route reads that never reached the sink; an upsert deleted later in the log may
                   be skipped: the router routes the delete instead), repeats (deliveries beyond the first
                   per idempotency key), unexpected keys, and wrong final (the last delivery of a
                   key, by change_seq, disagrees with HQ's final record)

Sink repeats fail the run only for sinks that promise to deduplicate themselves (`strict`): the
files sink skips keys it has written, even across a crash. A webhook is at least once by contract
(docs: the receiver deduplicates on Idempotency-Key), so its repeats are counted and shown, not
failed; its losses and wrong final values fail like any other.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torture_lib.history import History, Write

ABSENT = "absent"
DELETED = "deleted"
EXAMPLES = 5  # findings printed per row


@dataclass(frozen=True)
class LogEntry:
    """One row of HQ's change log."""

    seq: int
    origin: str
    origin_seq: int
    collection: str
    key: str
    op: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class HQRecord:
    collection: str
    key: str
    data: dict[str, Any]
    deleted: bool


@dataclass(frozen=True)
class Delivery:
    """One item a sink received (a repeat is a second Delivery with the same key)."""

    route: str
    idempotency_key: str
    collection: str
    key: str
    op: str
    record: dict[str, Any]
    change_seq: int


@dataclass(frozen=True)
class SinkSpec:
    route: str
    collections: tuple[str, ...]
    strict: bool  # repeats are a failure (the sink promises to deduplicate)


@dataclass
class SinkReport:
    spec: SinkSpec
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    repeats: int = 0
    repeat_examples: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    dead_letters: int = 0

    @property
    def ok(self) -> bool:
        failed = self.lost or self.unexpected or self.wrong or self.dead_letters
        return not failed and not (self.spec.strict and self.repeats)


@dataclass
class Report:
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    renumbered: int = 0  # acknowledged writes HQ holds under another sequence (not a failure)
    sinks: list[SinkReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "did not drain": fail the run

    @property
    def ok(self) -> bool:
        hq = self.lost or self.duplicated or self.unexpected or self.wrong or self.notes
        return not hq and all(s.ok for s in self.sinks)


def _brief(write: Write) -> str:
    why = f" {write.reason[:60]}" if write.outcome != "acked" else ""
    return f"{write.via} {write.w}={write.outcome}{why}"


def _state(write: Write) -> str:
    return DELETED if write.op == "delete" else f"w:{write.w}"


def _record_state(record: HQRecord | None) -> str:
    if record is None:
        return ABSENT
    if record.deleted:
        return DELETED
    return f"w:{record.data.get('w')}"


def allowed_states(writes: Sequence[Write]) -> set[str]:
    """The final values a key may have at HQ, given its writes in issue order."""
    last_acked = max((i for i, w in enumerate(writes) if w.outcome == "acked"), default=None)
    allowed = {ABSENT} if last_acked is None else {_state(writes[last_acked])}
    start = 0 if last_acked is None else last_acked + 1
    allowed |= {_state(w) for w in writes[start:] if w.outcome in ("indeterminate", "late")}
    allowed |= {_state(w) for w in writes if w.outcome == "late"}
    return allowed


def check(
    history: History,
    log: Iterable[LogEntry],
    records: Iterable[HQRecord],
    deliveries: Iterable[Delivery] = (),
    sinks: Sequence[SinkSpec] = (),
    dead_letters: dict[str, int] | None = None,
) -> Report:
    """Judge a run: see the module docstring for what each count means."""
    log = list(log)
    report = Report(acknowledged=sum(w.outcome == "acked" for w in history.writes))
    _check_log(history, log, report)
    final = {(r.collection, r.key): r for r in records}
    _check_final(history, final, report)
    by_route: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        by_route[d.route].append(d)
    for spec in sinks:
        sink = _check_sink(spec, log, final, by_route.pop(spec.route, []))
        sink.dead_letters = (dead_letters or {}).get(spec.route, 0)
        report.sinks.append(sink)
    for route, stray in by_route.items():
        report.notes.append(f"{len(stray)} deliveries from route {route!r}, which is not checked")
    return report


def _check_log(history: History, log: list[LogEntry], report: Report) -> None:
    by_w = {w.w: w for w in history.writes}
    origins = {node: agent for agent, node in history.nodes.items()}
    for (origin, seq), n in Counter((e.origin, e.origin_seq) for e in log).items():
        if n > 1:
            report.duplicated.append(f"change id {origin}:{seq} is {n} times in the change log")
    upserts: dict[str, list[LogEntry]] = defaultdict(list)
    deletes: dict[tuple[str, str], list[LogEntry]] = defaultdict(list)  # (origin, key)
    for e in log:
        if e.origin not in origins:
            report.unexpected.append(
                f"change {e.seq} ({e.op} {e.key}) from {e.origin}, not a torture agent "
                "(HQ's own correction, if it is not an enrolled node)"
            )
        elif e.op == "delete":
            deletes[(e.origin, e.key)].append(e)
        elif (w := e.fields.get("w")) in by_w:
            upserts[str(w)].append(e)
        else:
            report.unexpected.append(f"change {e.seq} ({e.op} {e.key}): unknown write id {w!r}")
    for w, entries in upserts.items():
        write = by_w[w]
        if len(entries) > 1:
            where = ", ".join(f"{e.origin_seq}" for e in entries)
            report.duplicated.append(
                f"write {w} ({write.key}) applied {len(entries)} times: {where}"
            )
        e = entries[0]
        if write.outcome == "refused":
            report.unexpected.append(f"refused write {w} ({write.key}, {write.reason}) applied")
        if e.key != write.key or origins[e.origin] != write.agent:
            report.wrong.append(f"write {w} of {write.agent}/{write.key} is at HQ as {e.key}")
        elif any(write.fields.get(k) != v for k, v in e.fields.items()):
            report.wrong.append(f"write {w} ({write.key}) reached HQ with other fields: {e.fields}")
        if write.outcome == "acked" and write.seq is not None and e.origin_seq != write.seq:
            report.renumbered += 1
    for write in history.writes:
        if write.outcome == "acked" and write.op == "upsert" and write.w not in upserts:
            report.lost.append(
                f"acknowledged {write.via} {write.w} of {write.agent}/{write.key} "
                f"(seq {write.seq}) is not in HQ's change log"
            )
    _check_deletes(history, deletes, report)


def _check_deletes(
    history: History, deletes: dict[tuple[str, str], list[LogEntry]], report: Report
) -> None:
    """Match delete changes to delete writes: each write explains at most one change."""
    claimed: set[int] = set()
    writes_of: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for write in history.writes:
        if write.op == "delete" and write.agent in history.nodes:
            writes_of[(history.nodes[write.agent], write.key)].append(write)
    for where, writes in writes_of.items():
        entries = deletes.get(where, [])
        # Acknowledged deletes first, by the change id they were answered with.
        for write in sorted(writes, key=lambda w: w.outcome != "acked"):
            if write.outcome == "refused":
                continue
            free = [e for e in entries if e.seq not in claimed]
            exact = [e for e in free if e.origin_seq == write.seq]
            pick = exact or free
            if pick:
                claimed.add(pick[0].seq)
            elif write.outcome == "acked":
                report.lost.append(
                    f"acknowledged delete {write.w} of {write.agent}/{write.key} "
                    f"(seq {write.seq}) is not in HQ's change log"
                )
    for (origin, key), entries in deletes.items():
        for e in entries:
            if e.seq in claimed:
                continue
            if writes_of.get((origin, key)):
                report.duplicated.append(
                    f"delete of {key} at change {e.seq} ({origin}:{e.origin_seq}): more deletes "
                    "than were written"
                )
            else:
                report.unexpected.append(f"delete of {key} at change {e.seq}: never written")


def _check_final(history: History, final: dict[tuple[str, str], HQRecord], report: Report) -> None:
    by_key: dict[str, list[Write]] = defaultdict(list)
    for write in history.writes:
        by_key[write.key].append(write)
    by_w = {w.w: w for w in history.writes}
    at_hq: dict[str, HQRecord] = {}
    for (coll, key), held in final.items():
        if key in by_key:
            at_hq[key] = held
        else:
            report.unexpected.append(f"HQ holds {coll}/{key}, which no one wrote")
    for key, writes in by_key.items():
        record = at_hq.get(key)
        actual = _record_state(record)
        allowed = allowed_states(writes)
        if actual not in allowed:
            report.wrong.append(
                f"{key}: HQ holds {actual}, expected {' or '.join(sorted(allowed))} "
                f"(last writes: {', '.join(_brief(w) for w in writes[-4:])})"
            )
        elif record is not None and not record.deleted:
            write = by_w[str(record.data.get("w"))]
            if record.data != write.fields:
                report.wrong.append(f"{key}: HQ's fields {record.data} != written {write.fields}")


def _check_sink(
    spec: SinkSpec,
    log: list[LogEntry],
    final: dict[tuple[str, str], HQRecord],
    deliveries: list[Delivery],
) -> SinkReport:
    sink = SinkReport(spec)
    expected = {
        f"{spec.route}:{e.origin}:{e.origin_seq}:0": e
        for e in log
        if e.collection in spec.collections
    }
    counts = Counter(d.idempotency_key for d in deliveries)
    sink.delivered = len(counts)
    for key, n in counts.items():
        if n > 1:
            sink.repeats += n - 1
            if len(sink.repeat_examples) < EXAMPLES:
                sink.repeat_examples.append(f"{key} x{n}")
        if key not in expected:
            sink.unexpected.append(f"{spec.route}: delivered {key}, which no change explains")
    # The router skips an upsert whose record was deleted by the time it got there (the delete
    # later in the log is routed instead): only such upserts may be missing.
    last_delete: dict[tuple[str, str], int] = {}
    for e in log:
        if e.op == "delete":
            last_delete[(e.collection, e.key)] = e.seq
    for key, e in expected.items():
        skippable = e.op != "delete" and last_delete.get((e.collection, e.key), 0) > e.seq
        if key not in counts and not skippable:
            sink.lost.append(f"{spec.route}: change {e.seq} ({e.op} {e.key}) never delivered")
    last: dict[tuple[str, str], Delivery] = {}
    for d in deliveries:  # in arrival order: a later one of the same change_seq wins
        k = (d.collection, d.key)
        if k not in last or d.change_seq >= last[k].change_seq:
            last[k] = d
    for (coll, key), d in last.items():
        state = _record_state(final.get((coll, key)))
        got = DELETED if d.op == "delete" else f"w:{d.record.get('w')}"
        if got != state:
            sink.wrong.append(f"{spec.route}: last delivery of {key} is {got}, HQ holds {state}")
    for coll, key in {(e.collection, e.key) for e in log if e.collection in spec.collections}:
        state = _record_state(final.get((coll, key)))
        if (coll, key) not in last and state != ABSENT:
            sink.wrong.append(f"{spec.route}: {key} never delivered, HQ holds {state}")
    return sink


def format_table(report: Report) -> str:
    """The verdict as a table, then up to EXAMPLES findings of each kind."""
    rows = [
        ("acknowledged writes", report.acknowledged, ""),
        ("lost", len(report.lost), "FAIL" if report.lost else "ok"),
        ("duplicated", len(report.duplicated), "FAIL" if report.duplicated else "ok"),
        ("unexpected", len(report.unexpected), "FAIL" if report.unexpected else "ok"),
        ("final values wrong", len(report.wrong), "FAIL" if report.wrong else "ok"),
        ("renumbered (allowed)", report.renumbered, ""),
    ]
    for s in report.sinks:
        name = f"sink {s.spec.route}"
        repeat_verdict = ("FAIL" if s.repeats else "ok") if s.spec.strict else "allowed"
        rows += [
            (f"{name}: delivered", s.delivered, ""),
            (f"{name}: lost", len(s.lost), "FAIL" if s.lost else "ok"),
            (f"{name}: duplicates by idempotency key", s.repeats, repeat_verdict),
            (f"{name}: unexpected", len(s.unexpected), "FAIL" if s.unexpected else "ok"),
            (f"{name}: final values wrong", len(s.wrong), "FAIL" if s.wrong else "ok"),
            (f"{name}: dead-lettered", s.dead_letters, "FAIL" if s.dead_letters else "ok"),
        ]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label:<{width}}  {value:>9,}  {verdict}" for label, value, verdict in rows]
    findings = [
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("unexpected", report.unexpected),
        ("wrong", report.wrong),
        ("not checked", report.notes),
    ]
    for s in report.sinks:
        findings += [
            (f"{s.spec.route} lost", s.lost),
            (f"{s.spec.route} repeats", s.repeat_examples),
            (f"{s.spec.route} unexpected", s.unexpected),
            (f"{s.spec.route} wrong", s.wrong),
        ]
    for label, items in findings:
        for item in items[:EXAMPLES]:
            lines.append(f"  {label}: {item}")
        if len(items) > EXAMPLES:
            lines.append(f"  {label}: ... and {len(items) - EXAMPLES} more")
    lines.append(f"  verdict: {'PASS' if report.ok else 'FAIL'}")
    return "\n".join(lines)
