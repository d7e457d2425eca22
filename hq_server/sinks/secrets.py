"""Credentials for sinks: from an environment variable or a file readable only by its owner.

A route config names where a secret is (`password_env = "FINANCE_DB_PASSWORD"` or
`password_file = "/etc/fieldsync/finance-db.secret"`), never the secret itself. `Secret` keeps the
value out of reprs and logs.

`SecretMask` is the one place that knows what a secret can look like once it has been sent: targets
echo requests in their error answers, and an echo of `Authorization: Basic ...` carries the secret
base64-encoded, a form body carries it URL-encoded. Every text HQ keeps or prints about a delivery
(log lines, a route's last_error, dead letters, the inventory) goes through the route's mask.
"""

from __future__ import annotations

import base64
import html
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary words
_MIN_CORE_CHARS = 8  # a base64 fragment shorter than this could match ordinary text
_MAX_FORMS = 2000  # bound on what one mask remembers (tokens are added as they are issued)


class SecretError(Exception):
    """A secret is missing or stored unsafely; the message names where it was looked for."""


@dataclass(frozen=True)
class Secret:
    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def resolve_secret(what: str, env: str | None, file: Path | str | None) -> Secret | None:
    """The secret from `env` (a variable name) or `file` (mode 0600 or stricter); None if neither
    is configured. Refuses a group/world-readable file and an unset variable."""
    if env and file:
        raise SecretError(f"{what}: set either the environment variable or the file, not both")
    if env:
        value = os.environ.get(env)
        if value is None or value == "":
            raise SecretError(f"{what}: environment variable {env} is not set")
        return Secret(value)
    if file:
        path = Path(file)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as e:
            raise SecretError(f"{what}: secret file {path} does not exist") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"{what}: secret file {path} is readable by others (mode "
                f"{stat.S_IMODE(mode):o}); run: chmod 600 {path}"
            )
        value = path.read_text(encoding="utf-8").strip()
        if not value:
            raise SecretError(f"{what}: secret file {path} is empty")
        return Secret(value)
    return None


def _base64_forms(data: bytes) -> set[str]:
    """`data` in base64, standard and URL-safe, with and without padding -- and the fragments of
    its encoding that appear whatever surrounds it.

    Base64 works on 3-byte groups, so the encoding of `data` inside a longer value (`id:secret` in
    HTTP Basic, a JSON document) depends on its offset modulo 3. For each offset the characters that
    depend on `data` alone are the same in every such value: masking them hides the secret however
    it was wrapped before encoding (at most two bytes at either edge stay visible).
    """
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        forms |= {whole, whole.rstrip("=")}
        for offset in range(3):
            text = encode(b"\0" * offset + data).decode("ascii").rstrip("=")
            start = 4 if offset else 0  # the first group mixes in what precedes
            end = (offset + len(data)) // 3 * 4  # a last, partial group mixes in what follows
            core = text[start:end]
            if len(core) >= _MIN_CORE_CHARS:
                forms.add(core)
    return forms


def secret_forms(value: str, *, user: str | None = None) -> set[str]:
    """Every form of `value` a sink may have sent or a target may echo: as is, URL-encoded
    (percent and form encoding), JSON- and HTML-escaped, base64 (also inside a longer value), and
    with `user` the HTTP Basic credential `user:value` (plain and form-encoded first, RFC 6749)."""
    if len(value) < MIN_SECRET_CHARS:
        return set()
    texts = {
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value)[1:-1].replace("/", "\\/"),
        json.dumps(value, ensure_ascii=False)[1:-1],
        html.escape(value),
    }
    forms = set(texts)
    for text in texts:
        forms |= _base64_forms(text.encode("utf-8"))
    if user is not None:
        for pair in (f"{user}:{value}", f"{quote_plus(user)}:{quote_plus(value)}"):
            forms |= _base64_forms(pair.encode("utf-8"))
    return {form for form in forms if len(form) >= MIN_SECRET_CHARS}


class SecretMask:
    """Replaces every known form of a route's secrets (see `secret_forms`) by ***.

    Call it on any text about a delivery before it is logged or stored. Longer forms are replaced
    first, so a form that contains another is masked whole.
    """

    def __init__(self, secrets: Iterable[Secret | str | None] = ()) -> None:
        self._forms: dict[str, None] = {}  # insertion-ordered: the oldest go first when full
        self._ordered: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: Secret | str | None, *, user: str | None = None) -> None:
        """Also mask `secret` (and, with `user`, its HTTP Basic form)."""
        value = secret.value if isinstance(secret, Secret) else secret
        if not value:
            return
        for form in secret_forms(value, user=user):
            self._forms.pop(form, None)
            self._forms[form] = None
        while len(self._forms) > _MAX_FORMS:
            del self._forms[next(iter(self._forms))]
        self._ordered = sorted(self._forms, key=len, reverse=True)

    def extend(self, other: SecretMask) -> None:
        """Also mask everything `other` masks."""
        for form in other._forms:
            self._forms[form] = None
        self._ordered = sorted(self._forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if not self._ordered or not text:
            return text
        for form in self._ordered:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def __repr__(self) -> str:
        return f"SecretMask({len(self._forms)} forms)"
