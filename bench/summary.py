"""Bytes on the wire for distributions forwarded in full versus as summaries (forward = "summary").

The field-office story: the link is down while distributions are recorded (as in `make run`),
then HQ is reachable and the backlog drains. Both runs use real HQ and agent processes with the
example collections file; the full run forwards every record, the summary runs the example's
per-site daily totals (by unit) and, for comparison, totals per item too. HQ's totals are checked
against totals computed here from the records. Figures are printed and written to
bench/results/summary.json. Usage:

    .venv/bin/python -m bench.summary [RECORDS] [ROUNDS]
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import fieldgen
from agent.demo import LocalDeployment, _bin

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "summary.json"
CHUNK = 1000


def collections_file(folder: Path, forward: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config" / "admin_codes.example.csv", folder / "admin_codes.example.csv")
    text = (ROOT / "config" / "collections.example.toml").read_text()
    if forward == "full":
        text = text.replace('forward = "summary"\n', "")
        text = re.sub(
            r"\[collections\.distributions\.summary\].*?(?=\[collections\.distributions\.fields\])",
            "",
            text,
            flags=re.S,
        )
    elif forward == "per_item":
        text = text.replace(
            'group_by = ["site", "items[].unit"]',
            'group_by = ["site", "items[].item", "items[].unit"]',
        )
    path = folder / "collections.toml"
    path.write_text(text)
    return path


def totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], Decimal]:
    out: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for r in rows:
        out[(r["site"], r["window_start"], r["unit"])] += Decimal(r["quantity"])
    return dict(out)


def run(root: Path, forward: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    d = LocalDeployment(
        root / forward,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
        agent_settings={"collections_file": str(collections_file(root / forward, forward))},
    )
    try:
        d.enroll()
        d.start_agent()
        deadline = time.monotonic() + 30
        while not d.status()["last_error"]:  # the agent has found the link down
            if time.monotonic() > deadline:
                raise RuntimeError("the agent never tried to reach HQ")
            time.sleep(0.05)
        started = time.monotonic()
        for i in range(0, len(records), CHUNK):
            body = b"\n".join(json.dumps(r).encode() for r in records[i : i + CHUNK])
            d.api("POST", "/v1/collections/distributions/bulk", body)
        capture_s = time.monotonic() - started
        d.start_hq()
        state = d.wait_drained(timeout_s=600)
        figures: dict[str, Any] = {
            "bytes_on_wire": int(state["bytes_sent"]),
            "changes_sent": int(state["acked_changes"]),
            "capture_records_per_s": round(len(records) / capture_s),
        }
        if forward != "full":
            out = d.run_cli(
                _bin("fieldsync-hq"), "records", "--config", str(d.hq_config), "distribution_totals"
            )
            rows = [json.loads(line)["data"] for line in out.splitlines()]
            figures["summary_records"] = len(rows)
            figures["totals"] = totals(rows)
        return figures
    finally:
        d.shutdown()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    records = list(fieldgen.distributions(count, seed=11, rounds=rounds))
    expected: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for r in records:
        for line in r["items"]:
            expected[(r["site"], r["distribution_date"], line["unit"])] += Decimal(
                str(line["quantity"])
            )
    with tempfile.TemporaryDirectory(prefix="fieldsync-bench-summary-") as tmp:
        results = {
            forward: run(Path(tmp), forward, records) for forward in ("full", "summary", "per_item")
        }
    full = results["full"]["bytes_on_wire"]
    figures: dict[str, Any] = {"records": count, "distribution_days": rounds}
    for forward, result in results.items():
        if "totals" in result:
            result["totals_match"] = result.pop("totals") == dict(expected)
        result["bytes_per_record"] = round(result["bytes_on_wire"] / count, 2)
        result["x_fewer_than_full"] = round(full / result["bytes_on_wire"], 1)
        figures[forward] = result
    for forward, result in results.items():
        print(f"{forward:>9}: {json.dumps(result)}")
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
