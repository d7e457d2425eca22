"""Summary mode end to end, with real HQ and agent processes: 10,000 distributions recorded at the
agent reach HQ as per-site daily totals, equal to totals computed here from the records, in far
fewer bytes than forwarding every record; a SIGKILL mid-capture neither loses nor double-counts.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent import fieldgen
from agent.demo import LocalDeployment, _bin

ROOT = Path(__file__).resolve().parent.parent
COUNT = 10_000
ROUNDS = 8  # distribution days
CHUNK = 1000

pytestmark = pytest.mark.timeout(600)

Totals = dict[tuple[str, str, str], tuple[int, Decimal]]


def collections_file(folder: Path, forward: str) -> Path:
    """The example collections file, forwarding distributions in `forward` mode."""
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
    path = folder / "collections.toml"
    path.write_text(text)
    return path


@pytest.fixture
def deployments(tmp_path: Path) -> Iterator[dict[str, LocalDeployment]]:
    made = {
        forward: LocalDeployment(
            tmp_path / forward,
            sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
            agent_settings={"collections_file": str(collections_file(tmp_path / forward, forward))},
        )
        for forward in ("full", "summary")
    }
    try:
        yield made
    finally:
        for d in made.values():
            d.shutdown()


def post(d: LocalDeployment, records: list[dict[str, Any]]) -> dict[str, Any]:
    body = b"\n".join(json.dumps(r).encode() for r in records)
    return dict(d.api("POST", "/v1/collections/distributions/bulk", body))


def independent(records: list[dict[str, Any]]) -> Totals:
    """(site, day, unit) -> (lines, exact total quantity), from the records themselves."""
    out: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for r in records:
        for line in r["items"]:
            entry = out[(r["site"], r["distribution_date"], line["unit"])]
            entry[0] += 1
            entry[1] += Decimal(str(line["quantity"]))
    return {k: (v[0], v[1]) for k, v in out.items()}


def at_hq(d: LocalDeployment) -> Totals:
    """HQ's totals: the sum over the nodes' distribution_totals records, per group and day."""
    out = d.run_cli(
        _bin("fieldsync-hq"), "records", "--config", str(d.hq_config), "distribution_totals"
    )
    totals: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for line in out.splitlines():
        data = json.loads(line)["data"]
        entry = totals[(data["site"], data["window_start"], data["unit"])]
        entry[0] += data["lines"]
        entry[1] += Decimal(data["quantity"])
    return {k: (v[0], v[1]) for k, v in totals.items()}


def offline(d: LocalDeployment) -> None:
    """Enrolled, then HQ goes away: the field office records while its link is down."""
    d.enroll()
    d.start_agent()
    deadline = time.monotonic() + 30
    while not d.status()["last_error"]:  # the agent has found the link down
        assert time.monotonic() < deadline, "the agent never tried to reach HQ"
        time.sleep(0.05)


def test_summary_mode_sends_exact_daily_totals_in_far_fewer_bytes(
    deployments: dict[str, LocalDeployment],
) -> None:
    records = list(fieldgen.distributions(COUNT, seed=11, rounds=ROUNDS))
    expected = independent(records)
    wire: dict[str, int] = {}

    full = deployments["full"]
    offline(full)
    for i in range(0, COUNT, CHUNK):
        answer = post(full, records[i : i + CHUNK])
        assert answer["changed"] == CHUNK and answer["last_seq"] - answer["first_seq"] == CHUNK - 1
    full.start_hq()
    wire["full"] = int(full.wait_drained(timeout_s=300)["bytes_sent"])
    assert full.hq_count("distributions") == COUNT

    summary = deployments["summary"]
    offline(summary)
    # Half the records; then the agent is SIGKILLed while a bulk request is being stored.
    half = COUNT // 2
    for i in range(0, half, CHUNK):
        answer = post(summary, records[i : i + CHUNK])
        assert answer["changed"] == CHUNK and answer["first_seq"] is None  # kept on the agent
    in_flight = threading.Thread(
        target=_ignore_errors, args=(post, summary, records[half : half + CHUNK]), daemon=True
    )
    in_flight.start()
    time.sleep(0.05)
    assert summary.agent_proc is not None
    summary.kill(summary.agent_proc)
    in_flight.join(timeout=60)
    summary.start_agent()
    # Everything again: what was stored is unchanged (counted once), the rest is added.
    for i in range(0, COUNT, CHUNK):
        answer = post(summary, records[i : i + CHUNK])
        assert answer["accepted"] == CHUNK and answer["first_seq"] is None
    summary.start_hq()
    drained = summary.wait_drained(timeout_s=300)
    wire["summary"] = int(drained["bytes_sent"])

    assert summary.hq_count("distributions") == 0  # the records stay on the agent
    key = records[7]["distribution_id"]
    assert summary.api("GET", f"/v1/collections/distributions/records/{key}") == records[7]
    got = at_hq(summary)
    assert got == expected
    print(
        f"\n{COUNT:,} distributions over {ROUNDS} days: {len(got):,} site/day/unit totals at HQ\n"
        f"bytes on the wire: full {wire['full']:,} B ({wire['full'] / COUNT:.1f} B/record), "
        f"summary {wire['summary']:,} B: {wire['full'] / wire['summary']:.1f}x fewer"
    )
    assert wire["summary"] * 5 < wire["full"]


def _ignore_errors(post_fn: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):  # the agent died under the request: expected
        post_fn(*args)
