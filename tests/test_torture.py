"""The torture suite (tests/torture.py, `make torture`): its checker can fail, its parts work, and
a bounded run of real processes under faults loses and duplicates nothing.

The checker tests feed it histories with known defects (a lost write, a duplicated one, a
refused write that was applied, a stale final value, a sink that lost or repeated an item) and
assert each is reported: a checker that cannot fail would make every torture run a PASS.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from torture_lib.checker import (
    Delivery,
    HQRecord,
    LogEntry,
    Report,
    SinkSpec,
    allowed_states,
    check,
)
from torture_lib.history import History, Outcome, Write
from torture_lib.nemesis import plan_cycle
from torture_lib.proxy import TortureProxy
from torture_lib.workload import Writer, tracing

REPO = Path(__file__).resolve().parent.parent
NODE = "n-agent-1"
SINKS = [SinkSpec("files", ("items",), strict=True), SinkSpec("hook", ("items",), strict=False)]


class Scenario:
    """A history and what HQ and the sinks hold, built write by write as a correct system would."""

    def __init__(self) -> None:
        self.history = History(nodes={"a1": NODE})
        self.log: list[LogEntry] = []
        self.records: dict[str, HQRecord] = {}
        self.deliveries: list[Delivery] = []

    def write(
        self, key: str, op: str = "upsert", outcome: Outcome = "acked", *, applied: bool = True
    ) -> Write:
        w = f"a1.0.{len(self.history.writes) + 1}"
        fields = {"id": key, "w": w, "n": len(self.history.writes)} if op == "upsert" else {}
        write = self.history.new("a1", key, op, w, fields, "put")  # type: ignore[arg-type]
        write.outcome = outcome
        if applied:
            origin_seq = len(self.log) + 1
            write.seq = origin_seq
            self.apply(write, origin_seq)
        return write

    def apply(self, write: Write, origin_seq: int) -> None:
        entry = LogEntry(
            len(self.log) + 1, NODE, origin_seq, "items", write.key, write.op, dict(write.fields)
        )
        self.log.append(entry)
        self.records[write.key] = HQRecord(
            "items", write.key, dict(write.fields), write.op == "delete"
        )
        for route in ("files", "hook"):
            self.deliveries.append(
                Delivery(
                    route,
                    f"{route}:{NODE}:{origin_seq}:0",
                    "items",
                    write.key,
                    write.op,
                    dict(write.fields),
                    entry.seq,
                )
            )

    def check(self) -> Report:
        return check(self.history, self.log, self.records.values(), self.deliveries, SINKS)


def test_checker_passes_a_correct_history() -> None:
    s = Scenario()
    s.write("k1")
    s.write("k1")
    s.write("k2")
    s.write("k2", "delete")
    s.write("k3", outcome="indeterminate", applied=False)  # absent: not a loss
    s.write("k4", outcome="refused", applied=False)
    report = s.check()
    assert report.ok, report
    assert report.acknowledged == 4


def test_checker_reports_a_lost_and_a_duplicated_write() -> None:
    s = Scenario()
    s.write("k1")
    lost = s.write("k2", applied=False)  # acknowledged, never reached HQ
    twice = s.write("k3")
    s.apply(twice, origin_seq=99)  # the same write again, under another change sequence
    report = s.check()
    assert not report.ok
    assert len(report.lost) == 1 and lost.w in report.lost[0]
    assert len(report.duplicated) == 1 and twice.w in report.duplicated[0]
    assert report.wrong  # k2's last acknowledged write is not HQ's value either


def test_checker_reports_a_change_id_twice_in_the_log() -> None:
    s = Scenario()
    write = s.write("k1")
    s.log.append(s.log[0])
    report = s.check()
    assert any(f"{NODE}:{write.seq}" in d for d in report.duplicated)


def test_checker_reports_refused_writes_applied_and_unknown_changes() -> None:
    s = Scenario()
    s.write("k1", outcome="refused")  # 507 said "not stored", yet HQ has it
    s.log.append(LogEntry(99, NODE, 99, "items", "k9", "upsert", {"id": "k9", "w": "nobody"}))
    s.log.append(LogEntry(100, "n-stranger", 1, "items", "k8", "upsert", {"w": "a1.0.1"}))
    s.records["zz"] = HQRecord("items", "zz", {"id": "zz"}, False)
    report = s.check()
    text = "\n".join(report.unexpected)
    assert "refused write a1.0.1" in text
    assert "unknown write id 'nobody'" in text
    assert "n-stranger" in text
    assert "items/zz" in text
    assert not report.ok


def test_checker_reports_a_stale_final_value() -> None:
    s = Scenario()
    first = s.write("k1")
    s.write("k1", applied=False)
    s.records["k1"] = HQRecord("items", "k1", dict(first.fields), False)
    report = s.check()
    assert any(r.startswith("k1: HQ holds w:a1.0.1") for r in report.wrong), report.wrong


def test_checker_reports_a_lost_and_an_extra_delete() -> None:
    s = Scenario()
    s.write("k1")
    s.write("k1", "delete", applied=False)  # acknowledged delete that HQ never got
    s.write("k2")
    extra = s.write("k2", "delete")
    s.apply(extra, origin_seq=77)  # applied twice under two change ids
    report = s.check()
    assert any("delete a1.0.2" in line for line in report.lost), report.lost
    assert any("more deletes than were written" in d for d in report.duplicated)


def test_allowed_final_values_follow_the_last_acknowledged_write() -> None:
    def w(n: int, outcome: Outcome, op: str = "upsert") -> Write:
        return Write("a1", "k", op, f"w{n}", {}, n, "put", outcome)  # type: ignore[arg-type]

    assert allowed_states([w(1, "acked"), w(2, "indeterminate")]) == {"w:w1", "w:w2"}
    assert allowed_states([w(1, "indeterminate"), w(2, "acked")]) == {"w:w2"}
    assert allowed_states([w(1, "late"), w(2, "acked")]) == {"w:w1", "w:w2"}
    assert allowed_states([w(1, "refused")]) == {"absent"}
    assert allowed_states([w(1, "acked"), w(2, "acked", "delete")]) == {"deleted"}


def test_checker_judges_sinks_by_idempotency_key() -> None:
    s = Scenario()
    s.write("k1")
    s.write("k2")
    s.write("k3")
    s.write("k3", "delete")
    repeated = [d for d in s.deliveries if d.key == "k1"]
    s.deliveries += repeated  # each sink got k1 twice
    s.deliveries = [d for d in s.deliveries if not (d.route == "files" and d.key == "k2")]
    # The router may skip an upsert deleted later in the log: not a loss.
    s.deliveries = [d for d in s.deliveries if not (d.key == "k3" and d.op == "upsert")]
    report = s.check()
    files, hook = report.sinks
    assert files.repeats == 1 and hook.repeats == 1
    assert len(files.lost) == 1 and "k2" in files.lost[0] and not hook.lost
    assert files.wrong and not hook.wrong  # files' last word on k2 is missing
    assert not files.ok  # the files sink promises no repeats
    assert hook.ok  # a webhook is at least once: repeats are allowed
    assert not report.ok


def test_plan_cycle_is_a_function_of_the_seed() -> None:
    kinds = {"kill-agent", "kill-hq", "proxy", "disk-full", "clock-jump"}

    def plans(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [f.describe() for _ in range(30) for f in plan_cycle(rng, 5.0, ["a1", "a2"], kinds)]

    assert plans(3) == plans(3)
    assert plans(3) != plans(4)
    only = random.Random(5)
    faults = [f for _ in range(50) for f in plan_cycle(only, 5.0, ["a1"], {"kill-hq"})]
    assert faults and {f.kind for f in faults} == {"kill-hq"}
    assert all(0 <= f.at <= 3.0 for f in faults)


async def _echo_through(proxy: TortureProxy, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(payload)
    await writer.drain()
    got = b""
    try:
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), 2)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    writer.close()
    return got


async def test_proxy_passes_truncates_and_resets() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await TortureProxy(server.sockets[0].getsockname()[1]).start()
    try:
        payload = bytes(range(256)) * 40
        assert await _echo_through(proxy, payload) == payload
        proxy.set_mode("truncate", truncate_after=1000, truncate_dir="down")
        assert await _echo_through(proxy, payload) == payload[:1000]
        assert proxy.stats.truncated == 1
        proxy.set_mode("reset")
        assert await _echo_through(proxy, payload) == b""
        proxy.set_mode("pass")
        assert await _echo_through(proxy, payload) == payload
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


async def test_writer_counts_a_resent_write_as_indeterminate() -> None:
    """aiohttp resends a PUT or DELETE once after a dropped connection, and the agent may have
    stored the first copy: an error answer to the second copy must not count as "refused"."""
    seen: list[bytes] = []

    async def drop_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        if len(seen) == 1:
            writer.transport.abort()  # "stored", then killed before it could answer
            return
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(drop_first, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    agent = SimpleNamespace(name="a1", api=f"http://127.0.0.1:{port}", headers=lambda: {})
    history = History()
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, trace_configs=[tracing()]) as session:
            writer = Writer(
                cast(Any, agent), 0, history, random.Random(1), session, Counter(), pause_s=0
            )
            writer.present.add("a1-0-000000")
            await writer.delete()
    finally:
        server.close()
        await server.wait_closed()
    (write,) = history.writes
    assert len(seen) == 2, "aiohttp no longer resends: keep the safeguard anyway"
    assert write.outcome == "indeterminate", write


def _torture(cycles: int, seed: int, cycle_s: float, timeout_s: float) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "torture.py"), "--cycles", str(cycles),
         "--seed", str(seed), "--cycle-s", str(cycle_s)],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "verdict: PASS" in out
    for row in ("lost", "duplicated", "final values wrong"):
        assert re.search(rf"^\s+{row}\s+0\s+ok$", out, re.M), f"{row} not 0:\n{out[-4000:]}"
    return out


@pytest.mark.timeout(280)
def test_torture_twenty_cycles_lose_and_duplicate_nothing() -> None:
    """The bounded run CI makes: 20 cycles of 4 s under every nemesis this machine allows."""
    out = _torture(cycles=20, seed=20260, cycle_s=4.0, timeout_s=260)
    assert "cycle 20/20" in out


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_torture_two_hundred_cycles() -> None:
    """What `make torture` runs (200 cycles of 5.5 s, ~20 minutes)."""
    _torture(cycles=200, seed=200, cycle_s=5.5, timeout_s=2600)
