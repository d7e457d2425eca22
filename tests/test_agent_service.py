"""agent.service.run_agent: the daemon as one asyncio process, against the fake HQ.

A record written to the local API reaches HQ without any other step; setting the stop event (what
SIGTERM does) shuts the daemon down in order; a restart resumes from the same database.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from agent_fixtures import COLLECTION, KEY_FIELD, FakeHQ, base_url, beneficiary, serve

from agent.config import AgentConfig
from agent.service import NotInitialised, open_agent, run_agent
from protocol.config import build
from protocol.identity import NodeIdentity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(tmp_path: Path, port: int) -> AgentConfig:
    table = {
        "agent": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{port}"},
        "sync": {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "pull_interval_s": 0.1},
        "collections": {COLLECTION: {"key": KEY_FIELD}},
    }
    return build(AgentConfig, table, "test.toml")


def api_headers(config: AgentConfig) -> dict[str, str]:
    """What an app sends: the token the daemon keeps in its data folder (issue 9, defect 3)."""
    token = config.token_path.read_text().strip() if config.token_path.exists() else ""
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


async def wait_for(url: str, session: aiohttp.ClientSession, config: AgentConfig) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                async with session.get(url, headers=api_headers(config)) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)


async def test_the_daemon_captures_forwards_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = daemon_config(tmp_path, port)
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    hq = FakeHQ(agent=identity)
    api = f"http://127.0.0.1:{port}"
    async with serve(hq.app()) as server, aiohttp.ClientSession() as session:
        hq.enrolment(base_url(server)).save(config.enrolment_path)
        for run in range(2):  # the second run resumes on the same database
            stop = asyncio.Event()
            daemon = asyncio.create_task(run_agent(config, stop))
            await wait_for(f"{api}/v1/status", session, config)
            for i in range(run * 10, run * 10 + 10):
                async with session.post(
                    f"{api}/v1/collections/{COLLECTION}/records",
                    json=beneficiary(i),
                    headers=api_headers(config),
                ) as response:
                    assert response.status == 201
            async with asyncio.timeout(10):
                while len(hq.applied) < run * 10 + 10:
                    await asyncio.sleep(0.02)
            async with session.get(f"{api}/v1/status", headers=api_headers(config)) as response:
                status = await response.json()
            stop.set()
            async with asyncio.timeout(10):
                await daemon
            assert status["node_id"] == identity.node_id
        assert sorted(seq for _, seq in hq.applied) == list(range(1, 21))
        assert hq.duplicates == [] and hq.acked_through >= 2
    async with open_agent(config) as agent:
        assert await agent.store.backlog() == {
            "changes": 0,
            "bytes": 0,
            "batches": 0,
            "batch_bytes": 0,
        }
        assert await agent.store.count(COLLECTION) == 20


async def test_a_daemon_without_key_or_enrolment_says_what_to_run(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, free_port())
    with pytest.raises(NotInitialised, match="fieldsync-agent init"):
        await run_agent(config, asyncio.Event())
    NodeIdentity.generate().save(config.key_path)
    with pytest.raises(NotInitialised, match="fieldsync-agent enroll"):
        await run_agent(config, asyncio.Event())
