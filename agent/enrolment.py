"""What the agent pins about its HQ after enrolment: URL, HQ node id and HQ public key (hq.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.files import atomic_write
from protocol.transport import b64, unb64


@dataclass(frozen=True)
class Enrolment:
    url: str
    node_id: str
    hq_node_id: str
    hq_public_key: bytes
    # The node groups HQ gave this node at enrolment; later changes arrive with the feed.
    groups: tuple[str, ...] = ()
    # The name HQ enrolled this node under: the enrolment token's, whatever name the agent sent.
    name: str = ""

    def save(self, path: Path) -> None:
        """Atomically and durably (see protocol.files)."""
        data = asdict(self) | {
            "hq_public_key": b64(self.hq_public_key),
            "groups": list(self.groups),
        }
        with atomic_write(path, mode=0o600, text=True) as f:
            json.dump(data, f, indent=2)

    @classmethod
    def load(cls, path: Path) -> Enrolment:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            url=data["url"],
            node_id=data["node_id"],
            hq_node_id=data["hq_node_id"],
            hq_public_key=unb64(data["hq_public_key"], f"{path}: hq_public_key"),
            groups=tuple(data.get("groups", ())),
            name=str(data.get("name", "")),
        )
