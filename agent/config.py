"""Agent settings: one TOML file, every key documented in config/agent.example.toml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

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


def _https_or_local(url: str) -> str | None:
    if url.startswith("https://"):
        return None
    if url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        return None
    if url == "":
        return None
    return "must be an https:// URL (plain http is allowed only to 127.0.0.1/localhost)"


@dataclass(frozen=True)
class AgentSection:
    data_dir: Path = setting(
        Path("/var/lib/fieldsync-agent"),
        "Folder holding agent.db (records, outbox, batches), node.key and hq.json.",
    )
    name: str = setting("", "Human name of this node shown at HQ; defaults to the host name.")
    listen: str = setting(
        "127.0.0.1:8470", "HOST:PORT of the local HTTP API (keep it on loopback).", listen_address
    )
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
        "", "Base URL of HQ, e.g. https://hq.example.org:8443; set by `enroll`.", _https_or_local
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


def load_agent_config(path: Path | str) -> AgentConfig:
    config = load(AgentConfig, path)
    for name in config.collections:
        if name.startswith(RESERVED_PREFIX):
            raise ConfigError(
                path,
                f"collections.{name}",
                f"names starting with {RESERVED_PREFIX!r} are reserved for what HQ sends "
                "(reference tables)",
            )
    collections_file = config.agent.collections_file
    if collections_file is not None and not collections_file.is_absolute():
        resolved = Path(path).resolve().parent / collections_file
        config = dataclasses.replace(
            config, agent=dataclasses.replace(config.agent, collections_file=resolved)
        )
    return config
