"""HQ's own identity: the Ed25519 key that signs acks and feed pages, which agents pin at enrolment."""

from __future__ import annotations

import contextlib
from pathlib import Path

from protocol.identity import NodeIdentity


class HQKeyError(Exception):
    """HQ's key file exists but cannot be used (permissions, not an Ed25519 key)."""


def load_or_create_identity(path: Path) -> NodeIdentity:
    """Load HQ's key from `path`, creating it (mode 0600, atomically) on first start.

    Losing this key means every agent must re-enrol (they pinned it), so it is never overwritten:
    `NodeIdentity.save` refuses an existing file, and a concurrent first start simply loads the
    key the other process wrote.
    """
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):
                NodeIdentity.generate().save(path)
        return NodeIdentity.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise HQKeyError(f"HQ key {path}: {e}") from e
