"""What the workload wrote and what the agents answered: the history the checker judges.

Every write gets a unique id `w`, carried in the record itself (upserts) so that the checker can
find it in HQ's change log whatever sequence number it ends up under. A write's outcome is one of:

    acked          the agent answered 2xx: it promised the write is durable; it must reach HQ
                   exactly once, and if it is a key's last acknowledged write it must be HQ's
                   final value (unless a later indeterminate write may have replaced it)
    refused        the agent answered 4xx/5xx saying nothing was stored (507 disk full, 503
                   store unavailable, 4xx), or the connection could not even be opened: it must
                   not appear at HQ
    indeterminate  the connection dropped or the agent answered 500 after the request was sent:
                   it may or may not be there; absent is not a loss, twice is a duplicate
    late           like indeterminate, but the agent may still be working on it (our client gave
                   up waiting on a live agent): it may even land after later writes of its key

Each key is written by one sequential writer only, so a key's writes are totally ordered by
`order` (issue order), and the final value a key may have is well defined.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Op = Literal["upsert", "delete"]
Outcome = Literal["pending", "acked", "refused", "indeterminate", "late"]
OUTCOMES: tuple[Outcome, ...] = ("acked", "refused", "indeterminate", "late")


@dataclass
class Write:
    """One write to one key, as the workload issued it."""

    agent: str  # the agent's name in the run, e.g. "a1"
    key: str
    op: Op
    w: str  # unique write id ("a1-3-000042"); in the record for upserts
    fields: dict[str, Any]  # the whole record written (upsert); {} for a delete
    order: int  # issue order among all writes (a key's writes are ordered by it)
    via: str  # "put", "delete" or "bulk"
    outcome: Outcome = "pending"
    seq: int | None = None  # change sequence the agent answered (None: unknown)
    status: int | None = None  # HTTP status, when there was an answer
    reason: str = ""  # why refused / indeterminate


@dataclass
class History:
    """Every write of a run, in issue order, and the node id behind each agent name."""

    writes: list[Write] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # agent name -> node id

    def new(self, agent: str, key: str, op: Op, w: str, fields: dict[str, Any], via: str) -> Write:
        write = Write(agent, key, op, w, fields, len(self.writes), via)
        self.writes.append(write)
        return write

    def counts(self) -> Counter[str]:
        return Counter(w.outcome for w in self.writes)

    def dump(self, path: Path) -> None:
        """Every write as a JSON line (after a failed run: the evidence next to the logs)."""
        with path.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"nodes": self.nodes}) + "\n")
            for write in self.writes:
                out.write(json.dumps(dataclasses.asdict(write)) + "\n")
