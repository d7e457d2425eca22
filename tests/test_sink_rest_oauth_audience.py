"""Issue 9, defect 9: OAuth 2.0 `audience` and `resource` (RFC 8707) for the REST sink.

The token endpoint is a real authlib OAuth 2.0 authorization server (its framework-agnostic
`AuthorizationServer` with the client-credentials grant, in a small aiohttp handler on 127.0.0.1)
that refuses a token request without the right audience and resources, as identity providers that
need them do. The API on the same server accepts only tokens issued for that audience.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from aiohttp import web
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidRequestError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import OAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from multidict import MultiDictProxy
from sink_harness import outgoing

from hq_server.sinks.base import Delivery
from hq_server.sinks.rest import RestSettings, RestSink
from protocol.config import ConfigError, build

pytestmark = pytest.mark.timeout(30)
CLIENT_ID = "fieldsync-hq"
CLIENT_SECRET = "cs-authlib/Secret+42@x"
AUDIENCE = "https://crm.example.org/api"
RESOURCES = ["https://crm.example.org/api/v2", "https://files.example.org/"]


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"

    def get_allowed_scope(self, scope: str) -> str:
        return scope or ""


class FormPayload(OAuth2Payload):
    def __init__(self, form: MultiDictProxy[str]) -> None:
        self._data = {key: form[key] for key in form}
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in form.items():
            self._datalist[key].append(value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class FormRequest(OAuth2Request):
    def __init__(self, request: web.Request, form: MultiDictProxy[str]) -> None:
        super().__init__(request.method, str(request.url), headers=dict(request.headers))
        self.payload = FormPayload(form)
        self._form = form

    @property
    def form(self) -> dict[str, str]:
        return self.payload.data

    @property
    def args(self) -> dict[str, str]:
        return {}


class AudienceClientCredentials(ClientCredentialsGrant):
    """client_credentials that requires the audience and the resources (like Auth0/Okta)."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [
        "client_secret_basic",
        "client_secret_post",
    ]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        payload = self.request.payload
        if payload.data.get("audience") != AUDIENCE:
            raise InvalidRequestError(f"audience is required and must be {AUDIENCE}")
        if sorted(payload.datalist.get("resource", [])) != sorted(RESOURCES):
            raise InvalidRequestError("resource must name every API the token is for")


@dataclass
class IdentityProvider(AuthorizationServer):
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> its request

    def __post_init__(self) -> None:
        super().__init__()
        self.register_grant(AudienceClientCredentials)
        generator = BearerTokenGenerator(lambda **_: "at-" + secrets.token_urlsafe(16))
        self.register_token_generator("default", generator)
        self.clients = {CLIENT_ID: Client(CLIENT_ID, CLIENT_SECRET)}

    def query_client(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: FormRequest) -> None:
        self.issued[token["access_token"]] = {
            "audience": request.payload.data.get("audience"),
            "resource": request.payload.datalist.get("resource", []),
        }

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: FormRequest) -> FormRequest:
        return request  # token_endpoint already built it from the aiohttp request

    def handle_response(self, status: int, body: Any, headers: Any) -> web.Response:
        headers = {k: v for k, v in headers if k.lower() != "content-type"}
        return web.json_response(body, status=status, headers=headers)

    async def token_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        response: web.Response = self.create_token_response(FormRequest(request, form))
        return response

    async def api(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        grant = self.issued.get(token)
        if scheme != "Bearer" or grant is None or grant["audience"] != AUDIENCE:
            return web.json_response({"error": "invalid_token"}, status=401)
        await request.read()
        return web.Response(status=204)


@pytest.fixture
async def provider(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[IdentityProvider, str]]:
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on 127.0.0.1 only
    monkeypatch.setenv("CRM_CLIENT_SECRET", CLIENT_SECRET)
    idp = IdentityProvider()
    app = web.Application()
    app.router.add_post("/oauth/token", idp.token_endpoint)
    app.router.add_put("/api/{key}", idp.api)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield idp, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def settings(base: str, **options: Any) -> RestSettings:
    table = {
        "url_template": f"{base}/api/{{key}}",
        "token_url": f"{base}/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret_env": "CRM_CLIENT_SECRET",
    } | options
    built: RestSettings = build(RestSettings, table, "routes.toml", "routes.crm.sink.")
    return built


@pytest.mark.parametrize("token_auth", ["basic", "post"])
async def test_audience_and_resources_reach_the_authlib_server(
    provider: tuple[IdentityProvider, str], token_auth: str
) -> None:
    idp, base = provider
    sink = RestSink(settings(base, token_auth=token_auth, audience=AUDIENCE, resource=RESOURCES))
    try:
        outcomes = await sink.send([outgoing(1), outgoing(2)])
    finally:
        await sink.close()
    assert [o.status for o in outcomes] == [Delivery.DELIVERED] * 2, outcomes
    (grant,) = idp.issued.values()  # one token served both items
    assert grant == {"audience": AUDIENCE, "resource": RESOURCES}


async def test_without_the_audience_the_server_refuses_and_the_route_waits(
    provider: tuple[IdentityProvider, str],
) -> None:
    idp, base = provider
    sink = RestSink(settings(base))
    try:
        (outcome,) = await sink.send([outgoing(1)])
    finally:
        await sink.close()
    assert outcome.status is Delivery.ERRORED and outcome.target_down
    assert "audience is required" in outcome.detail
    assert idp.issued == {}


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"audience": ""}, "audience"),
        ({"resource": ["/relative/path"]}, "resource"),
        ({"resource": ["https://api.example.org/#part"]}, "resource"),
        (
            {"api_key_header": "X-API-Key", "api_key_env": "K", "audience": AUDIENCE},
            "token_url",
        ),
    ],
)
def test_bad_audience_or_resource_settings_are_refused(options: dict[str, Any], key: str) -> None:
    table: dict[str, Any] = {"url_template": "https://crm.example.org/api/{key}"}
    if "api_key_header" not in options:
        table |= {
            "token_url": "https://login.example.org/token",
            "client_id": CLIENT_ID,
            "client_secret_env": "X",
        }
    with pytest.raises(ConfigError) as raised:
        build(RestSettings, table | options, "routes.toml", "routes.crm.sink.")
    assert key in str(raised.value)
