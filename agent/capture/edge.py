"""The edge pipeline's steps that need the stored record: transform, forwarding mode, append_only.

Validation (agent.capture.validate) judges what an app sends before anything is stored. What
happens next depends on the record as stored, so it runs inside the store's write transaction,
through `CollectionEdge.plan`, which the store calls for every write that carries it
(`Write.edge`):

* append_only: a record that exists is never changed or deleted; the same record sent again is
  accepted and changes nothing (a retry);
* transform (protocol.transforms): the record is stored and sent in its transformed shape; fields
  it drops are stored but never put in the outbox. A PATCH is laid over the stored record in its
  declared shape, so derived fields are computed from the whole record;
* forward = "summary": the record is stored locally with no outbox entry, and what it adds to its
  groups' summary records (protocol.summary) is applied in the same transaction: a record is
  counted exactly once however the agent stops;
* forward = "exceptions": a record is forwarded only once a flag rule fires (its first change
  carries the whole record), then every later change of it too; the flags that fired are in
  `flags_field`. Unflagged records stay local.

Records kept local stay queryable (GET, list, `fieldsync-agent get`) like any other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from agent.store import Planned, SummaryUpdate, Write
from protocol.collections import Collection, ReferenceTable
from protocol.limits import size_problem
from protocol.summary import add, contributions
from protocol.transforms import original, transform
from protocol.validation import check_rules


class CollectionEdge:
    """One collection's in-transaction edge steps (see the module docstring)."""

    def __init__(
        self,
        collection: Collection,
        references: Mapping[str, ReferenceTable],
        clock_ms: Callable[[], int],
    ) -> None:
        self.collection = collection
        self.references = references
        self._clock_ms = clock_ms

    def plan(self, write: Write, current: dict[str, Any] | None, node: str) -> Planned:
        """What the store must do for `write`, given the live record it replaces (None: there is
        none). Total: every outcome, refusals included, is a Planned."""
        c = self.collection
        if write.op == "delete":
            if c.append_only and current is not None:
                return Planned(
                    {}, refused=f"{c.name} is append_only: {write.key!r} is never deleted"
                )
            return Planned({})
        record = write.fields
        if write.must_exist and current is not None:
            record = original(c, current) | write.fields
        fields, local_only, problems = transform(c, record, self.references)
        if problems:  # checked before the write was queued; a newer reference table can differ
            return Planned({}, refused="; ".join(p.message for p in problems))
        if c.transform is not None and (too_big := self._size_problem(fields, local_only)):
            # Lookups and derived fields can make the record sent larger than the one checked.
            return Planned({}, refused=too_big)
        forward, whole = True, False
        if c.forward == "exceptions":
            flagged = self._flags(record)
            forward = bool(flagged) or (current is not None and c.flags_field in current)
            if forward:
                fields[c.flags_field] = flagged
                whole = current is None or c.flags_field not in current
        if c.append_only and current is not None:
            differs = [n for n, v in fields.items() if current.get(n, _ABSENT) != v]
            if differs:
                return Planned(
                    {},
                    refused=(
                        f"{c.name} is append_only: {write.key!r} exists and is never changed "
                        f"({', '.join(sorted(differs)[:5])} differ)"
                    ),
                )
            return Planned(fields, local_only, forward=False)
        summaries: list[SummaryUpdate] = []
        if c.summary is not None:
            forward = False
            if current is None:
                summary = c.summary
                for delta in contributions(summary, record, node):
                    summaries.append(
                        SummaryUpdate(
                            summary.collection,
                            delta.key,
                            lambda held, d=delta: add(summary, held, d),  # type: ignore[misc]
                        )
                    )
        return Planned(fields, local_only, forward=forward, whole=whole, summaries=summaries)

    def summary_records(self, write: Write, node: str) -> list[tuple[str, str]]:
        """The summary records `write` would add to (summary mode, a new record)."""
        summary = self.collection.summary
        if summary is None or write.op != "upsert" or write.must_exist:
            return []
        return [(summary.collection, d.key) for d in contributions(summary, write.fields, node)]

    @staticmethod
    def _size_problem(fields: dict[str, Any], local_only: frozenset[str]) -> str | None:
        """HQ's limit on a change (protocol.limits) applied to what the record would send."""
        sent = {n: v for n, v in fields.items() if n not in local_only} if local_only else fields
        problem = size_problem(sent)
        return None if problem is None else f"as sent (transformed), {problem}"

    def _flags(self, record: dict[str, Any]) -> list[str]:
        now = dt.datetime.fromtimestamp(self._clock_ms() / 1000, dt.UTC)
        fired = check_rules(
            self.collection.flags, record, references=self.references, today=now.date(), now=now
        )
        return sorted({v.rule for v in fired})


_ABSENT = object()
