"""HTTP plumbing: health, JSON errors everywhere, no tracebacks to clients, HTTPS, the runner."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hq_fixtures import make_config, running_hq

from hq_server.app import ServeError, serve
from hq_server.config import HQConfig
from protocol.hlc import system_ms
from protocol.transport import sign_request


async def test_health(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        response = await hq.client.get("/v1/health")
        assert response.status == 200
        assert await response.json() == {"ok": True}


async def test_unknown_route_and_method_are_json(tmp_path: Path) -> None:
    async with running_hq(tmp_path) as hq:
        response = await hq.client.get("/v1/nothing")
        assert (response.status, (await response.json())["error"]) == (404, "not_found")
        response = await hq.client.get("/v1/batches")
        assert response.status == 405
        assert (await response.json())["error"] == "method_not_allowed"


async def test_unexpected_error_is_500_json_with_traceback_only_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_hq(tmp_path) as hq:
        node = await hq.enroll()

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(hq.store, "feed", broken)
        path_qs = "/v1/changes?cursor=0"
        with caplog.at_level(logging.INFO, logger="fieldsync"):
            response = await hq.client.get(
                path_qs, headers=sign_request(node, "GET", path_qs, system_ms())
            )
            text = await response.text()
        assert response.status == 500
        assert (await response.json())["error"] == "internal"
        assert "secret internal detail" not in text
        assert "Traceback" not in text
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors
        assert errors[0].exc_info is not None
        outcome = [r for r in caplog.records if r.getMessage() == "request"]
        assert outcome[-1].fields["status"] == 500  # type: ignore[attr-defined]


async def test_request_log_line_has_outcome_fields_but_no_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_hq(tmp_path) as hq:
        token = await hq.token()
        with caplog.at_level(logging.INFO, logger="fieldsync"):
            await hq.client.post("/v1/enroll", json={"token": token, "public_key": "AAAA"})
        lines = [r for r in caplog.records if r.getMessage() == "request"]
        assert lines[-1].fields["status"] == 400  # type: ignore[attr-defined]
        assert all(token not in str(getattr(r, "fields", "")) for r in caplog.records)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

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
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def _serving(config: HQConfig) -> tuple[asyncio.Task[None], asyncio.Event, str]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, on_ready=ready.set_result))
    url = await asyncio.wait_for(asyncio.shield(ready), 20)
    return task, stop, url


async def test_serve_over_https_and_stop(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = make_config(tmp_path, tls_cert=str(cert), tls_key=str(key))
    task, stop, url = await _serving(config)
    try:
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/v1/health", ssl=context) as response,
        ):
            assert await response.json() == {"ok": True}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_serve_reports_unusable_tls_files_and_busy_ports(tmp_path: Path) -> None:
    config = make_config(tmp_path, tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "k"))
    with pytest.raises(ServeError, match="tls_cert"):
        await serve(config, asyncio.Event())
    first = make_config(tmp_path / "a")
    task, stop, url = await _serving(first)
    try:
        port = url.rsplit(":", 1)[1]
        second = make_config(tmp_path / "b", listen=f"127.0.0.1:{port}")
        with pytest.raises(ServeError, match=r"hq\.listen"):
            await serve(second, asyncio.Event())
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
