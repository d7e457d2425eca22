"""The REST sink against a real CRM-like API on 127.0.0.1 (aiohttp), with its own OAuth 2.0 token
endpoint on the same server, through a fault proxy.

The API upserts rows by key (PUT to /api/beneficiaries/{key} or POST to /api/beneficiaries with
the key in the body), deletes by key (404 if absent), requires an Idempotency-Key on every write,
and authenticates with an API key or with bearer tokens it issued itself. It provides the
`rest-apikey` and `rest-oauth2` conformance harnesses.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sink_harness import items, outgoing
from sink_harness_registry import register_harness
from sink_proxy import FaultProxy

from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outgoing
from hq_server.sinks.rest import RestSettings, RestSink
from hq_server.sinks.secrets import SecretError
from protocol.config import ConfigError, build, documented_keys

pytestmark = pytest.mark.timeout(30)
API_KEY = "ak-conformance-7d1e0f22"
CLIENT_ID = "fieldsync-hq"
CLIENT_SECRET = "cs-conformance-93ab41c8"
BASE = "/api/beneficiaries"


@dataclass
class FakeApi:
    """A small REST API with the auth and failure knobs the tests need."""

    api_key: tuple[str, str] | None = None  # (header, value)
    client_secret: str | None = None  # OAuth 2.0 on: the only client is CLIENT_ID
    token_lifetime_s: float = 3600
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # method, key, idem. key
    statuses: list[int] = field(default_factory=list)  # every API answer, in order
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    issued: list[str] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    token_answer: tuple[int, str] | None = None  # forced token endpoint answer
    answer_for: dict[str, tuple[int, str]] = field(default_factory=dict)
    refuse_all_tokens: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put(BASE + "/{key}", self.put)
        app.router.add_delete(BASE + "/{key}", self.delete)
        app.router.add_post(BASE, self.post)
        app.router.add_post("/oauth/token", self.token)
        return app

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    # -- auth

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        if self.token_answer is not None:
            status, text = self.token_answer
            return web.Response(status=status, text=text)
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            client_id, secret = unquote_plus(user), unquote_plus(password)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if (client_id, secret) != (CLIENT_ID, self.client_secret):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = "at-" + secrets.token_hex(12)
        self.tokens[token] = time.monotonic() + self.token_lifetime_s
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}
        )

    def _authorised(self, request: web.Request) -> bool:
        if self.api_key is not None:
            header, value = self.api_key
            return request.headers.get(header) == value
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expiry = self.tokens.get(token)
        fresh = expiry is not None and time.monotonic() < expiry
        return scheme == "Bearer" and fresh and not self.refuse_all_tokens

    async def _write(self, request: web.Request, method: str, key: str) -> web.Response | None:
        """Common checks; a Response to answer with, or None to go on."""
        if not self._authorised(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        idempotency_key = request.headers.get("Idempotency-Key")
        if not idempotency_key:
            return web.json_response({"error": "Idempotency-Key is required"}, status=400)
        if key in self.answer_for:
            status, text = self.answer_for[key]
            return web.Response(status=status, text=text)
        self.writes.append((method, key, idempotency_key))
        return None

    async def _answer(self, request: web.Request, method: str, key: str) -> web.Response:
        refusal = await self._write(request, method, key)
        if refusal is not None:
            self.statuses.append(refusal.status)
            return refusal
        if method == "DELETE":
            status = 204 if self.rows.pop(key, None) is not None else 404
        else:
            body = await request.json()
            status = 200 if key in self.rows else 201
            self.rows[key] = body
        self.statuses.append(status)
        return web.Response(status=status)

    # -- resources

    async def put(self, request: web.Request) -> web.Response:
        return await self._answer(request, "PUT", request.match_info["key"])

    async def delete(self, request: web.Request) -> web.Response:
        return await self._answer(request, "DELETE", request.match_info["key"])

    async def post(self, request: web.Request) -> web.Response:
        body = await request.json()
        return await self._answer(request, "POST", str(body.get("id", "")))


class RestHarness:
    """Conformance harness: the API's rows are the target; 'unavailable' resets connections."""

    def __init__(
        self, name: str, api: FakeApi, proxy: FaultProxy, make: Callable[[str], RestSettings]
    ) -> None:
        self.name, self.api, self.proxy, self._make = name, api, proxy, make

    @property
    def secrets(self) -> tuple[str, ...]:
        known = [API_KEY] if self.api.api_key else [CLIENT_SECRET]
        return (*known, *self.api.issued)

    def settings(self) -> RestSettings:
        return self._make(self.proxy.url())

    async def make_sink(self) -> RestSink:
        sink = RestSink(self.settings())
        await sink.open()
        return sink

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self.api.rows.items())

    async def current(self) -> dict[str, dict[str, Any]]:
        return dict(self.api.rows)

    async def set_available(self, available: bool) -> None:
        self.proxy.set_mode("pass" if available else "reset")

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        key = f"{base.target_key}-invalid"
        self.api.answer_for[key] = (422, '{"error": "amount must be positive"}')
        return replace(
            base, target_key=key, source_key=key, idempotency_key=base.idempotency_key + ":i"
        )

    async def cleanup(self) -> None:
        await self.proxy.stop()


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def rest_api_server() -> AsyncIterator[tuple[FakeApi, FaultProxy]]:
    api = FakeApi()
    server = TestServer(api.app(), host="127.0.0.1", port=0)
    await server.start_server()
    proxy = await FaultProxy("127.0.0.1", server.port or 0).start()
    try:
        yield api, proxy
    finally:
        await proxy.stop()
        await server.close()


