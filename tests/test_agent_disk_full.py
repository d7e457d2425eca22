"""Defect 1 of issue 9: the agent's disk fills up.

The data folder is a real, small tmpfs (we need root to mount it; skipped with the reason
otherwise), filled to the last byte with a filler file. The agent must stay up, refuse writes with
507 naming the data folder and the free space, keep serving reads and status (which says "disk
full"), go on forwarding, lose nothing, and accept writes again by itself once the filler is gone.

Before the fix, the first sync after the disk filled wrote its result to the meta table, got
SQLITE_FULL and the error escaped the forwarder's loop: the daemon exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import COLLECTION, FakeHQ, base_url, beneficiary, serve, upsert

from agent.backoff import Backoff
from agent.batcher import Batcher
from agent.demo import LocalDeployment
from agent.forwarder import Forwarder
from agent.hqclient import HQClient
from agent.status import read_status
from agent.store import AgentStore, DiskFull
from protocol.identity import NodeIdentity


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full-disk test needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): full-disk test skipped")


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at tmp_path/disk."""
    where = tmp_path / "disk"
    _mount_tmpfs(where, "4m")
    try:
        yield where
    finally:
        _unmount(where)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system has no byte left; returns it."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return filler


# ---- the store and the forwarder in this process ---------------------------------------------


async def _write_until_full(
    store: AgentStore, start: int, limit: int = 400
) -> tuple[int, DiskFull]:
    """Write ~4 KB records until one is refused for a full disk; returns (writes done, error)."""
    for i in range(start, start + limit):
        try:
            await store.write([upsert(beneficiary(i, notes="n" * 4000))])
        except DiskFull as e:
            return i - start, e
    raise AssertionError(f"{limit} writes of 4 KB fit on a full disk")


async def test_store_raises_disk_full_naming_the_folder_and_recovers(small_disk: Path) -> None:
    store = await AgentStore.open(small_disk / "agent.db", "nlocal")
    try:
        await store.write([upsert(beneficiary(i)) for i in range(20)])
        filler = fill(small_disk)
        _, error = await _write_until_full(store, 100)
        assert error.data_dir == str(small_disk)
        assert error.free_bytes < 64 * 1024
        assert str(small_disk) in str(error) and "free" in str(error)
        # Reads and status go on.
        assert await store.get(COLLECTION, "b00003") is not None
        state = await read_status(store)
        assert state["disk_full"] is True
        assert any("disk full" in w for w in state["warnings"])
        # Forwarder bookkeeping while full must not raise out of its loop (defect 1's crash).
        with pytest.raises(DiskFull):
            await store.set_meta(last_error="x")
        filler.unlink()
        (result,) = await store.write([upsert(beneficiary(999))])
        assert result.seq is not None
        state = await read_status(store)
        assert state["disk_full"] is False
        assert not any("disk full" in w for w in state["warnings"])
        assert (await store.backlog())["changes"] >= 21
    finally:
        await store.close()


