"""Which sink connections would travel in plain text to another machine, and whether that is allowed.

A route must not send records or credentials unencrypted across a network by accident. Each sink's
settings class may declare `plaintext() -> list[Plaintext]`: every connection it would make without
TLS to a host that is not this machine. The route loader (`hq_server.routing.config`) refuses a
route with any such connection unless the route sets `insecure_plaintext = true`; the router then
warns at every start and the inventory shows it.

What counts as plaintext, per sink:

- webhook, rest: an `http://` URL (the target, a record URL template, the OAuth token endpoint).
- postgres: `sslmode = "disable"`. Of libpq's modes, `disable` never encrypts, and `allow` and
  `prefer` fall back to plain text silently when the server does not offer TLS (an attacker on the
  path can force that), so all three are plaintext; `require` encrypts without checking who answers.
  This sink accepts only `disable`, `verify-ca` and `verify-full`, so `disable` is the one to check.
  A Unix socket (a host starting with "/") never leaves the machine.
- rabbitmq: `tls = false` (amqp://, not amqps://).

Loopback -- this machine -- is 127.0.0.0/8, ::1 and the name `localhost`. Any other name counts as
remote even if it resolves to a loopback address today: the check is on the configuration, which
must not depend on DNS.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True, slots=True)
class Plaintext:
    """One unencrypted connection a sink would make to another machine.

    `key` is the sink setting that causes it (e.g. "url", "sslmode"), `what` describes it
    ("http:// to crm.example.org"), `fix` says how to encrypt it ("use an https:// URL").
    """

    key: str
    what: str
    fix: str


def is_loopback(host: str | None) -> bool:
    """True if `host` names this machine: 127.0.0.0/8, ::1 (brackets allowed) or localhost."""
    if not host:
        return False
    text = host.strip().lower()
    if text in LOOPBACK_NAMES:
        return True
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def remote_hosts(hosts: str) -> list[str]:
    """The hosts of a (comma-separated, libpq-style) host list that are not this machine; a Unix
    socket directory (starting with "/") is local."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    return [h for h in names if not h.startswith("/") and not is_loopback(h)]