@register_harness("rest-apikey", uses=(rest_api_server,))
@pytest.fixture
def rest_apikey_harness(
    rest_api_server: tuple[FakeApi, FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> RestHarness:
    api, proxy = rest_api_server
    api.api_key = ("X-API-Key", API_KEY)
    monkeypatch.setenv("FIELDSYNC_TEST_CRM_KEY", API_KEY)

    def make(base: str) -> RestSettings:
        return RestSettings(
            url_template=base.rstrip("/") + BASE + "/{key}",
            api_key_header="X-API-Key",
            api_key_env="FIELDSYNC_TEST_CRM_KEY",
            timeout_s=3,
        )

    return RestHarness("rest-apikey", api, proxy, make)


@register_harness("rest-oauth2", uses=(rest_api_server,))
@pytest.fixture
def rest_oauth2_harness(rest_api_server: tuple[FakeApi, FaultProxy], tmp_path: Path) -> RestHarness:
    api, proxy = rest_api_server
    api.client_secret = CLIENT_SECRET
    secret_file = write_secret(tmp_path / "client.secret", CLIENT_SECRET)

    def make(base: str) -> RestSettings:
        return RestSettings(
            method="POST",
            collection_url=base.rstrip("/") + BASE,
            url_template=base.rstrip("/") + BASE + "/{key}",
            key_field="id",
            token_url=base.rstrip("/") + "/oauth/token",
            client_id=CLIENT_ID,
            client_secret_file=secret_file,
            scope="beneficiaries:write",
            timeout_s=3,
        )

    return RestHarness("rest-oauth2", api, proxy, make)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def statuses(outcomes: list[Any]) -> list[Delivery]:
    return [o.status for o in outcomes]


# -- upserts and deletes


async def test_put_quotes_the_key_completely(rest_apikey_harness: RestHarness) -> None:
    sink = await rest_apikey_harness.make_sink()
    key = "BEN/42 ?#%ü"
    try:
        outcomes = await sink.send([outgoing(1, key=key, payload={"id": key, "n": 1})])
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED]
    assert rest_apikey_harness.api.rows == {key: {"id": key, "n": 1}}


async def test_post_puts_the_key_in_key_field(rest_oauth2_harness: RestHarness) -> None:
    sink = await rest_oauth2_harness.make_sink()
    try:
        outcomes = await sink.send([outgoing(1, key="BEN-1", payload={"id": "stale", "n": 1})])
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.DELIVERED]
    assert rest_oauth2_harness.api.rows == {"BEN-1": {"id": "BEN-1", "n": 1}}


