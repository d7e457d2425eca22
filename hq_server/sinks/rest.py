"""REST sink: upsert each record by key into a REST API, delete by key on `op = delete`.

Two ways to upsert, chosen by `method`:

    PUT  url_template with {key} replaced by the URL-quoted target key; the body is the record.
         PUT is idempotent by definition, so a repeat changes nothing.
    POST collection_url; the body is the record with `key_field` set to the target key. The API
         must upsert on that field (or honour Idempotency-Key) for repeats to be harmless.

`op = delete` sends DELETE to url_template (without url_template, a delete is REJECTED). A 404 or
410 answer to a DELETE means the record is already gone, so it counts as DELIVERED.

Every request carries `Idempotency-Key` (stable across repeats of the item) and `X-Fieldsync-Route`.

Authentication, exactly one of:

- an API key: sent verbatim in the header `api_key_header` (for `Authorization`, store the whole
  value, e.g. `Bearer abc...`, as the secret);
- OAuth 2.0 client credentials (RFC 6749 section 4.4): a token is fetched from `token_url` on first
  use (with `scope`, `audience` and one RFC 8707 `resource` parameter per resource, if set), cached until shortly before it expires and reused for every item; a 401 from the API drops
  it and fetches a new one, once per item -- a second 401 leaves the item ERRORED as "target down"
  (the credentials, not the item, are at fault, so it must not be dead-lettered). Any failure of
  the token endpoint is "target down" for the same reason.

Answers are classified like the webhook's (see `hq_server.sinks.http`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import quote, quote_plus, urlencode

import orjson
import yarl

from hq_server.logs import event
from hq_server.sinks.base import (
    Delivery,
    Outcome,
    Outgoing,
    register_sink,
    send_one_by_one,
)
from hq_server.sinks.http import (
    JSON_CONTENT_TYPE,
    Answer,
    HttpClient,
    RequestError,
    TransportError,
    classify,
    exactly_one_secret,
    header_safe,
    http_plaintext,
    http_url,
    json_body,
    settings_error,
)
from hq_server.sinks.plaintext import Plaintext
from hq_server.sinks.secrets import Secret, SecretError, SecretMask, resolve_secret
from protocol.config import positive, setting

log = logging.getLogger("fieldsync.sinks.rest")

KEY_PLACEHOLDER = "{key}"
# Refresh a cached token this long before it expires (at most a tenth of its lifetime), so a
# token never expires between the check and the request.
_EXPIRY_MARGIN_S = 30.0
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def _url_template(value: Any) -> str | None:
    text = str(value)
    if text.count(KEY_PLACEHOLDER) != 1:
        return "must contain {key} exactly once"
    probe = text.replace(KEY_PLACEHOLDER, "k")
    if (reason := http_url(probe)) is not None:
        return reason
    if yarl.URL(probe).host != yarl.URL(text.replace(KEY_PLACEHOLDER, "other")).host:
        return "must have {key} in the path or query, not in the host"
    return None


def _header_name(value: Any) -> str | None:
    text = str(value)
    ok = text and all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={} ' for c in text)
    return None if ok else "must be an HTTP header name, e.g. X-API-Key"


def _non_empty(value: Any) -> str | None:
    return None if str(value).strip() else "must not be empty"


def _resource_uris(value: Any) -> str | None:
    """RFC 8707 section 2: each resource is an absolute URI without a fragment."""
    for i, text in enumerate(value):
        try:
            url = yarl.URL(str(text))
        except (ValueError, TypeError):
            return f"item {i} must be an absolute URI"
        if not url.is_absolute() or not url.scheme:
            return f"item {i} must be an absolute URI, e.g. https://api.example.org/"
        if url.fragment or "#" in str(text):
            return f"item {i} must not contain a #fragment (RFC 8707)"
    return None


@dataclass(frozen=True)
class RestSettings:
    method: Literal["PUT", "POST"] = setting(
        "PUT",
        'How records are upserted: "PUT" to url_template (idempotent by key) or "POST" to '
        "collection_url with the key in the body field key_field.",
    )
    url_template: str | None = setting(
        None,
        "URL of one record with {key} where the URL-quoted target key goes, e.g. "
        "https://crm.example.org/api/beneficiaries/{key}. Required with method = PUT; used for "
        "DELETE with either method (without it, deletes are rejected).",
        _url_template,
    )
    collection_url: str | None = setting(
        None,
        "With method = POST (and only then): the URL records are POSTed to.",
        http_url,
    )
    key_field: str = setting(
        "id",
        "With method = POST: the body field set to the record's target key (it replaces a "
        "different value the mapping may have put there).",
        _non_empty,
    )
    api_key_header: str | None = setting(
        None,
        "API-key authentication: the header that carries the key, e.g. X-API-Key. Requires "
        "api_key_env or api_key_file; excludes the OAuth 2.0 settings.",
        _header_name,
    )
    api_key_env: str | None = setting(
        None, "Environment variable holding the API key (the header's whole value)."
    )
    api_key_file: Path | None = setting(
        None, "File holding the API key (the header's whole value; mode 0600 or stricter)."
    )
    token_url: str | None = setting(
        None,
        "OAuth 2.0 client-credentials authentication: the token endpoint. Requires client_id "
        "and client_secret_env or client_secret_file; excludes the API-key settings.",
        http_url,
    )
    client_id: str | None = setting(None, "OAuth 2.0 client id (not a secret).", _non_empty)
    client_secret_env: str | None = setting(
        None, "Environment variable holding the OAuth 2.0 client secret."
    )
    client_secret_file: Path | None = setting(
        None, "File holding the OAuth 2.0 client secret (mode 0600 or stricter)."
    )
    scope: str | None = setting(
        None, "OAuth 2.0 scope to request (space-separated); not set: the server's default."
    )
    audience: str | None = setting(
        None,
        "OAuth 2.0: the audience parameter sent to the token endpoint (the API the token is "
        "for), as identity providers such as Auth0 or Okta require; not set: not sent.",
        _non_empty,
    )
    resource: list[str] = setting(
        [],
        "OAuth 2.0 resource indicators (RFC 8707): absolute URIs of the APIs the token is for, "
        "each sent as a resource parameter to the token endpoint; empty: none sent.",
        _resource_uris,
    )
    token_auth: Literal["basic", "post"] = setting(
        "basic",
        'How the client authenticates to the token endpoint: "basic" (HTTP Basic, which every '
        'server must support) or "post" (client_id and client_secret in the form body).',
    )
    timeout_s: float = setting(
        10.0,
        "Seconds one request (API or token endpoint) may take, connecting included; slower is a "
        "transient failure.",
        positive,
    )
    ca_bundle: Path | None = setting(
        None,
        "PEM file of extra certificate authorities to trust for https:// URLs. Verification "
        "itself cannot be turned off.",
    )

    def __post_init__(self) -> None:
        # build() checks keys one at a time; combinations can only be checked here.
        if self.method == "PUT":
            if not self.url_template:
                raise settings_error("url_template", "is required with method = PUT")
            if self.collection_url:
                raise settings_error("collection_url", "is only used with method = POST")
        elif not self.collection_url:
            raise settings_error("collection_url", "is required with method = POST")
        api_key = any((self.api_key_header, self.api_key_env, self.api_key_file))
        oauth = any(
            (
                self.token_url,
                self.client_id,
                self.client_secret_env,
                self.client_secret_file,
                self.scope,
                self.audience,
                self.resource,
            )
        )
        if api_key and oauth:
            raise settings_error("token_url", "use either the API-key or the OAuth 2.0 settings")
        if api_key:
            if not self.api_key_header:
                raise settings_error("api_key_header", "is required with api_key_env/_file")
            exactly_one_secret("the API key", "api_key_env", self.api_key_env, self.api_key_file)
        elif oauth:
            for key in ("token_url", "client_id"):
                if not getattr(self, key):
                    raise settings_error(key, "is required for OAuth 2.0 client credentials")
            exactly_one_secret(
                "the client secret",
                "client_secret_env",
                self.client_secret_env,
                self.client_secret_file,
            )
        else:
            raise settings_error(
                "api_key_header",
                "authentication is required: set api_key_header with api_key_env/_file, or "
                "token_url, client_id and client_secret_env/_file",
            )

    def plaintext(self) -> list[Plaintext]:
        """Every URL that is http:// to another machine (see `hq_server.sinks.plaintext`)."""
        return [
            *http_plaintext("url_template", self.url_template),
            *http_plaintext("collection_url", self.collection_url),
            *http_plaintext("token_url", self.token_url),
        ]


