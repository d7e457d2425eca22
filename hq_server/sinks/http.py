"""What the two HTTP sinks (webhook, rest) share: one session, one status rule, one error shape.

Errors an exchange can end in, and what a sink makes of them::

    answer 2xx                                  DELIVERED
    answer 502, 503, 504                        ERRORED, target down (gateway: the service is down)
    answer 408, 429                             ERRORED, target down (timed out / throttled: the
                                                  whole client waits, not this item)
    Retry-After on a 429 or 503                 the route waits that long (seconds or an HTTP
                                                  date) instead of its backoff, at most retry.max_s
    answer 3xx                                  ERRORED, target down (redirects are not followed)
    answer 401                                  ERRORED, target down (credentials are the whole
                                                  route's problem: fix them, the route resumes)
    answer other 5xx (500, 501, 507, ...)       ERRORED   (may be this item tripping a bug: its
                                                  retries are counted, then it is dead-lettered)
    answer other 4xx                            REJECTED  (the target refuses this item for good)
    TransportError (timeout, refused, reset,    ERRORED, target down
      TLS failure, truncated answer)

"Target down" is `Outcome.unavailable`: the router waits it out without spending the item's retry
budget, so an outage, a throttle or a misconfigured endpoint never dead-letters data.

Redirects are never followed: a redirect would replay a signed body or an API key to a host the
operator did not configure. A 3xx is not REJECTED because it says something about the endpoint,
not the item: dead-lettering every item until someone fixes the URL would lose them in order,
while a stalled route is visible and loses nothing.

TLS certificates are always verified, against the system store or `ca_bundle`; nothing in the
settings can turn verification off.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from hq_server.sinks.base import Outcome
from hq_server.sinks.plaintext import Plaintext, is_loopback
from hq_server.sinks.secrets import Secret, SecretMask
from protocol.config import ConfigError

USER_AGENT = "fieldsync-hq"
SNIPPET_CHARS = 200  # of an answer body, in an Outcome detail
_READ_LIMIT = 64 * 1024  # bytes of an answer body ever read: a sink never needs more
SETTINGS_SOURCE = (
    "<sink settings>"  # ConfigError.path for cross-key checks; the router re-labels it
)
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class TransportError(Exception):
    """The exchange did not produce an HTTP answer (timeout, refused, reset, TLS): target down."""


class RequestError(Exception):
    """The request cannot be expressed in HTTP (e.g. a header value with a line break): retrying
    the same item cannot help, so sinks reject it."""


def header_safe(value: str) -> bool:
    """True if `value` can be sent as an HTTP header value (visible ASCII and spaces only)."""
    return all(32 <= ord(c) < 127 for c in value)


def settings_error(key: str, reason: str) -> ConfigError:
    """A cross-key problem found in a settings dataclass's `__post_init__`.

    `build()` checks one key at a time; combinations (either `secret_env` or `secret_file`) can only
    be checked once all keys are in. The router re-raises these with its file and key prefix.
    """
    return ConfigError(SETTINGS_SOURCE, key, reason)


def required_setting(doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """Like `protocol.config.setting` but without a default: `build()` then reports the key as
    required when it is missing, instead of silently using a placeholder. Declare these first."""
    return dataclasses.field(metadata={"doc": doc, "check": check})


def http_url(value: Any) -> str | None:
    """Setting check: an absolute http(s) URL with a host and no user:password part.

    Credentials in a URL would end up in config files, reprs and logs; they belong in a secret.
    """
    try:
        url = yarl.URL(str(value))
    except (ValueError, TypeError):
        return "must be an http:// or https:// URL"
    if url.scheme not in ("http", "https") or not url.host:
        return "must be an http:// or https:// URL"
    if url.user is not None or url.password is not None:
        return "must not contain user:password (use the secret settings instead)"
    if url.fragment:
        return "must not contain a #fragment"
    return None


def http_plaintext(key: str, url: str | None) -> list[Plaintext]:
    """`url` (setting `key`) as a Plaintext finding if it is http:// to another machine."""
    if not url:
        return []
    parsed = yarl.URL(url.replace("{key}", "k"))
    if parsed.scheme != "http" or is_loopback(parsed.host):
        return []
    return [Plaintext(key, f"http:// to {parsed.host}", "use an https:// URL")]


def exactly_one_secret(what: str, env_key: str, env: str | None, file: Path | None) -> None:
    """Raise a settings error unless exactly one of the two ways to give a secret is set."""
    if env and file:
        raise settings_error(env_key, f"set either {env_key} or its _file variant, not both")
    if not env and not file:
        raise settings_error(env_key, f"{what} is required: set {env_key} or its _file variant")


def ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """A verifying TLS context; a CA bundle adds trust, nothing removes verification."""
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)


def json_body(document: Any) -> bytes:
    """Compact UTF-8 JSON; ValueError/TypeError for what JSON cannot carry (NaN, bytes, sets).

    NaN and Infinity are refused rather than written as the non-standard tokens most receivers
    cannot parse: such an item is REJECTED instead of breaking the receiver.
    """
    return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )


def redact(text: str, secrets: Iterable[Secret | str | None]) -> str:
    """`text` with every form of every secret replaced by *** (see `SecretMask`): answers
    sometimes echo what was sent."""
    return SecretMask(secrets)(text)


RETRY_AFTER_STATUSES = (429, 503)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 10.2.3): delay-seconds or an HTTP-date,
    `now` being Unix seconds. None if absent or unreadable; a date in the past is 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer reduced to what classification needs: the status, a short body text, and
    on 429/503 the Retry-After delay asked for (seconds)."""

    status: int
    snippet: str  # whitespace collapsed, at most SNIPPET_CHARS characters
    retry_after_s: float | None = None

    def describe(self) -> str:
        text = f"HTTP {self.status}: {self.snippet}" if self.snippet else f"HTTP {self.status}"
        if self.retry_after_s is not None:
            text += f" (Retry-After {self.retry_after_s:g} s)"
        return text


def classify(answer: Answer) -> Outcome:
    """The three-way status for an answer (see the table in the module docstring)."""
    status = answer.status
    if 200 <= status < 300:
        return Outcome.delivered()
    if status in (408, 429, 502, 503, 504):
        return Outcome.unavailable(answer.describe(), answer.retry_after_s)
    if 300 <= status < 400:
        return Outcome.unavailable(f"{answer.describe()} (redirects are not followed; fix the URL)")
    if status == 401:
        # Credentials are the whole target's problem (a rotated secret, an expired key), never one
        # record's: wait for the fix in order instead of dead-lettering everything.
        return Outcome.unavailable(f"{answer.describe()} (check the route's credentials)")
    if 400 <= status < 500:
        return Outcome.rejected(answer.describe())
    if status >= 500:
        return Outcome.errored(answer.describe())
    return Outcome.errored(f"{answer.describe()} (unexpected status)")


class HttpClient:
    """One aiohttp session for the life of a sink, opened lazily, closed by `close`.

    The session's connection pool reconnects by itself after a reset or a server restart, so a
    sink never has to rebuild it; a failed exchange only fails the item it carried.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        ca_bundle: Path | None,
        secrets: Iterable[Secret],
        wall: Callable[[], float] = time.time,
    ):
        self._wall = wall  # Unix seconds, for Retry-After dates
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ca_bundle = ca_bundle
        self.mask = SecretMask(secrets)
        self._session: aiohttp.ClientSession | None = None

    def add_secret(self, secret: Secret, *, user: str | None = None) -> None:
        """Also mask `secret` (e.g. an access token obtained later; with `user`, its HTTP Basic
        form) in answer snippets and error texts."""
        self.mask.add(secret, user=user)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=ssl_context(self._ca_bundle), limit=4)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
            )
        return self._session

    async def open(self) -> None:
        self._open()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def exchange(
        self,
        method: str,
        url: str | yarl.URL,
        *,
        headers: Mapping[str, str],
        data: bytes | Mapping[str, str] | None = None,
    ) -> tuple[Answer, bytes]:
        """One request; its answer and up to 64 KiB of the answer body, or TransportError.

        The body is read (bounded) even when unused so the connection can go back to the pool.
        """
        session = self._open()
        try:
            async with session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            ) as response:
                body = await response.content.read(_READ_LIMIT)
                text = body.decode("utf-8", errors="replace")
                snippet = self.mask(" ".join(self.mask(text).split()))[:SNIPPET_CHARS]
                retry_after = None
                if response.status in RETRY_AFTER_STATUSES:
                    header = response.headers.get("Retry-After")
                    retry_after = parse_retry_after(header, self._wall())
                return Answer(response.status, snippet, retry_after), body
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransportError(self._describe(e)) from e
        except ValueError as e:  # aiohttp refuses header injection and the like before sending
            raise RequestError(self._describe(e)) from e

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError) and not str(error):
            return f"timed out after {self._timeout.total:g} s"
        text = str(error) or type(error).__name__
        return self.mask(f"{type(error).__name__}: {text}")
