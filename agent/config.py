"""Agent settings: one TOML file, every key documented in config/agent.example.toml.

On top of the per-key checks of `protocol.config`, `load_agent_config` resolves relative paths
against the folder of the config file (as HQ does: an operator reading the file should not have to
know the daemon's working folder) and refuses a listen address beyond loopback unless the file says
`allow_remote = true` and gives a TLS certificate and key (`listen_problem`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.config import (
    ConfigError,
    at_least,
    between,
    listen_address,
    load,
    positive,
    setting,
)
from protocol.references import RESERVED_PREFIX

DEFAULT_CONFIG_PATH = Path("/etc/fieldsync/agent.toml")


TOKEN_FILENAME = "api-token"


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (brackets of an IPv6 literal allowed); a name that is not
    `localhost` is not loopback, whatever it resolves to today."""
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hq_url_problem(url: str) -> str | None:
    """Why `url` cannot be HQ's address (None: it can): https://, or plain http:// only to a
    loopback host, so an enrolment token or a batch never crosses a network in clear text."""
    if url == "":
        return None
    if "://" not in url:
        return f"has no scheme: write it as https://{url}"
    parts = urlsplit(url)
    if not parts.hostname:
        return "has no host name: write it as https://HOST[:PORT]"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return None
    if parts.scheme != "http":
        return f"must be https:// (got {parts.scheme}://)"
    return "must be an https:// URL (plain http is allowed only to 127.0.0.1/localhost)"


@dataclass(frozen=True)
class AgentSection:
    data_dir: Path = setting(
        Path("/var/lib/fieldsync-agent"),
        "Folder holding agent.db (records, outbox, batches), node.key and hq.json.",
    )
    name: str = setting("", "Human name of this node shown at HQ; defaults to the host name.")
    listen: str = setting(
        "127.0.0.1:8470",
        "HOST:PORT of the local HTTP API (keep it on loopback; any other address needs "
        "allow_remote, tls_cert and tls_key).",
        listen_address,
    )
    allow_remote: bool = setting(
        False,
        "Allow a listen address beyond loopback (e.g. a field server other laptops use). Needs "
        "tls_cert and tls_key; every request still carries the API token.",
    )
    tls_cert: Path | None = setting(
        None,
        "PEM certificate chain for the local API; with tls_key set it serves HTTPS. Relative "
        "to this file.",
    )
    tls_key: Path | None = setting(None, "PEM private key for tls_cert (mode 0600).")
    log_level: str = setting("info", "debug, info, warning or error.")
    collections_file: Path | None = setting(
        None,
        "TOML file defining the collections (fields, types, rules, reference tables) that "
        "records are checked against before they are stored; relative to this file. Not set: "
        "records are checked for JSON, key and field names only.",
    )


@dataclass(frozen=True)
class HQSection:
    url: str = setting(
        "", "Base URL of HQ, e.g. https://hq.example.org:8443; set by `enroll`.", hq_url_problem
    )
    ca_bundle: Path | None = setting(
        None, "PEM file of CA certificates to trust for HQ (default: the system store)."
    )
    timeout_s: float = setting(60.0, "Seconds before one HQ request is abandoned.", positive)


@dataclass(frozen=True)
class SyncSection:
    batch_max_changes: int = setting(
        1000, "Most changes sealed into one batch (fewer on a poor link).", between(1, 100_000)
    )
    batch_max_bytes: int = setting(
        1_048_576,
        "Most uncompressed body bytes per batch: bounds what one lost connection costs (at most "
        "6 MiB, so a batch of data that does not compress stays under HQ's 8 MiB request limit).",
        between(1024, 6 * 1024 * 1024),
    )
    window: int = setting(
        4, "Sealed batches kept ready ahead of HQ's acknowledgement.", between(1, 64)
    )
    zstd_level: int = setting(12, "zstd compression level (1 fast .. 19 small).", between(1, 19))
    backoff_initial_s: float = setting(1.0, "First retry delay after HQ is unreachable.", positive)
    backoff_max_s: float = setting(300.0, "Longest retry delay (doubling with jitter).", positive)
    pull_interval_s: float = setting(
        30.0, "Seconds between downstream pulls when idle.", at_least(0.1)
    )
    feed_page_size: int = setting(
        1000, "Most downstream changes asked for per pull.", between(1, 10_000)
    )
    max_clock_drift_s: float = setting(
        300.0,
        "Downstream timestamps further ahead than this merge but never move this clock.",
        positive,
    )


@dataclass(frozen=True)
class CollectionSection:
    key: str = setting("id", "Field holding the record key (a non-empty string or integer).")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    hq: HQSection = field(default_factory=HQSection)
    sync: SyncSection = field(default_factory=SyncSection)
    collections: dict[str, CollectionSection] = setting(
        {}, "Collections this agent accepts: [collections.NAME] with the key field."
    )

    @property
    def db_path(self) -> Path:
        return self.agent.data_dir / "agent.db"

    @property
    def key_path(self) -> Path:
        return self.agent.data_dir / "node.key"

    @property
    def enrolment_path(self) -> Path:
        return self.agent.data_dir / "hq.json"

    @property
    def token_path(self) -> Path:
        """The local API's bearer token (created by `init`, or by `run` when missing)."""
        return self.agent.data_dir / TOKEN_FILENAME

    @property
    def tls(self) -> bool:
        return self.agent.tls_cert is not None and self.agent.tls_key is not None


def listen_problem(config: AgentConfig) -> tuple[str, str] | None:
    """(setting, reason) when the local API must not listen as configured, else None.

    Beyond loopback anyone on the network reaches the API: that takes `allow_remote = true`
    (so it is never an accident of `0.0.0.0`) and TLS (so the token is not sent in clear).
    """
    section = config.agent
    if (section.tls_cert is None) != (section.tls_key is None):
        missing = "agent.tls_key" if section.tls_key is None else "agent.tls_cert"
        present = "agent.tls_cert" if section.tls_key is None else "agent.tls_key"
        return missing, f"is required when {present} is set (HTTPS needs both)"
    host = section.listen.rpartition(":")[0]
    if is_loopback_host(host):
        return None
    if not section.allow_remote:
        return (
            "agent.listen",
            f"{host} is not a loopback address: the local API would be open to the network; "
            "keep it on 127.0.0.1, or set allow_remote = true with tls_cert and tls_key in [agent]",
        )
    if not config.tls:
        return (
            "agent.tls_cert",
            f"is required with allow_remote = true (listening on {host}): set tls_cert and "
            "tls_key in [agent] so the API token never crosses the network in clear",
        )
    return None


def _resolved(section: Any, base: Path) -> Any:
    """`section` with every relative Path setting made relative to `base`."""
    changes = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Path):
            value = value.expanduser()
            changes[f.name] = value if value.is_absolute() else base / value
    return dataclasses.replace(section, **changes)


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read, check and resolve an agent config file; every failure is a ConfigError naming the
    file and the key."""
    config = load(AgentConfig, path)
    for name in config.collections:
        if name.startswith(RESERVED_PREFIX):
            raise ConfigError(
                path,
                f"collections.{name}",
                f"names starting with {RESERVED_PREFIX!r} are reserved for what HQ sends "
                "(reference tables)",
            )
    base = Path(path).resolve().parent
    config = dataclasses.replace(
        config, agent=_resolved(config.agent, base), hq=_resolved(config.hq, base)
    )
    if (problem := listen_problem(config)) is not None:
        raise ConfigError(path, *problem)
    return config