async def test_delete_removes_and_a_missing_record_counts_as_deleted(
    rest_apikey_harness: RestHarness,
) -> None:
    api = rest_apikey_harness.api
    sink = await rest_apikey_harness.make_sink()
    delete = replace(outgoing(9, key="rec-0001"), op="delete", payload={})
    try:
        assert statuses(await sink.send(items(2))) == [Delivery.DELIVERED] * 2
        assert statuses(await sink.send([delete])) == [Delivery.DELIVERED]
        assert statuses(await sink.send([delete])) == [Delivery.DELIVERED]  # 404: already gone
    finally:
        await sink.close()
    assert list(api.rows) == ["rec-0002"]
    assert api.statuses[-2:] == [204, 404]
    assert [w[0] for w in api.writes] == ["PUT", "PUT", "DELETE", "DELETE"]


async def test_delete_without_url_template_is_rejected(rest_oauth2_harness: RestHarness) -> None:
    settings = replace(rest_oauth2_harness.settings(), url_template=None)
    sink = RestSink(settings)
    delete = replace(outgoing(1), op="delete", payload={})
    try:
        outcomes = await sink.send([delete, outgoing(2)])
    finally:
        await sink.close()
    assert statuses(outcomes) == [Delivery.REJECTED, Delivery.DELIVERED]
    assert "url_template" in outcomes[0].detail


async def test_idempotency_key_is_always_sent(rest_apikey_harness: RestHarness) -> None:
    sink = await rest_apikey_harness.make_sink()
    run = [*items(2), replace(outgoing(3, key="rec-0001"), op="delete", payload={})]
    try:
        assert statuses(await sink.send(run)) == [Delivery.DELIVERED] * 3
    finally:
        await sink.close()
    assert [w[2] for w in rest_apikey_harness.api.writes] == [i.idempotency_key for i in run]


@pytest.mark.parametrize(
    ("status", "expected", "down"),
    [
        (408, Delivery.ERRORED, True),
        (429, Delivery.ERRORED, True),
        (500, Delivery.ERRORED, False),
        (503, Delivery.ERRORED, True),
        (400, Delivery.REJECTED, False),
        (404, Delivery.REJECTED, False),
        (422, Delivery.REJECTED, False),
    ],
)
async def test_status_classification(
    rest_apikey_harness: RestHarness, status: int, expected: Delivery, down: bool
) -> None:
    rest_apikey_harness.api.answer_for["rec-0001"] = (status, "no " * 150)
    sink = await rest_apikey_harness.make_sink()
    try:
        outcomes = await sink.send(items(2))
    finally:
        await sink.close()
    assert outcomes[0].status is expected
    assert outcomes[0].target_down is down
    assert outcomes[0].detail == f"HTTP {status}: {('no ' * 150).strip()[:200]}"
    second = NOT_ATTEMPTED.status if expected is Delivery.ERRORED else Delivery.DELIVERED
    assert outcomes[1].status is second


async def test_a_wrong_api_key_stalls_the_route_without_dead_lettering(
    rest_apikey_harness: RestHarness,
) -> None:
    rest_apikey_harness.api.api_key = ("X-API-Key", "something else")
    sink = await rest_apikey_harness.make_sink()
    try:
        (outcome,) = await sink.send(items(1))
    finally:
        await sink.close()
    assert outcome.status is Delivery.ERRORED and outcome.target_down and "401" in outcome.detail
    assert API_KEY not in outcome.detail


# -- OAuth 2.0


