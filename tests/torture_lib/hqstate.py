"""What HQ holds, read straight from its SQLite database opened read-only, and what the files
sink wrote: the checker's other inputs. Read-only (`mode=ro`), so the checker cannot change what
it judges; safe while HQ runs too (WAL readers do not block HQ), which is how the drain waits.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgpack

from torture_lib.checker import Delivery, HQRecord, LogEntry


@contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        yield conn


def change_log(db: Path) -> list[LogEntry]:
    with read_only(db) as conn:
        rows = conn.execute(
            "SELECT seq, origin, origin_seq, collection, key, op, fields FROM changelog ORDER BY seq"
        ).fetchall()
    return [
        LogEntry(seq, origin, origin_seq, coll, key, op, dict(msgpack.unpackb(fields, raw=False)))
        for seq, origin, origin_seq, coll, key, op, fields in rows
    ]


def records(db: Path) -> list[HQRecord]:
    with read_only(db) as conn:
        rows = conn.execute("SELECT collection, key, data, stamps FROM records").fetchall()
    # A record is alive while some field has a stamp above its tombstone (hq_server.store: _ALIVE).
    return [
        HQRecord(coll, key, json.loads(data) if data else {}, not json.loads(stamps or "{}"))
        for coll, key, data, stamps in rows
    ]


def route_lag(db: Path) -> dict[str, int]:
    """Changes in the log each route has not finished yet (0 everywhere: drained)."""
    with read_only(db) as conn:
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM changelog").fetchone()[0]
        try:
            rows = conn.execute("SELECT route, cursor, partial FROM route_state").fetchall()
        except sqlite3.OperationalError:  # the router has not created its tables yet
            rows = []
    return {route: top - cursor + (1 if partial else 0) for route, cursor, partial in rows}


def dead_letters(db: Path) -> dict[str, int]:
    with read_only(db) as conn:
        try:
            rows = conn.execute("SELECT route, count(*) FROM dead_letters GROUP BY route")
            return {route: int(n) for route, n in rows.fetchall()}
        except sqlite3.OperationalError:
            return {}


def files_sink(route: str, directory: Path) -> list[Delivery]:
    """Every line the files sink wrote (finished files and any .part), in write order."""

    def order(path: Path) -> tuple[int, str]:
        stem = path.name.removesuffix(".part").removesuffix(".jsonl")
        seq = stem.rsplit("-", 1)[-1]
        return (int(seq) if seq.isdigit() else 0, path.name)

    paths = [p for p in directory.iterdir() if p.name.endswith((".jsonl", ".jsonl.part"))]
    found: list[Delivery] = []
    for path in sorted(paths, key=order):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            doc = json.loads(line)
            found.append(
                Delivery(
                    route=route,
                    idempotency_key=doc["idempotency_key"],
                    collection=doc["collection"],
                    key=doc["key"],
                    op=doc["op"],
                    record=doc.get("record") or {},
                    change_seq=int(doc["change_seq"]),
                )
            )
    return found
