"""Foundation benchmark: ingest, end-to-end sync, bytes on the wire, agent memory.

Runs HQ and an agent as real processes on 127.0.0.1 (the same `LocalDeployment` as `make run`) and
measures, for 100,000 generated field records in one run:

- agent durable ingest rate through the local API in bulk (fsync'd, 4 clients in flight);
- end-to-end sync rate agent -> HQ on loopback, from HQ being up to the agent's backlog being 0;
- wire bytes per record next to the same records as JSON + gzip level 6 at the same batch size;
- the agent's peak RSS.

Figures are printed and written to bench/results/foundation.json. Usage:
`python -m bench.foundation [--records N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent import fieldgen
from agent.demo import LocalDeployment

RESULTS = Path(__file__).parent / "results" / "foundation.json"
BATCH = 1000
CLIENTS = 4
TARGETS = {
    "ingest_records_per_s": (">=", 20_000),
    "sync_records_per_s": (">=", 10_000),
    "wire_vs_json_gzip": ("<=", 0.85),
    "agent_peak_rss_mb": ("<=", 80),
}


def make_bodies(total: int) -> tuple[list[tuple[str, bytes]], int]:
    """NDJSON request bodies of BATCH records (half beneficiaries, half distributions) and the
    size of the same batches as JSON arrays compressed with gzip -6 (the baseline)."""
    bodies: list[tuple[str, bytes]] = []
    gzip_bytes = 0
    half = total // 2
    for collection, count in (("beneficiaries", half), ("distributions", total - half)):
        for start in range(0, count, BATCH):
            records = list(fieldgen.records(collection, min(BATCH, count - start), start=start))
            bodies.append((collection, b"\n".join(json.dumps(r).encode() for r in records)))
            gzip_bytes += len(gzip.compress(json.dumps(records).encode(), compresslevel=6))
    return bodies, gzip_bytes


async def post_all(d: LocalDeployment, bodies: list[tuple[str, bytes]]) -> float:
    """Post every body with CLIENTS requests in flight; returns seconds taken."""
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            collection, body = queue.get_nowait()
            path = f"/v1/collections/{collection}/bulk"
            url = f"http://127.0.0.1:{d.api_port}{path}"
            async with session.post(url, data=body, headers=d.api_headers(path)) as response:
                if response.status != 200:
                    raise RuntimeError(f"ingest failed: {response.status} {await response.text()}")

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    return time.perf_counter() - started


def run(total: int) -> dict[str, Any]:
    print(f"generating {total:,} field records ...", flush=True)
    bodies, gzip_bytes = make_bodies(total)
    with tempfile.TemporaryDirectory(prefix="fieldsync-bench-") as tmp:
        d = LocalDeployment(Path(tmp), sync={"backoff_initial_s": 0.1, "backoff_max_s": 0.2})
        try:
            d.enroll()
            agent = d.start_agent()
            print("ingesting with HQ down ...", flush=True)
            ingest_s = asyncio.run(post_all(d, bodies))
            queued = d.status()["backlog_changes"]
            print("starting HQ, syncing ...", flush=True)
            d.start_hq()
            started = time.perf_counter()
            state = d.wait_drained()
            sync_s = time.perf_counter() - started
            at_hq = d.hq_count("beneficiaries") + d.hq_count("distributions")
            rss = d.peak_rss_mb(agent)
        finally:
            d.shutdown()
    if queued != total or at_hq != total:
        raise RuntimeError(f"lost or duplicated records: queued {queued}, at HQ {at_hq}")
    wire = state["bytes_sent"]
    return {
        "records": total,
        "batch_size": BATCH,
        "ingest_records_per_s": round(total / ingest_s),
        "sync_records_per_s": round(total / sync_s),
        "wire_bytes_per_record": round(wire / total, 1),
        "json_gzip_bytes_per_record": round(gzip_bytes / total, 1),
        "wire_vs_json_gzip": round(wire / gzip_bytes, 3),
        "agent_peak_rss_mb": round(rss, 1),
        "machine": f"{platform.machine()} {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report(figures: dict[str, Any]) -> bool:
    ok = True
    print("\nfieldsync foundation benchmark")
    for name, value in figures.items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            op, bound = target
            met = value >= bound if op == ">=" else value <= bound
            ok &= met
            verdict = f"  (target {op} {bound}: {'met' if met else 'MISSED'})"
        print(f"  {name:28} {value}{verdict}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    figures = run(args.records)
    report(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
