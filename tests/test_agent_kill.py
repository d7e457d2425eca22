"""kill -9 against the agent's store: no acknowledged write is lost, the outbox has no gap.

A child process writes records from several concurrent writers (so commits are grouped) and prints
each key and sequence on stdout only after `write()` returned: that line is the acknowledgement an
app would have received. The test SIGKILLs the child mid-stream, restarts it on the same database
(it resumes the sequence), kills it again, then checks every acknowledged write is there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent_fixtures import COLLECTION, open_store

from agent.store import Write

REPO = Path(__file__).resolve().parent.parent
WRITER = """
import asyncio, sys
from pathlib import Path
from agent.store import AgentStore, Write

async def main(path, run):
    store = await AgentStore.open(Path(path), "nkill")
    async def writer(w):
        i = 0
        while True:
            key = f"r{run}-w{w}-{i}"
            fields = {"beneficiary_id": key, "i": i, "notes": "x" * 200}
            (result,) = await store.write([Write("beneficiaries", key, "upsert", fields)])
            print(key, result.seq, flush=True)
            i += 1
    await asyncio.gather(*(writer(w) for w in range(8)))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_and_kill(db: Path, run: int, after: int) -> list[tuple[str, int]]:
    """Start the writer, SIGKILL it once `after` writes are acknowledged; return every ack seen."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while len(lines) < after:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"writer exited early: {child.stderr.read().decode()}")
            lines.append(line)
            assert time.monotonic() < deadline, "writer too slow"
    finally:
        child.send_signal(signal.SIGKILL)
        # Read through the same buffered reader as above: communicate() reads the raw pipe and
        # would skip bytes readline() already buffered, starting mid-line.
        rest = child.stdout.read()
        err = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL, err.decode()
    lines += rest.splitlines(keepends=True)
    acks = []
    for line in lines:
        if line.endswith(b"\n"):  # a line cut by the kill is not counted (it is acked anyway)
            key, seq = line.decode().split()
            acks.append((key, int(seq)))
    return acks


def test_sigkill_loses_no_acknowledged_write_and_leaves_no_gap(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    acked: list[tuple[str, int]] = []
    for run, after in enumerate((300, 450, 350)):
        acked += run_and_kill(db, run, after)
    assert len(acked) >= 1100

    with sqlite3.connect(db) as conn:
        outbox = conn.execute("SELECT seq, key FROM outbox ORDER BY seq").fetchall()
        records = dict(conn.execute("SELECT key, data FROM records").fetchall())
        next_seq = conn.execute("SELECT v FROM meta WHERE k = 'next_change_seq'").fetchone()[0]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    seqs = [seq for seq, _ in outbox]
    assert seqs == list(range(1, len(seqs) + 1)), "outbox sequence has a gap or a duplicate"
    assert next_seq == len(seqs) + 1
    keys = [key for _, key in outbox]
    assert len(set(keys)) == len(keys), "a write was queued twice"
    assert set(keys) == set(records), "records and outbox disagree"

    by_seq = dict(outbox)
    assert len({seq for _, seq in acked}) == len(acked), "two writes acknowledged with one seq"
    for key, seq in acked:
        assert by_seq.get(seq) == key, f"acknowledged write {key} (seq {seq}) is missing"

    async def reopen() -> None:
        # The store opens normally on the killed file and continues the sequence.
        async with open_store(db, "nkill") as store:
            for key, _ in acked[:: max(1, len(acked) // 50)]:
                found = await store.get(COLLECTION, key)
                assert found is not None and found["beneficiary_id"] == key
            assert (await store.backlog())["changes"] == len(seqs)
            (result,) = await store.write([Write(COLLECTION, "after", "upsert", {"v": 1})])
            assert result.seq == len(seqs) + 1

    asyncio.run(reopen())