class TokenError(Exception):
    """The token endpoint did not give a usable token (transient for the items waiting on it)."""


class ClientCredentials:
    """An OAuth 2.0 access token from the client-credentials grant, cached and shared by items.

    One lock serialises fetches so concurrent sends never ask twice for the same token.
    `clock` is monotonic seconds (injectable so tests can expire a token without waiting).
    """

    def __init__(
        self,
        http: HttpClient,
        settings: RestSettings,
        client_secret: Secret,
        clock: Callable[[], float],
    ) -> None:
        assert settings.token_url is not None
        assert settings.client_id is not None
        self._http = http
        self._token_url = yarl.URL(settings.token_url)
        self._client_id = settings.client_id
        self._client_secret = client_secret
        self._scope = settings.scope
        self._audience = settings.audience
        self._resource = tuple(settings.resource)
        self._basic = settings.token_auth == "basic"
        self._clock = clock
        self._token: Secret | None = None
        self._refresh_at: float | None = None  # None: no known expiry, use until a 401
        self._lock = asyncio.Lock()

    async def token(self) -> Secret:
        """A valid-looking access token: the cached one, or a new one (TokenError if none)."""
        async with self._lock:
            if self._token is not None and (
                self._refresh_at is None or self._clock() < self._refresh_at
            ):
                return self._token
            self._token = None
            self._token, self._refresh_at = await self._fetch()
            return self._token

    def invalidate(self, token: Secret) -> None:
        """Forget `token` after the API refused it (unless another item already replaced it)."""
        if self._token is token:
            self._token = None

    async def _fetch(self) -> tuple[Secret, float | None]:
        form = [("grant_type", "client_credentials")]
        if self._scope:
            form.append(("scope", self._scope))
        if self._audience:
            form.append(("audience", self._audience))
        form += [("resource", uri) for uri in self._resource]  # RFC 8707: one per resource
        headers = {"Accept": "application/json", "Content-Type": FORM_CONTENT_TYPE}
        if self._basic:
            # RFC 6749 2.3.1: id and secret are form-encoded before the Basic encoding.
            pair = f"{quote_plus(self._client_id)}:{quote_plus(self._client_secret.value)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form += [("client_id", self._client_id), ("client_secret", self._client_secret.value)]
        started = self._clock()
        try:
            answer, body = await self._http.exchange(
                "POST",
                self._token_url,
                headers=headers,
                data=urlencode(form).encode("ascii"),
            )
        except (TransportError, RequestError) as e:
            raise TokenError(f"token endpoint: {e}") from e
        if not 200 <= answer.status < 300:
            raise TokenError(f"token endpoint: {answer.describe()}")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise TokenError("token endpoint: the answer is not JSON") from e
        if not isinstance(document, dict):
            raise TokenError("token endpoint: the answer is not a JSON object")
        access_token = document.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise TokenError("token endpoint: the answer has no access_token")
        if not header_safe(access_token) or " " in access_token:
            raise TokenError("token endpoint: the access_token cannot be sent in a header")
        token_type = document.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenError(f"token endpoint: unsupported token_type {token_type!r}")
        token = Secret(access_token)
        self._http.add_secret(token)
        lifetime = _seconds(document.get("expires_in"))
        if lifetime is None:
            return token, None
        return token, started + lifetime - min(_EXPIRY_MARGIN_S, lifetime / 10)


