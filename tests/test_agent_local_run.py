"""`fieldsync-agent run` as a real process: what a new user meets (issue 9, defect 10).

A busy port is one clean line, not a 52-line ExceptionGroup traceback; a second agent on the same
data folder is refused (it would sign with the same node key), naming the folder and the PID of
the agent that holds it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fixtures import make_config

from agent.enrolment import Enrolment
from agent.service import FolderInUse, run_agent
from protocol.files import hold_lock
from protocol.identity import NodeIdentity

BIN = Path(sys.executable).parent / "fieldsync-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enrolled_config(tmp_path: Path, port: int, name: str = "agent.toml") -> Path:
    """An initialised agent enrolled with an HQ that does not exist (run does not need it)."""
    path = tmp_path / name
    path.write_text(
        f'[agent]\ndata_dir = "data"\nlisten = "127.0.0.1:{port}"\nlog_level = "error"\n'
        "[sync]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.1\n"
        '[collections.beneficiaries]\nkey = "beneficiary_id"\n'
    )
    done = subprocess.run([BIN, "init", "--config", path], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    identity = NodeIdentity.load(tmp_path / "data" / "node.key")
    hq = NodeIdentity.generate()
    Enrolment(f"http://127.0.0.1:{free_port()}", identity.node_id, hq.node_id, hq.public_key).save(
        tmp_path / "data" / "hq.json"
    )
    return path


def run(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN, "run", "--config", config], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    config = enrolled_config(tmp_path, free_port())
    proc = subprocess.Popen([BIN, "run", "--config", config], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert "listening on" in proc.stdout.readline()
    try:
        yield config, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_a_busy_port_is_one_clean_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(enrolled_config(tmp_path, port))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fieldsync-agent: agent.listen: cannot listen on 127.0.0.1:")
    assert "in use" in lines[0] and "Traceback" not in done.stderr


def test_a_second_agent_on_the_same_data_folder_is_refused(
    running: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    config, first = running
    # Another config file, another port, the same folder: what happened with two agents started
    # from one working folder.
    other = tmp_path / "other.toml"
    text = config.read_text()
    port = text.split('listen = "127.0.0.1:')[1].split('"')[0]
    other.write_text(text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    done = run(other)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert str(tmp_path / "data") in line and f"PID {first.pid}" in line
    assert first.poll() is None  # the first agent is untouched


async def test_the_lock_is_held_for_the_daemons_life_and_released(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    NodeIdentity.generate().save(config.key_path)
    lock = config.agent.data_dir / "agent.lock"
    with hold_lock(lock, "fieldsync-agent"), pytest.raises(FolderInUse) as caught:
        await run_agent(config, asyncio.Event())
    assert str(caught.value) == (
        f"{config.agent.data_dir} is in use by another fieldsync-agent (PID {os.getpid()}): "
        "stop it, or give this agent its own agent.data_dir"
    )
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    with hold_lock(lock, "fieldsync-agent"):
        pass  # released: taken again at once
