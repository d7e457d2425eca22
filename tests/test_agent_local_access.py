"""Who may use the agent's local API (issue 9, defect 3), against the real daemon on 127.0.0.1.

A page in the laptop's browser must not be able to write (a cross-site `text/plain` POST needs no
preflight) or read (DNS rebinding points evil.example at 127.0.0.1): every request carries the
bearer token from `<data_dir>/api-token`, the Host header names a loopback address, a foreign
Origin is refused and writes declare a JSON or NDJSON body.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_fixtures import COLLECTION, KEY_FIELD, FakeHQ, base_url, beneficiary, serve
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.capture.guard import TOKEN_ENV, TOKEN_PREFIX, client_token, ensure_token
from agent.config import AgentConfig, load_agent_config
from agent.service import open_agent, run_agent
from protocol.config import ConfigError, build
from protocol.identity import NodeIdentity

BULK = f"/v1/collections/{COLLECTION}/bulk"
RECORDS = f"/v1/collections/{COLLECTION}/records"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_config(tmp_path: Path, port: int, **agent: Any) -> AgentConfig:
    table = {
        "agent": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{port}", **agent},
        "sync": {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "pull_interval_s": 0.2},
        "collections": {COLLECTION: {"key": KEY_FIELD}},
    }
    return build(AgentConfig, table, "test.toml")


@dataclass
class Daemon:
    config: AgentConfig
    url: str
    session: aiohttp.ClientSession

    @property
    def token(self) -> str:
        return self.config.agent.data_dir.joinpath("api-token").read_text().strip()

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        token: str | None = "file",
        content_type: str | None = "application/json",
        **headers: str,
    ) -> tuple[int, Any]:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            sent["Authorization"] = f"Bearer {self.token if token == 'file' else token}"
        if content_type is not None:
            sent["Content-Type"] = content_type
        async with self.session.request(method, self.url + path, data=body, headers=sent) as r:
            text = await r.text()
            assert "Traceback" not in text
            return r.status, json.loads(text) if text else None

    async def count(self) -> int:
        status, body = await self.call("GET", RECORDS + "?limit=1000")
        assert status == 200, body
        return len(body["records"])


async def _wait_ready(config: AgentConfig, daemon: asyncio.Task[None]) -> None:
    # The daemon prints its address once it listens; here we poll the port.
    host, _, port = config.agent.listen.rpartition(":")
    async with asyncio.timeout(10):
        while True:
            assert not daemon.done(), daemon.exception()
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.02)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    config = agent_config(tmp_path, free_port())
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    hq = FakeHQ(agent=identity)
    async with serve(hq.app()) as server, aiohttp.ClientSession() as session:
        hq.enrolment(base_url(server)).save(config.enrolment_path)
        stop = asyncio.Event()
        task = asyncio.create_task(run_agent(config, stop))
        await _wait_ready(config, task)
        try:
            yield Daemon(config, f"http://{config.agent.listen}", session)
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await task


def ndjson(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


# ---- the attacks of the issue, reproduced -------------------------------------------------------


async def test_a_cross_site_text_plain_bulk_post_without_token_stores_nothing(
    daemon: Daemon,
) -> None:
    """What a form on any web page can send without a CORS preflight."""
    status, body = await daemon.call(
        "POST",
        BULK,
        ndjson(beneficiary(1)),
        token=None,
        content_type="text/plain",
        Origin="http://evil.example",
    )
    assert status in (401, 403), body
    status, body = await daemon.call("POST", BULK, ndjson(beneficiary(1)), token=None)
    assert status == 401, body
    assert body["error"] == "unauthorized"
    assert str(daemon.config.agent.data_dir / "api-token") in body["message"]
    assert await daemon.count() == 0


async def test_dns_rebinding_a_foreign_host_header_is_refused(daemon: Daemon) -> None:
    await daemon.call("PUT", f"{RECORDS}/b00001", json.dumps(beneficiary(1)).encode())
    # The token is right here: the Host check stands alone (a rebinding page has no token either).
    status, body = await daemon.call("GET", f"{RECORDS}/b00001", Host="evil.example:8470")
    assert status == 403, body
    assert body["error"] == "host_not_allowed" and "evil.example" in body["message"]
    for host in ("127.0.0.1", "localhost", "127.8.9.10:1", f"{daemon.config.agent.listen}"):
        status, body = await daemon.call("GET", f"{RECORDS}/b00001", Host=host)
        assert status == 200, (host, body)


async def test_a_foreign_origin_is_refused_even_with_the_token(daemon: Daemon) -> None:
    port = daemon.config.agent.listen.rpartition(":")[2]
    record = json.dumps(beneficiary(2)).encode()
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}"):
        status, body = await daemon.call("PUT", f"{RECORDS}/b00002", record, Origin=origin)
        assert status == 403, (origin, body)
        assert body["error"] == "origin_not_allowed" and origin in body["message"]
    assert await daemon.count() == 0
    own = f"http://{daemon.config.agent.listen}"
    status, body = await daemon.call("PUT", f"{RECORDS}/b00002", record, Origin=own)
    assert status == 200, body


async def test_writes_need_a_json_or_ndjson_content_type(daemon: Daemon) -> None:
    record = json.dumps(beneficiary(3)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        status, body = await daemon.call(
            "PUT", f"{RECORDS}/b00003", record, content_type=content_type
        )
        assert status == 415, (content_type, body)
        assert "application/json" in body["message"]
    assert await daemon.count() == 0
    status, body = await daemon.call(
        "POST", BULK, ndjson(beneficiary(3), beneficiary(4)), content_type="application/x-ndjson"
    )
    assert (status, body["accepted"]) == (200, 2), body
    status, body = await daemon.call(
        "PUT", f"{RECORDS}/b00005", json.dumps(beneficiary(5)).encode(),
        content_type="application/json; charset=utf-8",
    )  # fmt: skip
    assert status == 200, body
    status, body = await daemon.call("DELETE", f"{RECORDS}/b00005", content_type=None)
    assert status == 415, body
    assert await daemon.count() == 3


async def test_a_wrong_or_malformed_token_is_refused(daemon: Daemon) -> None:
    for token in ("fsl_wrong", daemon.token + "x", daemon.token[:-1], ""):
        status, body = await daemon.call("GET", "/v1/status", token=token)
        assert status == 401, (token, body)
        assert daemon.token not in json.dumps(body)
    async with daemon.session.get(
        daemon.url + "/v1/status", headers={"Authorization": "Basic " + daemon.token}
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    status, body = await daemon.call("GET", "/v1/status")
    assert status == 200 and body["node_id"]
    # Every route is behind the check, including the review routes and unknown paths.
    for path in ("/v1/conflicts", "/v1/errors", "/v1/nothing-here"):
        assert (await daemon.call("GET", path, token=None))[0] == 401


# ---- the token file -----------------------------------------------------------------------------


async def test_run_creates_a_missing_token_0600_and_logs_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent set up before tokens existed (an upgrade) gets one at its first `run`."""
    config = agent_config(tmp_path, free_port())
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    hq = FakeHQ(agent=identity)
    path = config.agent.data_dir / "api-token"
    assert not path.exists()
    async with serve(hq.app()) as server:
        hq.enrolment(base_url(server)).save(config.enrolment_path)
        stop = asyncio.Event()
        with caplog.at_level(logging.INFO, "fieldsync.agent"):
            task = asyncio.create_task(run_agent(config, stop))
            await _wait_ready(config, task)
            stop.set()
            await asyncio.wait_for(task, 10)
    token = path.read_text().strip()
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert token not in caplog.text  # where it is, never what it is
    assert ensure_token(path) == (token, False)  # kept as it is at the next start


