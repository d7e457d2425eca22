"""Routing end to end with real processes: agent -> HQ -> router -> a real webhook receiver.

Faults are real: the receiver answers 503 for a while, refuses some records with 400, and HQ is
SIGKILLed in the middle of delivering. The receiver verifies every signature and keeps each
idempotency key once, like a well-behaved target; the checks read what it holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webhook_receiver import Receiver, running_receiver

from agent import fieldgen
from agent.demo import LocalDeployment, _bin

SECRET = b"test-webhook-secret-0123456789"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver(SECRET) as r:
        yield r


def deployment(tmp_path: Path, receiver: Receiver) -> LocalDeployment:
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET)
    os.chmod(secret_file, 0o600)
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f"""
[routes.to-receiver]
description = "test route"
owner = "tests"
sources = ["beneficiaries"]
batch_size = 50

[routes.to-receiver.retry]
initial_s = 0.05
max_s = 0.4
attempts = 4

[routes.to-receiver.sink]
type = "webhook"
url = "http://127.0.0.1:{receiver.port}/hook"
secret_file = "{secret_file}"
timeout_s = 5.0
"""
    )
    return LocalDeployment(
        tmp_path,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3},
        hq_settings={"routes_file": str(routes)},
    )


@pytest.fixture
def make_deployment(tmp_path: Path, receiver: Receiver) -> Iterator[LocalDeployment]:
    d = deployment(tmp_path, receiver)
    try:
        yield d
    finally:
        d.shutdown()


def write(d: LocalDeployment, records: list[dict[str, Any]]) -> None:
    body = b"\n".join(json.dumps(r).encode() for r in records)
    assert d.api("POST", "/v1/collections/beneficiaries/bulk", body)["accepted"] == len(records)


def versions(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    first = list(fieldgen.beneficiaries(count, seed=3))
    second = [r | {"registration_status": "verified", "version": 2} for r in first]
    return first, second


def per_key_order_holds(accepted: list[dict[str, Any]]) -> bool:
    """For every record key, the accepted change sequences only grow."""
    last: dict[str, int] = {}
    for document in accepted:
        if document["change_seq"] <= last.get(document["key"], 0):
            return False
        last[document["key"]] = document["change_seq"]
    return True


def test_target_down_for_a_while_then_everything_delivered_once_in_order(
    make_deployment: LocalDeployment, receiver: Receiver
) -> None:
    d = make_deployment
    receiver.unavailable = True
    d.enroll()
    d.start_hq()
    d.start_agent()
    first, second = versions(150)
    write(d, first)
    write(d, second)
    d.wait_drained(timeout_s=60)
    time.sleep(2.0)  # the route keeps retrying against 503s
    assert receiver.snapshot()[0] == {}
    receiver.unavailable = False
    receiver.wait_for(300, timeout_s=60)
    held, accepted = receiver.snapshot()
    assert len(held) == len(accepted) == 300  # each change once
    assert per_key_order_holds(accepted)
    final = {doc["key"]: doc["record"] for doc in accepted}
    assert final == {r["beneficiary_id"]: r for r in second}
    assert receiver.bad_signatures == 0
    assert dlq(d) == []


def dlq(d: LocalDeployment) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_bin("fieldsync-hq"), "dlq", "list", "--config", str(d.hq_config), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_records_the_target_refuses_are_dead_lettered_and_the_rest_delivered(
    make_deployment: LocalDeployment, receiver: Receiver
) -> None:
    d = make_deployment
    records = list(fieldgen.beneficiaries(100, seed=4))
    refused = {r["beneficiary_id"] for r in records[::17]}
    receiver.reject_keys = refused
    d.enroll()
    d.start_hq()
    d.start_agent()
    write(d, records)
    receiver.wait_for(100 - len(refused), timeout_s=60)
    deadline = time.monotonic() + 30
    while len(dead := dlq(d)) < len(refused) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {letter["key"] for letter in dead} == refused
    assert all(letter["reason"] == "rejected" and "400" in letter["error"] for letter in dead)
    assert all(letter["mapped"] is not None for letter in dead)
    held, _ = receiver.snapshot()
    assert {doc["key"] for doc in held.values()} == {r["beneficiary_id"] for r in records} - refused


def test_hq_killed_while_delivering_loses_nothing_and_duplicates_nothing(
    make_deployment: LocalDeployment, receiver: Receiver
) -> None:
    d = make_deployment
    receiver.delay_s = 0.01
    d.enroll()
    d.start_hq()
    d.start_agent()
    records = list(fieldgen.beneficiaries(400, seed=5))
    write(d, records)
    receiver.wait_for(60, timeout_s=60)
    assert d.hq_proc is not None
    d.kill(d.hq_proc)  # mid-delivery: some items sent, their progress maybe not yet saved
    held_at_kill = len(receiver.snapshot()[0])
    assert held_at_kill < 400, "delivery finished before the kill; slow the receiver down"
    d.start_hq()
    receiver.wait_for(400, timeout_s=90)
    time.sleep(0.5)
    held, accepted = receiver.snapshot()
    assert len(held) == len(accepted) == 400  # the target holds each delivery exactly once
    assert {doc["key"] for doc in held.values()} == {r["beneficiary_id"] for r in records}
    assert receiver.arrivals >= 400  # repeats after the kill arrived and were deduplicated
    assert dlq(d) == []
