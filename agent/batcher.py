"""Batcher: seals outbox changes into numbered, signed batches, a bounded window ahead of HQ."""

from __future__ import annotations

import asyncio
import logging

from agent.backoff import wait_any
from agent.store import AgentStore, DiskFull, SealedBatch
from protocol.change import encode_changes
from protocol.envelope import Kind, seal
from protocol.hlc import system_ms
from protocol.identity import NodeIdentity

log = logging.getLogger("fieldsync.agent.batcher")


class Batcher:
    def __init__(
        self,
        store: AgentStore,
        identity: NodeIdentity,
        *,
        max_changes: int,
        max_bytes: int,
        window: int,
        zstd_level: int,
    ) -> None:
        self.store = store
        self.identity = identity
        self.max_changes = max_changes
        self.batch_limit = max_changes  # lowered by the forwarder while the link is poor
        self.max_bytes = max_bytes
        self.window = window
        self.zstd_level = zstd_level
        self.sealed = asyncio.Event()  # set whenever a new batch is ready for the forwarder
        self.acked = asyncio.Event()  # set by the forwarder when the window has room again
        # Held while sealing: the forwarder may seal too, when it runs dry, and holds it while a
        # restore recovery renumbers the outbox.
        self.lock = asyncio.Lock()

    async def seal_next(self) -> SealedBatch | None:
        """Seal the next batch from the outbox, or None if nothing is waiting or the window is full."""
        async with self.lock:
            return await self._seal_next()

    async def _seal_next(self) -> SealedBatch | None:
        if len(await self.store.unacked_batches(self.window)) >= self.window:
            return None
        changes = await self.store.unsealed_changes(self.batch_limit, self.max_bytes)
        if not changes:
            return None
        meta = await self.store.meta()
        seq = int(meta["next_batch_seq"])
        body = encode_changes(changes)
        sealed = await asyncio.to_thread(
            seal,
            self.identity,
            Kind.CHANGES,
            body,
            seq=seq,
            first=changes[0].seq,
            last=changes[-1].seq,
            count=len(changes),
            time=self.store.clock.now(),
            level=self.zstd_level,
        )
        batch = SealedBatch(seq, changes[0].seq, changes[-1].seq, len(changes), sealed)
        await self.store.add_batch(batch, system_ms())
        log.debug("sealed batch %d: %d changes, %d bytes", seq, len(changes), len(sealed))
        self.sealed.set()
        return batch

    async def run(self, stop: asyncio.Event) -> None:
        """Seal ahead of the forwarder. While the last sync failed (the link is down) and summary
        records wait in the outbox, nothing is sealed ahead: the forwarder seals on demand when
        it can send, so those rows keep absorbing increments in place (agent.store) instead of
        going out in several versions the moment the link returns."""
        while not stop.is_set():
            self.store.changed.clear()
            self.acked.clear()
            try:
                link_down = bool((await self.store.meta()).get("last_error"))
                if link_down and await self.store.summaries_open():
                    await wait_any(30.0, stop, self.store.changed, self.acked)
                    continue
                batch = await self.seal_next()
            except DiskFull as e:
                log.warning("sealing waits for disk space (retry in 5 s): %s", e)
                await wait_any(5.0, stop, self.acked)
                continue
            except Exception:
                log.exception("sealing a batch failed; retrying in 5 s")
                await wait_any(5.0, stop)
                continue
            if batch is None:
                await wait_any(30.0, stop, self.store.changed, self.acked)
