"""Issue 9, defect 7: no route sends records unencrypted to another machine unless it says so.

Loading refuses plaintext to any non-loopback host (http:// webhook/REST/token URLs, PostgreSQL
sslmode = "disable", RabbitMQ without TLS) with the route, the setting, the file and the fix;
`insecure_plaintext = true` allows it, and then HQ warns at every start and the inventory shows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hq_server.cli import main
from hq_server.routing.config import load_routes, routes_from_dict
from hq_server.routing.router import Router, describe
from hq_server.routing.state import RouterStore
from hq_server.sinks.plaintext import is_loopback
from hq_server.store import SQLiteHQStore
from protocol.config import ConfigError

WEBHOOK = {"type": "webhook", "secret_env": "X"}
REST = {
    "type": "rest",
    "url_template": "https://crm.example.org/api/{key}",
    "token_url": "https://login.example.org/token",
    "client_id": "hq",
    "client_secret_env": "X",
}
POSTGRES = {"type": "postgres", "database": "d", "user": "u", "table": "t", "payload_column": "p"}
RABBITMQ = {"type": "rabbitmq", "user": "u", "password_env": "X"}

# (sink settings, the setting named in the error, a word of the fix)
PLAINTEXT = {
    "webhook-http": (WEBHOOK | {"url": "http://dashboard.example.org/hook"}, "url", "https://"),
    "webhook-http-private-ip": (WEBHOOK | {"url": "http://10.0.0.7:8080/hook"}, "url", "https://"),
    "rest-record-url": (
        REST | {"url_template": "http://crm.example.org/api/{key}"},
        "url_template",
        "https://",
    ),
    "rest-collection-url": (
        {
            **{k: v for k, v in REST.items() if k != "url_template"},
            "method": "POST",
            "collection_url": "http://crm.example.org/api",
        },
        "collection_url",
        "https://",
    ),
    "rest-token-url": (
        REST | {"token_url": "http://login.example.org/token"},
        "token_url",
        "https",
    ),
    "postgres-disable": (
        POSTGRES | {"host": "db.example.org", "sslmode": "disable"},
        "sslmode",
        "verify-full",
    ),
    "postgres-disable-one-of-many": (
        POSTGRES | {"host": "127.0.0.1,db2.example.org", "sslmode": "disable"},
        "sslmode",
        "verify-full",
    ),
    "rabbitmq-default-no-tls": (RABBITMQ | {"host": "mq.example.org"}, "tls", "tls = true"),
    "rabbitmq-tls-false": (RABBITMQ | {"host": "192.168.1.20", "tls": False}, "tls", "tls = true"),
}

# Connections that stay on this machine, or are encrypted: no flag needed.
ALLOWED = {
    "webhook-127.0.0.1": WEBHOOK | {"url": "http://127.0.0.1:8080/hook"},
    "webhook-127.8.9.10": WEBHOOK | {"url": "http://127.8.9.10/hook"},
    "webhook-ipv6": WEBHOOK | {"url": "http://[::1]:9000/hook"},
    "webhook-localhost": WEBHOOK | {"url": "http://localhost/hook"},
    "webhook-https": WEBHOOK | {"url": "https://dashboard.example.org/hook"},
    "rest-loopback": REST
    | {"url_template": "http://127.0.0.1/api/{key}", "token_url": "http://localhost/token"},
    "postgres-local-disable": POSTGRES | {"host": "localhost", "sslmode": "disable"},
    "postgres-socket": POSTGRES | {"host": "/var/run/postgresql", "sslmode": "disable"},
    "postgres-remote-verified": POSTGRES | {"host": "db.example.org"},
    "rabbitmq-local": RABBITMQ | {"host": "127.0.0.1"},
    "rabbitmq-remote-tls": RABBITMQ | {"host": "mq.example.org", "tls": True, "port": 5671},
}


def config(sink: dict[str, Any], **route: Any) -> dict[str, Any]:
    return {"routes": {"to-target": {"sources": ["beneficiaries"], "sink": sink, **route}}}


@pytest.mark.parametrize("case", sorted(PLAINTEXT))
def test_plaintext_to_a_remote_host_is_refused_naming_route_setting_file_and_fix(
    case: str,
) -> None:
    sink, key, fix = PLAINTEXT[case]
    with pytest.raises(ConfigError) as raised:
        routes_from_dict(config(sink), "/etc/fieldsync/routes.toml")
    message = str(raised.value)
    assert message.startswith("/etc/fieldsync/routes.toml: ")
    assert raised.value.key == f"routes.to-target.sink.{key}"
    assert "route to-target" in message and "unencrypted" in message
    assert fix in message and "insecure_plaintext = true" in message


@pytest.mark.parametrize("case", sorted(PLAINTEXT))
def test_insecure_plaintext_allows_it_and_the_inventory_shows_it(case: str) -> None:
    sink, _, _ = PLAINTEXT[case]
    route = routes_from_dict(config(sink, insecure_plaintext=True)).routes["to-target"]
    shown = describe(route)
    assert shown["insecure_plaintext"] is True
    assert "INSECURE PLAINTEXT" in shown["target"] and shown["plaintext"]


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_loopback_and_encrypted_connections_need_no_flag(case: str) -> None:
    route = routes_from_dict(config(ALLOWED[case])).routes["to-target"]
    assert route.plaintext == ()
    assert describe(route)["insecure_plaintext"] is False
    assert describe(route)["target"] == ALLOWED[case]["type"]


def test_loopback_is_127_slash_8_ipv6_one_and_localhost_only() -> None:
    for host in ("127.0.0.1", "127.255.0.9", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "localhost.example.org", "128.0.0.1", "", None):
        assert not is_loopback(host), host


def test_the_example_routes_are_all_encrypted() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "routes.example.toml"
    routes = load_routes(example).routes
    assert routes and all(r.plaintext == () for r in routes.values())


async def test_hq_warns_at_every_start_for_each_plaintext_route(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("X", "secret-value-0123")
    data = config(PLAINTEXT["webhook-http"][0], insecure_plaintext=True)
    data["routes"]["safe"] = {"sources": ["grants"], "sink": ALLOWED["webhook-https"]}
    routes = routes_from_dict(data)
    async with SQLiteHQStore(tmp_path / "hq.db") as store:
        for start in range(2):
            stop = asyncio.Event()
            stop.set()  # each route stops at once: only the start is exercised
            caplog.clear()
            with caplog.at_level(logging.WARNING, "fieldsync.hq.router"):
                await asyncio.wait_for(Router(routes, RouterStore(store)).run(stop), 10)
            warnings = [r.getMessage() for r in caplog.records if "unencrypted" in r.getMessage()]
            assert len(warnings) == 1, (start, warnings)
            assert "to-target" in warnings[0] and "dashboard.example.org" in warnings[0]
            assert "secret-value-0123" not in caplog.text


def test_the_routes_command_shows_the_setting(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        "[routes.legacy-erp]\n"
        'sources = ["grants"]\n'
        "insecure_plaintext = true\n"
        "[routes.legacy-erp.sink]\n"
        'type = "webhook"\n'
        'url = "http://erp.internal.example.org/hook"\n'
        'secret_env = "ERP_SECRET"\n'
    )
    hq = tmp_path / "hq.toml"
    hq.write_text(f'[hq]\ndata_dir = "{tmp_path / "hq"}"\nroutes_file = "routes.toml"\n')
    result = CliRunner().invoke(main, ["routes", "--config", str(hq), "--format", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    assert entry["insecure_plaintext"] is True
    assert entry["plaintext"] == "http:// to erp.internal.example.org"
    table = CliRunner().invoke(main, ["routes", "--config", str(hq)])
    assert "INSECURE PLAINTEXT" in table.stdout

    routes.write_text(routes.read_text().replace("insecure_plaintext = true\n", ""))
    refused = CliRunner().invoke(main, ["routes", "--config", str(hq)])
    assert refused.exit_code == 2
    assert "routes.toml" in refused.stderr and "routes.legacy-erp.sink.url" in refused.stderr
    assert "insecure_plaintext = true" in refused.stderr
