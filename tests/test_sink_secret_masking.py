"""Issue 9, defect 9: no form of a route's secret reaches anything HQ writes.

Real targets on 127.0.0.1 that echo what they were sent in their error answers -- an OAuth 2.0 token
endpoint echoing the request's `Authorization: Basic ...` header and form body, a REST API echoing
its bearer token or API key, a webhook receiver quoting its own secret in several encodings -- and
the real router with the real sinks and HQ's real SQLite store. Then everything HQ wrote is searched
for every encoding of every secret: the log output (JSON lines, as HQ formats them), the database
files' bytes, the dead letters and the inventory (`fieldsync-hq routes`, `dlq list`, `dlq show`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from aiohttp import web
from click.testing import CliRunner

from hq_server.cli import main
from hq_server.routing.config import load_routes
from hq_server.routing.router import Router
from hq_server.routing.state import RouterStore
from hq_server.sinks.secrets import SecretMask
from hq_server.store import SQLiteHQStore
from protocol.change import Change
from protocol.identity import NodeIdentity
from protocol.logfmt import JSONFormatter

pytestmark = pytest.mark.timeout(60)
DAY_MS = 24 * 3600 * 1000

CLIENT_ID = "fieldsync-hq"
BASIC_SECRET = "cs-Pl@nted/S3cret+Value=42&x"  # route crm-basic: HTTP Basic to the token endpoint
POST_SECRET = "cs-P0st/ed+Secret=99&y%z"  # route crm-post: client_secret in the form body
API_KEY = "ak-Pl@nted+Key/7=="  # route crm-apikey: X-API-Key header
WEBHOOK_SECRET = "whs-Pl@nted/Hook+Secret=1&q"  # route dashboard: HMAC secret
FORM_SECRET = "cs-F0rm/Echo+Secret=7&w"  # route crm-form: in a form body the endpoint echoes
ALL_SECRETS = (BASIC_SECRET, POST_SECRET, API_KEY, WEBHOOK_SECRET, FORM_SECRET)


def encodings(secret: str, user: str | None = CLIENT_ID) -> set[str]:
    """Every way the secret could be written, computed here independently of HQ's mask."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    forms.add(json.dumps(secret)[1:-1])
    for text in list(forms):
        raw = text.encode()
        forms |= {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    if user:
        for pair in (f"{user}:{secret}", f"{quote_plus(user)}:{quote_plus(secret)}"):
            forms |= {base64.b64encode(pair.encode()).decode()}
    return {f.rstrip("=") for f in forms}  # padding may be cut off by an echo


class LeakyTargets:
    """One aiohttp server playing every target, each echoing secrets in its errors."""

    def __init__(self) -> None:
        self.issued: list[str] = []  # access tokens handed out
        self.seen_basic: list[str] = []  # Authorization headers the failing token endpoint saw
        self.seen_form: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/basic/token", self.refusing_token)
        app.router.add_post("/post/token", self.token)
        app.router.add_put("/api/{key}", self.api)
        app.router.add_post("/hook", self.hook)
        return app

    async def refusing_token(self, request: web.Request) -> web.Response:
        """A token endpoint that refuses the client and quotes the request back."""
        body = await request.text()
        header = request.headers.get("Authorization", "")
        self.seen_basic.append(header)
        self.seen_form.append(body)
        echo = {"error": "invalid_client", "authorization": header, "form": body}
        return web.json_response(echo, status=400)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("client_secret") != POST_SECRET:
            body = await request.text()
            return web.json_response({"error": "invalid_client", "form": body}, status=401)
        token = "at-" + secrets.token_urlsafe(18)
        self.issued.append(token)
        return web.json_response({"access_token": token, "token_type": "Bearer"})

    async def api(self, request: web.Request) -> web.Response:
        """Refuses every record (422), quoting the credentials it was sent."""
        auth = request.headers.get("Authorization") or request.headers.get("X-API-Key", "")
        return web.Response(status=422, text=f"unprocessable; you sent credentials {auth!r}")

    async def hook(self, request: web.Request) -> web.Response:
        """A receiver that quotes its own configuration when it refuses a record."""
        planted = (
            f"secret={WEBHOOK_SECRET} url={quote_plus(WEBHOOK_SECRET)} "
            f"b64={base64.b64encode(WEBHOOK_SECRET.encode()).decode()}"
        )
        return web.Response(status=400, text=f"bad record; config: {planted}")


@pytest.fixture
async def targets() -> AsyncIterator[tuple[LeakyTargets, int]]:
    leaky = LeakyTargets()
    runner = web.AppRunner(leaky.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield leaky, runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """HQ's log output as HQ writes it (JSON lines), from every logger, at every level."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("fieldsync"), logging.getLogger("aiohttp")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO if lg is loggers[0] else logging.DEBUG)
    try:
        yield out
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


def routes_file(folder: Path, port: int) -> Path:
    base = f"http://127.0.0.1:{port}"
    retry = "[routes.{name}.retry]\ninitial_s = 0.05\nmax_s = 0.2\nattempts = 2\n"

    def route(name: str, sink: str) -> str:
        head = f'[routes.{name}]\nsources = ["beneficiaries"]\n'
        return head + retry.format(name=name) + f"[routes.{name}.sink]\n{sink}\n"

    text = route(
        "crm-basic",
        f'type = "rest"\nurl_template = "{base}/api/{{key}}"\ntoken_url = "{base}/basic/token"\n'
        f'client_id = "{CLIENT_ID}"\n'
        f'client_secret_file = "{secret_file(folder, "basic.secret", BASIC_SECRET)}"\n',
    )
    text += route(
        "crm-post",
        f'type = "rest"\nurl_template = "{base}/api/{{key}}"\ntoken_url = "{base}/post/token"\n'
        f'client_id = "{CLIENT_ID}"\ntoken_auth = "post"\nclient_secret_env = "CRM_POST_SECRET"\n',
    )
    text += route(
        "crm-form",
        f'type = "rest"\nurl_template = "{base}/api/{{key}}"\ntoken_url = "{base}/basic/token"\n'
        f'client_id = "{CLIENT_ID}"\ntoken_auth = "post"\nclient_secret_env = "CRM_FORM_SECRET"\n',
    )
    text += route(
        "crm-apikey",
        f'type = "rest"\nurl_template = "{base}/api/{{key}}"\napi_key_header = "X-API-Key"\n'
        f'api_key_file = "{secret_file(folder, "api.key", API_KEY)}"\n',
    )
    text += route(
        "dashboard",
        f'type = "webhook"\nurl = "{base}/hook"\nsecret_env = "DASHBOARD_SECRET"\n',
    )
    path = folder / "routes.toml"
    path.write_text(text)
    return path


async def write_records(store: SQLiteHQStore, count: int) -> None:
    node = NodeIdentity.generate()
    issued = await store.create_token("office", DAY_MS, actor="test")
    await store.enroll(issued.token, node.public_key)
    now = int(time.time() * 1000)
    changes = [
        Change(
            "beneficiaries",
            f"BEN-{i}",
            "upsert",
            {"name": f"person {i}"},
            now * 65536 + i,
            0,  # type: ignore[arg-type]
            node.node_id,
            i,
        )
        for i in range(1, count + 1)
    ]
    await store.ingest(node.node_id, 1, changes)


async def run_router_until_settled(routes: Path, store: SQLiteHQStore) -> None:
    """The real router, until crm-basic has its error and the others have dead letters."""
    router_store = RouterStore(store)
    await router_store.open()
    router = Router(load_routes(routes), router_store)
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = await router_store.state("crm-basic")
            form_state = await router_store.state("crm-form")
            dead = [
                await router_store.count_dead_letters(name)
                for name in ("crm-post", "crm-apikey", "dashboard")
            ]
            if state.last_error and form_state.last_error and all(n >= 2 for n in dead):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"routes did not settle: {state.last_error!r}, dead letters {dead}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def cli(*args: str) -> str:
    """The operator's command, in a thread (it runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def test_no_encoding_of_a_secret_reaches_logs_database_dead_letters_or_inventory(
    tmp_path: Path,
    targets: tuple[LeakyTargets, int],
    captured_logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leaky, port = targets
    monkeypatch.setenv("CRM_POST_SECRET", POST_SECRET)
    monkeypatch.setenv("DASHBOARD_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("CRM_FORM_SECRET", FORM_SECRET)
    routes = routes_file(tmp_path, port)
    data_dir = tmp_path / "hq"
    async with SQLiteHQStore(data_dir / "hq.db") as store:
        await write_records(store, 3)
        await run_router_until_settled(routes, store)

    # The targets really echoed: the endpoint saw the Basic header HQ sent, tokens were issued.
    assert leaky.seen_basic and leaky.seen_basic[0].startswith("Basic ")
    assert leaky.issued
    config = tmp_path / "hq.toml"
    config.write_text(f'[hq]\ndata_dir = "{data_dir}"\nroutes_file = "routes.toml"\n')
    inventory = await cli("routes", "--config", str(config), "--format", "json")
    entries = {e["name"]: e for e in json.loads(inventory)}
    assert "token endpoint" in entries["crm-basic"]["last_error"]
    assert "***" in entries["crm-basic"]["last_error"]  # the echo is there, masked
    assert "client_secret=***" in entries["crm-form"]["last_error"]
    assert any(quote_plus(FORM_SECRET) in form for form in leaky.seen_form)
    dead_list = await cli("dlq", "list", "--config", str(config), "--json", "--limit", "1000")
    letters = [json.loads(line) for line in dead_list.splitlines() if line.strip()]
    assert len(letters) >= 6
    shown = [await cli("dlq", "show", "--config", str(config), str(d["id"])) for d in letters]
    assert all("***" in json.loads(s)["error"] for s in shown)

    written = {
        "log": captured_logs.getvalue(),
        "inventory": inventory,
        "dlq list": dead_list,
        "dlq show": "\n".join(shown),
    }
    database = b"".join(p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file())
    assert b"BEN-1" in database  # the files read are the database
    assert "token endpoint" in written["log"] and "422" in written["log"]
    forms = {f for s in ALL_SECRETS for f in encodings(s)}
    forms |= {f for s in ALL_SECRETS for f in encodings(s, None)}
    forms |= {t for t in leaky.issued} | {f"Bearer {t}" for t in leaky.issued}
    leaks = [(where, form) for form in forms for where, text in written.items() if form in text]
    leaks += [("database", form) for form in forms if form.encode() in database]
    assert not leaks, leaks


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "user:", '{"password": "'])
def test_the_mask_hides_a_secret_base64_encoded_inside_any_longer_value(prefix: str) -> None:
    """Base64 of `anything + secret + anything`: at each of the three offsets, what identifies
    the secret is masked; at most two bytes of it stay visible at either edge."""
    mask = SecretMask([BASIC_SECRET])
    encoded = base64.b64encode(f"{prefix}{BASIC_SECRET}-tail".encode()).decode()
    masked = mask(encoded)
    before, star, after = masked.partition("***")
    assert star, masked
    # what stays visible: the prefix's own groups plus at most one group mixing in the secret
    assert len(before) <= (len(prefix.encode()) // 3 + 1) * 4, masked
    assert len(after) <= len(base64.b64encode(b"-tail")) + 4, masked


def test_the_mask_leaves_ordinary_text_and_short_values_alone() -> None:
    mask = SecretMask(["abc", BASIC_SECRET])
    text = "HTTP 400: abc is not a valid grant; see https://example.org/docs"
    assert mask(text) == text