async def test_one_token_serves_many_items(rest_oauth2_harness: RestHarness) -> None:
    api = rest_oauth2_harness.api
    sink = await rest_oauth2_harness.make_sink()
    try:
        assert statuses(await sink.send(items(5))) == [Delivery.DELIVERED] * 5
        assert statuses(await sink.send(items(5, start=6))) == [Delivery.DELIVERED] * 5
    finally:
        await sink.close()
    assert len(api.token_requests) == 1
    assert api.token_requests[0] == {
        "grant_type": "client_credentials",
        "scope": "beneficiaries:write",
    }  # the client authenticated with HTTP Basic, not in the form
    assert len(api.rows) == 10


async def test_client_secret_in_the_form_when_asked(rest_oauth2_harness: RestHarness) -> None:
    sink = RestSink(replace(rest_oauth2_harness.settings(), token_auth="post", scope=None))
    try:
        assert statuses(await sink.send(items(1))) == [Delivery.DELIVERED]
    finally:
        await sink.close()
    assert rest_oauth2_harness.api.token_requests == [
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    ]


async def test_a_401_fetches_a_new_token_once(rest_oauth2_harness: RestHarness) -> None:
    api = rest_oauth2_harness.api
    sink = await rest_oauth2_harness.make_sink()
    try:
        assert statuses(await sink.send(items(1))) == [Delivery.DELIVERED]
        api.revoke_tokens()  # e.g. the API restarted and forgot its tokens
        assert statuses(await sink.send(items(2, start=2))) == [Delivery.DELIVERED] * 2
    finally:
        await sink.close()
    assert len(api.token_requests) == 2
    assert api.statuses == [201, 401, 201, 201]


async def test_a_second_401_leaves_the_item_errored(rest_oauth2_harness: RestHarness) -> None:
    api = rest_oauth2_harness.api
    api.refuse_all_tokens = True
    sink = await rest_oauth2_harness.make_sink()
    try:
        outcomes = await sink.send(items(3))
    finally:
        await sink.close()
    assert outcomes[0].status is Delivery.ERRORED and outcomes[0].target_down
    assert "401" in outcomes[0].detail and "new access token" in outcomes[0].detail
    assert outcomes[1:] == [NOT_ATTEMPTED] * 2
    assert len(api.token_requests) == 2  # the first token, one refresh: no storm
    assert api.statuses == [401, 401]


async def test_an_expiring_token_is_replaced_before_use(rest_oauth2_harness: RestHarness) -> None:
    api = rest_oauth2_harness.api
    api.token_lifetime_s = 60
    clock = Clock()
    sink = RestSink(rest_oauth2_harness.settings(), clock=clock)
    try:
        assert statuses(await sink.send(items(1))) == [Delivery.DELIVERED]
        clock.now += 50  # within the refresh margin (6 s of a 60 s token): still used
        assert statuses(await sink.send(items(1, start=2))) == [Delivery.DELIVERED]
        assert len(api.token_requests) == 1
        clock.now += 5  # 55 s: inside the margin, so a new token is fetched first
        assert statuses(await sink.send(items(1, start=3))) == [Delivery.DELIVERED]
    finally:
        await sink.close()
    assert len(api.token_requests) == 2
    assert 401 not in api.statuses


@pytest.mark.parametrize(
    "answer", [(503, "maintenance"), (401, '{"error": "invalid_client"}'), (200, "not json")]
)
async def test_token_endpoint_failures_are_transient(
    rest_oauth2_harness: RestHarness, answer: tuple[int, str]
) -> None:
    api = rest_oauth2_harness.api
    api.token_answer = answer
    sink = await rest_oauth2_harness.make_sink()
    try:
        outcomes = await sink.send(items(2))
        assert outcomes[0].status is Delivery.ERRORED and "token endpoint" in outcomes[0].detail
        assert outcomes[0].target_down  # the credentials, not the item: no retry budget spent
        assert outcomes[1] == NOT_ATTEMPTED
        assert api.writes == []
        api.token_answer = None
        assert statuses(await sink.send(items(2))) == [Delivery.DELIVERED] * 2
    finally:
        await sink.close()


