"""Router benchmark: 100,000 changes from HQ's change log to the files sink and to PostgreSQL.

HQ's store is filled through its real ingest path (not timed); then one route per target drains the
log with the real router and sink, and the rate is the changes delivered per second of draining.
PostgreSQL is a real server started for the run (as the tests do). Figures are printed and written
to bench/results/router.json. Usage: `python -m bench.router [--changes N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import fieldgen
from hq_server.routing.config import routes_from_dict
from hq_server.routing.router import RouteRunner
from hq_server.routing.state import RouterStore
from hq_server.store import SQLiteHQStore
from protocol.change import Change
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity

RESULTS = Path(__file__).parent / "results" / "router.json"
TESTS = Path(__file__).resolve().parent.parent / "tests"
INGEST_BATCH = 1000
ROUTE_BATCH = 500


async def fill(store: SQLiteHQStore, count: int) -> None:
    node = NodeIdentity.generate()
    issued = await store.create_token("bench-office", 3_600_000, actor="bench")
    await store.enroll(issued.token, node.public_key)
    now = system_ms()
    seq = 0
    for batch, start in enumerate(range(0, count, INGEST_BATCH), start=1):
        changes = []
        for record in fieldgen.beneficiaries(min(INGEST_BATCH, count - start), start=start):
            seq += 1
            changes.append(
                Change(
                    "beneficiaries",
                    record["beneficiary_id"],
                    "upsert",
                    record,
                    pack(now, 0) + seq,
                    0,
                    node.node_id,
                    seq,
                )
            )
        await store.ingest(node.node_id, batch, changes)


async def drain(store: SQLiteHQStore, route_table: dict[str, Any], count: int) -> float:
    config = routes_from_dict({"routes": {"bench": route_table}}, "bench")
    route = config.routes["bench"]
    router_store = RouterStore(store)
    await router_store.open()
    sink = route.sink_type.factory(route.sink_settings)
    await sink.open()
    runner = RouteRunner(route, router_store, sink)
    started = time.perf_counter()
    try:
        while await runner.step():
            pass
    finally:
        await sink.close()
    elapsed = time.perf_counter() - started
    state = await router_store.state("bench")
    if state.delivered != count:
        raise RuntimeError(f"delivered {state.delivered} of {count}: {state.last_error}")
    return elapsed


def route(sink: dict[str, Any]) -> dict[str, Any]:
    return {"sources": ["beneficiaries"], "batch_size": ROUTE_BATCH, "sink": sink}


async def bench_files(tmp: Path, store: SQLiteHQStore, count: int) -> float:
    out = tmp / "files-out"
    out.mkdir()
    await store_reset(store)
    return count / await drain(store, route({"type": "files", "directory": str(out)}), count)


async def store_reset(store: SQLiteHQStore) -> None:
    """Start the route from the beginning of the log."""
    await RouterStore(store).open()
    async with store.transaction("bench reset") as conn:
        await conn.execute("DELETE FROM route_state")


async def bench_postgres(tmp: Path, store: SQLiteHQStore, count: int) -> float:
    sys.path.insert(0, str(TESTS))
    from services import start_postgres  # the same server setup the tests use

    server = start_postgres(tmp / "pg")
    try:
        server.psql(
            "-c",
            "CREATE TABLE beneficiaries_sink (key text PRIMARY KEY, record jsonb NOT NULL,"
            " idempotency_key text, change_seq bigint NOT NULL)",
        )
        server.grant("beneficiaries_sink")
        os.environ["BENCH_PG_PASSWORD"] = server.app_password
        await store_reset(store)
        sink = {
            "type": "postgres",
            "host": server.host,
            "port": server.port,
            "database": server.database,
            "user": server.app_user,
            "password_env": "BENCH_PG_PASSWORD",
            "sslmode": "disable",
            "table": "beneficiaries_sink",
            "payload_column": "record",
        }
        rate = count / await drain(store, route(sink), count)
        rows = server.psql("-tAc", "SELECT count(*) FROM beneficiaries_sink").strip()
        if int(rows) != count:
            raise RuntimeError(f"PostgreSQL holds {rows} rows, expected {count}")
        return rate
    finally:
        server.destroy()


async def run(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fieldsync-router-bench-") as name:
        tmp = Path(name)
        store = SQLiteHQStore(tmp / "hq.db")
        await store.open()
        try:
            print(f"filling HQ's change log with {count:,} changes ...", flush=True)
            await fill(store, count)
            print("routing to the files sink ...", flush=True)
            files_rate = await bench_files(tmp, store, count)
            print("routing to PostgreSQL ...", flush=True)
            pg_rate = await bench_postgres(tmp, store, count)
        finally:
            await store.close()
    return {
        "changes": count,
        "route_batch_size": ROUTE_BATCH,
        "files_records_per_s": round(files_rate),
        "postgres_records_per_s": round(pg_rate),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    args = parser.parse_args()
    figures = asyncio.run(run(args.changes))
    print("\nfieldsync router benchmark")
    for name, value in figures.items():
        print(f"  {name:26} {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
