"""HQ's conflict machinery fuzzed end to end through the real store: random histories of edits and
deletes by owners and non-owners, some with clocks two years ahead, delivered in random orders and
batch groupings. What must hold in every run:

- a fresh replica applying the nodes' changes and HQ's own (from the change log), in any order with
  repeats, ends exactly where HQ is (convergence, docs/protocol.md section 8);
- ingest never raises for well-formed changes (that would refuse a node's batch forever);
- HQ's corrections stay bounded (no ping-pong);
- without fast clocks and deletes: an owned field holds the owner's latest write, an lww field the
  latest write (section 8.2). With fast clocks the real-time outcome is best effort (section 12).

The CI run is bounded (FUZZ_SEEDS); the @slow one runs many more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hq_fixtures import DAY_MS, FakeWall
from test_hq_conflicts import HQ_ORIGIN, Node

from hq_server.store import SQLiteHQStore
from protocol.change import Change
from protocol.hlc import pack
from protocol.merge import FieldPolicies, RecordState, apply_change

SKEW = 2 * 365 * DAY_MS
OWNED, LWW, REVIEW = ("s1", "s2"), ("l1", "l2"), ("r1",)
POLICIES = {
    "beneficiaries": FieldPolicies(
        owners=dict.fromkeys(OWNED, "group:office"), review=frozenset(REVIEW)
    )
}
# node -> (owner?, clock offset)
NODES = {"O1": (True, 0), "O2": (True, SKEW), "X1": (False, 0), "X2": (False, SKEW)}
FUZZ_SEEDS = 25
ORDERS = 3


@dataclass(frozen=True)
class Edit:
    node: str
    real: int  # ms after the record was created
    op: str
    fields: dict[str, Any]
    seen: tuple[int, ...]  # earlier edits this node had received


def history(rng: random.Random, *, fast: bool, deletes: bool) -> list[Edit]:
    names = list(NODES) if fast else [n for n, (_, off) in NODES.items() if off == 0]
    reals = sorted(rng.sample(range(1, 40), rng.randint(2, 6)))
    out: list[Edit] = []
    for i, real in enumerate(reals):
        who = rng.choice(names)
        seen = {
            j
            for j in range(i)
            if out[j].node == who
            # a right clock never receives a far-ahead stamp before HQ bounds it; keep it simple
            or (rng.random() < 0.4 and (NODES[who][1] or not NODES[out[j].node][1]))
        }
        if deletes and rng.random() < 0.15:
            out.append(Edit(who, real * 1000, "delete", {}, tuple(sorted(seen))))
            continue
        names_written = rng.sample([*OWNED, *LWW, *REVIEW], rng.randint(1, 3))
        fields = {name: rng.choice("abc") for name in names_written}
        out.append(Edit(who, real * 1000, "upsert", fields, tuple(sorted(seen))))
    return out


async def run(tmp: Path, edits: list[Edit], rng: random.Random) -> tuple[RecordState, list[Change]]:
    """HQ after receiving `edits` in a random order and batch grouping; returns its state of B1 and
    every change (nodes' and HQ's) for the convergence check."""
    wall = FakeWall(1_700_000_000_000)
    store = SQLiteHQStore(tmp / "hq.db", wall=wall, policies=POLICIES, origin=HQ_ORIGIN)
    async with store:
        nodes = {
            name: await Node.enrol(store, name, groups=("office",) if owner else ())
            for name, (owner, _) in NODES.items()
        }
        t = wall()
        base = nodes["O1"].change("B1", {"given_name": "A"}, pack(t), 0)
        await nodes["O1"].send(base)
        stamps = [pack(t + e.real + NODES[e.node][1]) for e in edits]
        changes = []
        for i, e in enumerate(edits):
            parent = max([base.hlc, *(stamps[j] for j in e.seen)])
            node = nodes[e.node]
            node.seq += 1
            changes.append(
                Change("beneficiaries", "B1", e.op, e.fields, stamps[i], parent, node.id, node.seq)
            )  # type: ignore[arg-type]
        queues: dict[str, list[Change]] = {}
        for e, change in zip(edits, changes, strict=True):
            queues.setdefault(e.node, []).append(change)
        wall.advance(60_000)
        while queues:
            name = rng.choice(sorted(queues))
            count = rng.randint(1, len(queues[name]))
            batch, queues[name] = queues[name][:count], queues[name][count:]
            if not queues[name]:
                del queues[name]
            offset = NODES[name][1]
            await nodes[name].send(*batch, offset_ms=offset or None)
        record = await store.get_record("beneficiaries", "B1")
        rows = await store.read(
            "SELECT origin, origin_seq, op, fields, hlc, parent FROM changelog WHERE origin = ?",
            (HQ_ORIGIN,),
        )
    hq = [
        Change("beneficiaries", "B1", op, msgpack.unpackb(f, raw=False), hlc, p, o, s)
        for o, s, op, f, hlc, p in rows
    ]
    assert record is not None
    return record.state, [base, *changes, *hq]


def latest(edits: list[Edit], name: str) -> Any:
    """The value of the latest write to `name` (by an owner, for owned fields), or None."""
    writes = [e for e in edits if name in e.fields and (name not in OWNED or NODES[e.node][0])]
    return max(writes, key=lambda e: e.real).fields[name] if writes else None


async def fuzz(tmp_path: Path, seeds: range, orders: int, *, fast: bool, deletes: bool) -> None:
    for seed in seeds:
        edits = history(random.Random(seed), fast=fast, deletes=deletes)
        for order in range(orders):
            rng = random.Random(seed * 1000 + order)
            folder = tmp_path / f"{seed}-{order}"
            folder.mkdir()
            at_hq, everything = await run(folder, edits, rng)
            where = f"seed {seed}, order {order}: {edits}"
            hq_changes = len(everything) - 1 - len(edits)
            assert hq_changes <= 3 * len(edits), f"{hq_changes} HQ changes, {where}"
            for _ in range(2):
                shuffled = everything + rng.choices(everything, k=len(everything))
                rng.shuffle(shuffled)
                replica = RecordState()
                for change in shuffled:
                    apply_change(replica, change, REVIEW)
                assert (replica.values, replica.stamps, replica.tombstone) == (
                    at_hq.values,
                    at_hq.stamps,
                    at_hq.tombstone,
                ), f"replica diverged from HQ, {where}"
            if fast or deletes:
                continue
            for name in (*OWNED, *LWW):
                wanted = latest(edits, name)
                if wanted is not None:
                    assert at_hq.values.get(name) == wanted, f"{name}, {where}"


@pytest.mark.parametrize(("fast", "deletes"), [(False, False), (True, False), (True, True)])
async def test_fuzzed_through_the_store(tmp_path: Path, fast: bool, deletes: bool) -> None:
    await fuzz(tmp_path, range(FUZZ_SEEDS), ORDERS, fast=fast, deletes=deletes)


@pytest.mark.slow
@pytest.mark.parametrize(("fast", "deletes"), [(False, False), (True, False), (True, True)])
async def test_fuzzed_through_the_store_at_length(
    tmp_path: Path, fast: bool, deletes: bool
) -> None:
    await fuzz(tmp_path, range(1000, 1400), 4, fast=fast, deletes=deletes)
