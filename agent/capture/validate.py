"""Validation at the edge: records are checked against the collections file before they are stored.

One checker for every capture path (local API, CLI), so a record is judged the same way whichever
door it came through. "Today" and "now" come from the agent's clock, which tracks HQ's time, so a
laptop with a wrong clock does not refuse today's registrations as "in the future".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from agent.capture.records import RecordError
from agent.config import AgentConfig
from agent.store import Write
from protocol.collections import CollectionsConfig, load_collections
from protocol.config import ConfigError
from protocol.validation import validate


class EdgeValidator:
    def __init__(self, collections: CollectionsConfig, clock_ms: Callable[[], int]) -> None:
        self.collections = collections
        self._clock_ms = clock_ms

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
        """What is wrong with `write` (nothing for deletes or collections not defined here)."""
        collection = self.collections.collections.get(write.collection)
        if collection is None or write.op != "upsert":
            return []
        now = dt.datetime.fromtimestamp(self._clock_ms() / 1000, dt.UTC)
        violations = validate(
            collection,
            write.fields,
            references=self.collections.references,
            today=now.date(),
            now=now,
            partial=partial,
        )
        return [
            RecordError(v.message, v.rule, line, write.key, v.field or None, source, v.stage)
            for v in violations
        ]
