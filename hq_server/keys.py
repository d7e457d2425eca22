"""HQ's own identity: the Ed25519 key that signs acks and feed pages, which agents pin at enrolment."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from hq_server.config import DB_FILENAME
from protocol.files import make_private_dir, tighten
from protocol.identity import NodeIdentity

log = logging.getLogger("fieldsync.hq")


class HQKeyError(Exception):
    """HQ's key file exists but cannot be used (permissions, not an Ed25519 key)."""


def load_or_create_identity(path: Path) -> NodeIdentity:
    """Load HQ's key from `path`, creating it (mode 0600, atomically) on first start.

    Losing this key means every agent must re-enrol (they pinned it), so it is never overwritten:
    `NodeIdentity.save` refuses an existing file, and a concurrent first start simply loads the
    key the other process wrote.
    """
    try:
        secure_data_dir(path.parent)
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                NodeIdentity.generate().save(path)
        return NodeIdentity.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise HQKeyError(f"HQ key {path}: {e}") from e


def secure_data_dir(data_dir: Path) -> None:
    """HQ's data folder 0700 (created if missing) and its database files 0600: a folder or a
    database made by an earlier version (0755, 0644) is tightened, with a warning."""
    tightened = [data_dir] if make_private_dir(data_dir) else []
    for name in (DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm"):
        if tighten(data_dir / name):
            tightened.append(data_dir / name)
    for where in tightened:
        log.warning("%s was readable by others: made private (0700 folder, 0600 files)", where)