async def test_token_endpoint_unreachable_is_transient(rest_oauth2_harness: RestHarness) -> None:
    rest_oauth2_harness.proxy.set_mode("refuse")
    sink = await rest_oauth2_harness.make_sink()
    try:
        (outcome,) = await sink.send(items(1))
    finally:
        await sink.close()
    assert outcome.status is Delivery.ERRORED and "token endpoint" in outcome.detail


# -- settings


def test_registered_with_documented_settings() -> None:
    sink_type = SINK_TYPES["rest"]
    assert sink_type.factory is RestSink and sink_type.settings is RestSettings
    assert all(text.strip() for text in documented_keys(RestSettings).values())


OK_PUT = {"url_template": "https://crm.example.org/api/b/{key}", "api_key_header": "X-API-Key"}


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"api_key_header": "X-API-Key", "api_key_env": "K"}, "url_template"),
        (
            {**OK_PUT, "url_template": "https://crm.example.org/api/b", "api_key_env": "K"},
            "url_template",
        ),
        (
            {**OK_PUT, "url_template": "https://{key}.example.org/", "api_key_env": "K"},
            "url_template",
        ),
        ({**OK_PUT, "method": "POST", "api_key_env": "K"}, "collection_url"),
        ({**OK_PUT, "method": "PATCH", "api_key_env": "K"}, "method"),
        ({**OK_PUT}, "api_key_env"),
        ({**OK_PUT, "api_key_env": "K", "api_key_file": "/k"}, "api_key_env"),
        ({"url_template": OK_PUT["url_template"]}, "api_key_header"),
        ({**OK_PUT, "api_key_env": "K", "token_url": "https://id.example.org/t"}, "token_url"),
        (
            {"url_template": OK_PUT["url_template"], "token_url": "https://id.example.org/t"},
            "client_id",
        ),
        (
            {
                "url_template": OK_PUT["url_template"],
                "token_url": "https://id.example.org/t",
                "client_id": "c",
            },
            "client_secret_env",
        ),
        ({**OK_PUT, "api_key_env": "K", "api_key_header": "Bad Header"}, "api_key_header"),
    ],
)
def test_bad_settings_are_refused(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(RestSettings, table, "routes.toml", "routes.crm.sink.")
    assert error.value.key.endswith(key)


def test_repr_names_the_target_not_the_credentials(
    rest_oauth2_harness: RestHarness, rest_apikey_harness: RestHarness
) -> None:
    oauth = RestSink(rest_oauth2_harness.settings())
    api_key = RestSink(rest_apikey_harness.settings())
    assert "oauth2" in repr(oauth) and CLIENT_SECRET not in repr(vars(oauth))
    assert "X-API-Key" in repr(api_key) and API_KEY not in repr(vars(api_key))


def test_an_api_key_with_a_line_break_is_refused_at_start(
    rest_apikey_harness: RestHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIELDSYNC_TEST_CRM_KEY", API_KEY + "\nX-Injected: 1")
    with pytest.raises(SecretError, match="line break") as error:
        RestSink(rest_apikey_harness.settings())
    assert API_KEY not in str(error.value)


async def test_a_token_unfit_for_a_header_is_a_token_endpoint_failure(
    rest_oauth2_harness: RestHarness,
) -> None:
    rest_oauth2_harness.api.token_answer = (
        200,
        '{"access_token": "abc\\r\\nX-Injected: 1", "token_type": "bearer", "expires_in": 60}',
    )
    sink = await rest_oauth2_harness.make_sink()
    try:
        (outcome,) = await sink.send(items(1))
    finally:
        await sink.close()
    assert outcome.status is Delivery.ERRORED and "header" in outcome.detail