def test_a_token_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    _, created = ensure_token(path)
    assert created
    path.chmod(0o644)
    with pytest.raises(PermissionError, match=f"chmod 600 {path}"):
        ensure_token(path)


def test_apps_read_the_token_from_the_environment_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = ensure_token(tmp_path / "api-token")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert client_token(tmp_path) == token
    monkeypatch.setenv(TOKEN_ENV, "fsl_from_the_environment")
    assert client_token(tmp_path) == "fsl_from_the_environment"


# ---- listening beyond loopback -----------------------------------------------------------------


def write_toml(tmp_path: Path, agent: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndata_dir = "data"\n{agent}\n')
    return path


@pytest.mark.parametrize(
    ("agent", "needles"),
    [
        ('listen = "0.0.0.0:8470"', ["agent.listen", "allow_remote = true", "agent.toml"]),
        ('listen = "192.0.2.7:8470"', ["agent.listen", "allow_remote = true"]),
        ('listen = "[::]:8470"', ["agent.listen", "allow_remote = true"]),
        ('listen = "fieldsync.example:8470"', ["agent.listen", "allow_remote = true"]),
        ('listen = "0.0.0.0:8470"\nallow_remote = true', ["agent.tls_cert", "agent.toml"]),
        (
            'listen = "0.0.0.0:8470"\nallow_remote = true\ntls_cert = "c.pem"',
            ["agent.tls_key", "agent.toml"],
        ),
    ],
)
def test_a_remote_listen_address_needs_allow_remote_and_tls(
    tmp_path: Path, agent: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write_toml(tmp_path, agent))
    for needle in needles:
        assert needle in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.5:8470", "localhost:8470", "[::1]:0"])
def test_loopback_listen_addresses_need_nothing_more(tmp_path: Path, listen: str) -> None:
    config = load_agent_config(write_toml(tmp_path, f'listen = "{listen}"'))
    assert config.agent.listen == listen and not config.agent.allow_remote


async def test_an_in_memory_config_is_checked_again_when_the_daemon_starts(
    tmp_path: Path,
) -> None:
    config = agent_config(tmp_path, 0)
    remote = build(
        AgentConfig, {"agent": {"data_dir": str(tmp_path / "d"), "listen": "0.0.0.0:0"}}, "x.toml"
    )
    assert config.agent.listen.startswith("127.")
    with pytest.raises(ConfigError, match="allow_remote"):
        await run_agent(remote, asyncio.Event())


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "agent-cert.pem", tmp_path / "agent-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_allow_remote_serves_https_with_the_token_and_any_host(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    config = agent_config(tmp_path, port, allow_remote=True, tls_cert=str(cert), tls_key=str(key))
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    hq = FakeHQ(agent=identity)
    context = ssl.create_default_context(cafile=str(cert))
    async with serve(hq.app()) as server, aiohttp.ClientSession() as session:
        hq.enrolment(base_url(server)).save(config.enrolment_path)
        stop = asyncio.Event()
        task = asyncio.create_task(run_agent(config, stop))
        try:
            await _wait_ready(config, task)
            d = Daemon(config, f"https://127.0.0.1:{port}", session)
            token = d.token
            url = f"{d.url}/v1/status"
            headers = {"Authorization": f"Bearer {token}", "Host": f"field-server.lan:{port}"}
            async with session.get(url, headers=headers, ssl=context) as response:
                assert response.status == 200, await response.text()
            async with session.get(url, ssl=context) as response:
                assert response.status == 401
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/v1/status", headers=headers):
                    pass
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_the_token_survives_restarts_and_stores_nothing_else(tmp_path: Path) -> None:
    config = agent_config(tmp_path, free_port())
    NodeIdentity.generate().save(config.key_path)
    path = config.agent.data_dir / "api-token"
    first, created = ensure_token(path)
    assert created
    async with open_agent(config):
        pass
    assert ensure_token(path) == (first, False)


async def test_a_tls_key_others_can_read_stops_the_daemon_with_the_fix(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    key.chmod(0o644)
    config = agent_config(tmp_path, 0, allow_remote=True, tls_cert=str(cert), tls_key=str(key))
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    FakeHQ(agent=identity).enrolment("http://127.0.0.1:9").save(config.enrolment_path)
    with pytest.raises(ConfigError) as caught:
        await run_agent(config, asyncio.Event())
    assert f"chmod 600 {key}" in str(caught.value) and "agent.tls_key" in str(caught.value)