async def test_forwarder_keeps_running_and_loses_nothing_on_a_full_disk(
    small_disk: Path,
) -> None:
    """The forwarder pushes while the disk is full; failed bookkeeping (meta, mark_acked) neither
    stops its loop nor loses a change: once space returns, everything is acked exactly once."""
    identity = NodeIdentity.generate()
    hq = FakeHQ(identity)
    store = await AgentStore.open(small_disk / "agent.db", identity.node_id)
    try:
        await store.write([upsert(beneficiary(i, notes="x" * 500)) for i in range(200)])
        batcher = Batcher(
            store, identity, max_changes=50, max_bytes=1 << 20, window=8, zstd_level=3
        )
        while await batcher.seal_next() is not None:
            pass
        filler = fill(small_disk)
        written, _ = await _write_until_full(store, 1000)
        async with (
            serve(hq.app()) as server,
            HQClient(hq.enrolment(base_url(server)), identity) as client,
        ):
            forwarder = Forwarder(
                store,
                client,
                batcher,
                backoff=Backoff(0.01, 0.05),
                pull_interval_s=0.02,
                feed_page_size=100,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(forwarder.run(stop))
            deadline = time.monotonic() + 10
            # Every sealed batch reaches HQ while the disk is full, though the acks cannot
            # be recorded here (forgetting batch 1 must not hold back batch 2).
            while hq.acked_through < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                assert not task.done(), task.exception()
            assert hq.acked_through == 4, "the forwarder stopped sending on a full disk"
            await asyncio.sleep(0.3)  # more rounds on the full disk
            assert not task.done()
            filler.unlink()
            total = 200 + written
            deadline = time.monotonic() + 20
            while (await store.backlog())["changes"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                assert not task.done(), task.exception()
            stop.set()
            await asyncio.wait_for(task, 10)
        assert (await store.backlog())["changes"] == 0
        assert not hq.duplicates
        assert sorted(seq for _, seq in hq.applied) == list(range(1, total + 1))
    finally:
        await store.close()


# ---- a real agent process ---------------------------------------------------------------------


NDJSON = "application/x-ndjson"


def _call(
    d: LocalDeployment, method: str, path: str, body: Any = None, content_type: str = ""
) -> tuple[int, Any]:
    """The local API, with the bearer token when the agent has one (issue 9, defect 3)."""
    headers = {"Content-Type": content_type or "application/json"}
    token = d.root / "agent" / "api-token"
    if token.exists():
        headers["Authorization"] = "Bearer " + token.read_text().strip()
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{d.api_port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _put(d: LocalDeployment, i: int) -> tuple[int, Any]:
    record = beneficiary(i, notes="n" * 4000)
    return _call(
        d, "PUT", f"/v1/collections/{COLLECTION}/records/{record['beneficiary_id']}", record
    )


def _meta(db_path: Path, name: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT v FROM meta WHERE k = ?", (name,)).fetchone()[0])


def _hq_changes(root: Path) -> int:
    with contextlib.closing(sqlite3.connect(root / "hq" / "hq.db")) as db:
        return int(db.execute("SELECT count(*) FROM changelog").fetchone()[0])


def test_agent_process_stays_up_on_a_full_disk_and_recovers(tmp_path: Path) -> None:
    disk = tmp_path / "agent"  # LocalDeployment's agent data folder
    _mount_tmpfs(disk, "6m")
    d = LocalDeployment(
        tmp_path,
        sync={"backoff_initial_s": 0.05, "backoff_max_s": 0.3, "pull_interval_s": 0.1},
    )
    try:
        d.enroll()  # HQ is down: the field office works offline, the agent seals ahead
        proc = d.start_agent()
        acked: list[int] = []
        lines = [json.dumps(beneficiary(i, notes="n" * 4000)).encode() for i in range(30)]
        status, answer = _call(
            d, "POST", f"/v1/collections/{COLLECTION}/bulk", b"\n".join(lines), NDJSON
        )
        assert status in (200, 201) and answer["accepted"] == 30, answer
        acked += range(30)
        deadline = time.monotonic() + 10
        while _meta(disk / "agent.db", "sealed_through") < 30:
            assert time.monotonic() < deadline, "not sealed"
            time.sleep(0.05)
        filler = fill(disk)
        for i in range(100, 500):
            status, answer = _put(d, i)
            if status not in (200, 201):
                break
            acked.append(i)
        assert status == 507, (status, answer)
        assert str(disk.resolve()) in answer["message"] and "free" in answer["message"]
        time.sleep(1.0)  # sync rounds failing (HQ down), each writing its result to the full disk
        assert proc.poll() is None, "the agent exited on a full disk"
        d.start_hq()  # forwarding goes on while the disk is full
        deadline = time.monotonic() + 20
        while _hq_changes(tmp_path) < 30:
            assert time.monotonic() < deadline, "nothing forwarded while the disk was full"
            assert proc.poll() is None, "the agent exited on a full disk"
            time.sleep(0.1)
        status, answer = _put(d, 9999)
        assert status == 507, (status, answer)
        status, record = _call(d, "GET", f"/v1/collections/{COLLECTION}/records/b00003")
        assert status == 200 and record["beneficiary_id"] == "b00003"
        status, state = _call(d, "GET", "/v1/status")
        assert status == 200 and state["disk_full"] is True
        assert any("disk full" in w for w in state["warnings"])
        # `fieldsync-agent status` opens the database itself: it must work on a full disk too.
        cli = d.run_cli(
            str(Path(sys.executable).parent / "fieldsync-agent"),
            *("status", "--json", "--config", str(d.agent_config)),
        )
        assert json.loads(cli)["disk_full"] is True

        filler.unlink()
        status, answer = _put(d, 10_000)
        assert status in (200, 201) and answer["seq"], (status, answer)
        acked.append(10_000)
        status, state = _call(d, "GET", "/v1/status")
        assert state["disk_full"] is False, state
        deadline = time.monotonic() + 60
        while _call(d, "GET", "/v1/status")[1]["backlog_changes"]:
            assert time.monotonic() < deadline, "backlog did not drain after the disk was freed"
            time.sleep(0.1)
        assert proc.poll() is None
        with contextlib.closing(sqlite3.connect(tmp_path / "hq" / "hq.db")) as db:
            keys = [
                k
                for (k,) in db.execute(
                    "SELECT key FROM records WHERE collection = ?", (COLLECTION,)
                )
            ]
            count, distinct = db.execute(
                "SELECT count(*), count(DISTINCT origin_seq) FROM changelog"
            ).fetchone()
        assert sorted(keys) == sorted(f"b{i:05d}" for i in acked)
        assert count == distinct == len(acked)
    finally:
        d.shutdown()
        _unmount(disk)