def _seconds(value: Any) -> float | None:
    """`expires_in` as seconds; servers send numbers or numeric strings; None if absent or odd."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def record_url(template: str, target_key: str) -> yarl.URL:
    """`template` with {key} replaced by the key, percent-encoded completely (/ ? # included)."""
    return yarl.URL(template.replace(KEY_PLACEHOLDER, quote(target_key, safe="")), encoded=True)


@register_sink("rest", RestSettings, "Upsert and delete records by key in a REST API")
class RestSink:
    """Upserts (PUT or POST) and deletes each item in order, stopping at the first ERRORED.

    `clock` is monotonic seconds, used only for access-token expiry; `wall` is Unix seconds, used
    only to read a Retry-After date.
    """

    kind: ClassVar[str] = "rest"

    def __init__(
        self,
        settings: RestSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.settings = settings
        secrets: list[Secret] = []
        self._api_key: tuple[str, Secret] | None = None
        self._oauth: ClientCredentials | None = None
        if settings.api_key_header:
            api_key = resolve_secret("REST API key", settings.api_key_env, settings.api_key_file)
            if api_key is None:
                raise ValueError("REST API key is not configured")
            if not header_safe(api_key.value):
                raise SecretError(
                    "REST API key: holds characters an HTTP header cannot carry (a line break?)"
                )
            self._api_key = (settings.api_key_header, api_key)
            secrets.append(api_key)
        self._http = HttpClient(
            timeout_s=settings.timeout_s, ca_bundle=settings.ca_bundle, secrets=secrets, wall=wall
        )
        if settings.token_url:
            client_secret = resolve_secret(
                "OAuth 2.0 client secret", settings.client_secret_env, settings.client_secret_file
            )
            if client_secret is None:
                raise ValueError("OAuth 2.0 client secret is not configured")
            self._http.add_secret(client_secret, user=settings.client_id)
            self._oauth = ClientCredentials(self._http, settings, client_secret, clock)

    @property
    def mask(self) -> SecretMask:
        """Every form of this route's API key, client secret and access tokens (for the router)."""
        return self._http.mask

    def __repr__(self) -> str:
        target = self.settings.url_template or self.settings.collection_url
        auth = "oauth2" if self._oauth else f"api_key_header={self.settings.api_key_header}"
        return f"RestSink(method={self.settings.method}, url={target!r}, auth={auth})"

    async def open(self) -> None:
        await self._http.open()

    async def close(self) -> None:
        await self._http.close()

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        return await send_one_by_one(items, self._deliver)

    def _request_for(self, item: Outgoing) -> tuple[str, yarl.URL, bytes | None]:
        """(method, url, body) for `item`; ValueError/TypeError if it cannot be expressed."""
        settings = self.settings
        if item.op == "delete":
            if not settings.url_template:
                raise ValueError("a delete needs url_template, which this route does not set")
            return "DELETE", record_url(settings.url_template, item.target_key), None
        if settings.method == "PUT":
            assert settings.url_template is not None
            url = record_url(settings.url_template, item.target_key)
            return "PUT", url, json_body(item.payload)
        assert settings.collection_url is not None
        document = {**item.payload, settings.key_field: item.target_key}
        return "POST", yarl.URL(settings.collection_url), json_body(document)

    async def _auth_headers(self) -> tuple[dict[str, str], Secret | None]:
        if self._api_key is not None:
            header, secret = self._api_key
            return {header: secret.value}, None
        assert self._oauth is not None
        token = await self._oauth.token()
        return {"Authorization": f"Bearer {token.value}"}, token

    async def _deliver(self, item: Outgoing) -> Outcome:
        try:
            method, url, body = self._request_for(item)
        except (TypeError, ValueError) as e:
            return self._report(item, Outcome.rejected(f"cannot build the request: {e}"))
        headers = {"Idempotency-Key": item.idempotency_key, "X-Fieldsync-Route": item.route}
        if body is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        answer: Answer | None = None
        for attempt in (1, 2):
            try:
                auth_headers, token = await self._auth_headers()
            except TokenError as e:
                return self._report(item, Outcome.unavailable(str(e)))
            try:
                answer, _ = await self._http.exchange(
                    method, url, headers={**headers, **auth_headers}, data=body
                )
            except TransportError as e:
                return self._report(item, Outcome.unavailable(str(e)))
            except RequestError as e:
                return self._report(item, Outcome.rejected(f"cannot send the request: {e}"))
            if answer.status != 401 or self._oauth is None or token is None:
                break
            self._oauth.invalidate(token)
            if attempt == 2:
                detail = f"{answer.describe()} (refused again with a new access token)"
                return self._report(item, Outcome.unavailable(detail), answer.status)
        assert answer is not None
        if method == "DELETE" and answer.status in (404, 410):
            return Outcome.delivered()  # already gone: the delete's goal is met
        return self._report(item, classify(answer), answer.status)

    def _report(self, item: Outgoing, outcome: Outcome, status: int | None = None) -> Outcome:
        """Log a failed delivery with its identifiers (never the record or a header value)."""
        if outcome.status is not Delivery.DELIVERED:
            event(
                log,
                logging.WARNING,
                f"rest delivery {outcome.status.value}",
                route=item.route,
                idempotency_key=item.idempotency_key,
                op=item.op,
                http_status=status,
                detail=outcome.detail,
            )
        return outcome
