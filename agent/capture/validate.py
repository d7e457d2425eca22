"""Validation at the edge: records are checked against the collections file before they are stored.

One checker for every capture path (local API, CLI), so a record is judged the same way whichever
door it came through. "Today" and "now" come from the agent's clock, which tracks HQ's time, so a
laptop with a wrong clock does not refuse today's registrations as "in the future".
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from agent.capture.edge import CollectionEdge
from agent.capture.records import RecordError
from agent.config import AgentConfig
from agent.store import AgentStore, Write
from protocol.collections import CollectionsConfig, ReferenceTable, load_collections
from protocol.config import ConfigError
from protocol.references import REFERENCES_COLLECTION, newer_tables
from protocol.transforms import transform
from protocol.validation import validate

log = logging.getLogger("fieldsync.agent.validate")


class EdgeValidator:
    """Judges writes against the collections file and prepares them for the rest of the edge
    pipeline (agent.capture.edge): `check` attaches the collection's `CollectionEdge` to every
    write it passes, and the store applies it in the write transaction."""

    def __init__(self, collections: CollectionsConfig, clock_ms: Callable[[], int]) -> None:
        self.collections = collections
        self._clock_ms = clock_ms
        # The tables rules and lookups read: the collections file's, replaced by newer ones HQ
        # sent (load_references). One dict, shared with every CollectionEdge, updated in place.
        self.references: dict[str, ReferenceTable] = dict(collections.references)
        self.edges = {
            name: CollectionEdge(collection, self.references, clock_ms)
            for name, collection in collections.collections.items()
        }
        self.derived = {
            c.summary.collection: name
            for name, c in collections.collections.items()
            if c.summary is not None
        }

    async def load_references(self, store: AgentStore) -> list[str]:
        """Use the newest reference tables HQ sent (records of `_references` in the local store)
        for the tables the collections file defines; returns the names now taken from HQ."""
        records: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page, after = await store.page(REFERENCES_COLLECTION, after=after, limit=500)
            records.extend(page)
            if after is None:
                break
        used, skipped = newer_tables(self.collections.references, records)
        for reason in skipped:
            log.warning("not using a table HQ sent: %s", reason)
        self.references.update(used)
        return sorted(used)

    @classmethod
    def for_agent(cls, config: AgentConfig, clock_ms: Callable[[], int]) -> EdgeValidator | None:
        """The checker the agent's config asks for (None without `agent.collections_file`).

        Every collection the agent accepts must be defined there, with the same key field.
        """
        path = config.agent.collections_file
        if path is None:
            return None
        collections = load_collections(path)
        for name, section in config.collections.items():
            defined = collections.collections.get(name)
            if defined is None and name in collections_derived(collections):
                continue  # summary records: readable through the local API, written by the agent
            if defined is None:
                raise ConfigError(
                    path, f"collections.{name}", "the agent accepts this collection: define it here"
                )
            if defined.key != section.key:
                raise ConfigError(
                    path,
                    f"collections.{name}.key",
                    f"is {defined.key!r} but the agent's config says {section.key!r}",
                )
        return cls(collections, clock_ms)

    def check(
        self,
        write: Write,
        *,
        line: int | None = None,
        source: str | None = None,
        partial: bool = False,
    ) -> list[RecordError]:
        """What is wrong with `write` (nothing for collections not defined here). A write that
        passes carries its collection's edge steps (`write.edge`) to the store."""
        if write.collection in self.derived:
            source_name = self.derived[write.collection]
            return [
                RecordError(
                    f"{write.collection} holds the summaries of {source_name}: only the agent "
                    "writes it",
                    "derived_collection",
                    line,
                    write.key,
                    None,
                    source,
                )
            ]
        collection = self.collections.collections.get(write.collection)
        if collection is None:
            return []
        if write.op != "upsert":
            write.edge = self.edges[write.collection]
            return []
        now = dt.datetime.fromtimestamp(self._clock_ms() / 1000, dt.UTC)
        violations = validate(
            collection,
            write.fields,
            references=self.references,
            today=now.date(),
            now=now,
            partial=partial,
        )
        if not violations:
            # Lookups of the codes present; a PATCH's derived fields are made in the store.
            violations = transform(collection, write.fields, self.references)[2]
        if not violations:
            write.edge = self.edges[write.collection]
        return [
            RecordError(v.message, v.rule, line, write.key, v.field or None, source, v.stage)
            for v in violations
        ]


def collections_derived(collections: CollectionsConfig) -> set[str]:
    """Names of the summary collections the agent writes itself."""
    return {c.summary.collection for c in collections.collections.values() if c.summary}
