"""HQ settings: the `[hq]` table of the HQ's TOML file.

Built on `protocol.config`, so unknown keys, wrong types and failed checks are refused with the file,
the dotted key and the reason. On top of the per-key checks, `load_config` refuses combinations that
make no sense (a TLS certificate without its key) and resolves relative paths against the folder of
the config file: an operator reading the file should not have to know the daemon's working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import (
    ConfigError,
    between,
    build,
    listen_address,
    load,
    positive,
    setting,
)
from protocol.envelope import HARD_MAX_RAW_BYTES

MIB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
DB_FILENAME = "hq.db"
KEY_FILENAME = "hq.key"


def _log_level(value: Any) -> str | None:
    return None if value in LOG_LEVELS else "must be one of " + ", ".join(LOG_LEVELS)


@dataclass(frozen=True)
class HQSection:
    data_dir: Path = setting(
        Path("/var/lib/fieldsync-hq"),
        "Directory holding the SQLite database (hq.db) and HQ's Ed25519 private key (hq.key, "
        "created on first start with mode 0600). Relative paths are resolved against the folder "
        "of the config file.",
    )
    listen: str = setting(
        "127.0.0.1:8443",
        "HOST:PORT to listen on; port 0 picks a free port (the real one is printed at start).",
        listen_address,
    )
    tls_cert: Path | None = setting(
        None, "PEM certificate chain; with tls_key set, HQ serves HTTPS instead of HTTP."
    )
    tls_key: Path | None = setting(None, "PEM private key for tls_cert.")
    max_batch_bytes: int = setting(
        8 * MIB, "Largest request body accepted, in bytes; larger requests get 413.", positive
    )
    max_raw_bytes: int = setting(
        32 * MIB,
        "Largest decompressed batch body, in bytes (checked before decompression; hard cap "
        f"{HARD_MAX_RAW_BYTES}).",
        between(1, HARD_MAX_RAW_BYTES),
    )
    max_clock_ahead_s: int = setting(
        300,
        "Seconds a node's timestamps may run ahead of HQ's clock before the node is flagged "
        "(its data is still accepted) and its stamps are bounded: a stamp further ahead never "
        "wins a field over an edit made later in real time.",
        positive,
    )
    feed_page_size: int = setting(
        1000, "Most changes per downstream feed page.", between(1, 100_000)
    )
    token_ttl_hours: float = setting(
        72.0, "Default lifetime of an enrolment token, in hours.", positive
    )
    log_level: str = setting("info", "Log level: debug, info, warning or error.", _log_level)
    routes_file: Path | None = setting(
        None,
        "TOML file of routes and mappings that deliver HQ's changes onward to business systems "
        "(see config/routes.example.toml). Not set: nothing is routed.",
    )
    collections_file: Path | None = setting(
        None,
        "The collections file the agents use (see config/collections.example.toml): its conflict "
        "policies (review queue, source_of_truth owners) apply at HQ. Not set: every field is "
        "last-writer-wins.",
    )

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILENAME

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_FILENAME

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def host_port(self) -> tuple[str, int]:
        """`listen` split for binding; IPv6 brackets (`[::1]:8443`) are removed from the host."""
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True)
class HQConfig:
    hq: HQSection = dataclasses.field(default_factory=HQSection)


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def finish(config: HQConfig, source: Path | str) -> HQConfig:
    """Cross-key checks and path resolution for a config built from `source`."""
    section = config.hq
    if (section.tls_cert is None) != (section.tls_key is None):
        missing = "hq.tls_key" if section.tls_key is None else "hq.tls_cert"
        present = "hq.tls_cert" if section.tls_key is None else "hq.tls_key"
        raise ConfigError(source, missing, f"is required when {present} is set (HTTPS needs both)")
    base = Path(source).resolve().parent
    data_dir = _resolve(section.data_dir, base)
    assert data_dir is not None
    return HQConfig(
        hq=dataclasses.replace(
            section,
            data_dir=data_dir,
            tls_cert=_resolve(section.tls_cert, base),
            tls_key=_resolve(section.tls_key, base),
            routes_file=_resolve(section.routes_file, base),
            collections_file=_resolve(section.collections_file, base),
        )
    )


def load_config(path: Path | str) -> HQConfig:
    """Read, validate and resolve an HQ config file; every failure is a ConfigError naming file+key."""
    return finish(load(HQConfig, path), path)


def config_from_dict(data: dict[str, Any], source: Path | str = "<memory>") -> HQConfig:
    """Same checks as `load_config` for an in-memory table (tests, embedding)."""
    return finish(build(HQConfig, data, source), source)
