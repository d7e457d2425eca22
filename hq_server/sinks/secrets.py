"""Credentials for sinks: from an environment variable or a file readable only by its owner.

A route config names where a secret is (`password_env = "FINANCE_DB_PASSWORD"` or
`password_file = "/etc/fieldsync/finance-db.secret"`), never the secret itself. `Secret` keeps the
value out of reprs and logs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


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
