"""Forwarder: pushes sealed batches to HQ until acked, pulls HQ's downstream feed.

It deletes nothing until it holds HQ's signed ack covering it, so a crash or a dropped connection at
any point means a resend, which HQ deduplicates by (node, batch sequence). Failures back off
exponentially with jitter; a poor link also shrinks the batches sealed next.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.backoff import Backoff, wait_any
from agent.batcher import Batcher
from agent.hqclient import Diverged, Gap, HQClient, HQError, RejectedError, TransientError
from agent.store import AgentStore, DiskFull, HQMarks, StoreError
from protocol.hlc import system_ms
from protocol.references import REFERENCES_COLLECTION

PROBE_EVERY = 4  # see sync_once
# Restore recoveries one push may run: a second "diverged" right after a recovery means HQ's marks
# and this node disagree in a way renumbering cannot settle (it is refused, for an operator).
MAX_RECOVERIES = 2
log = logging.getLogger("fieldsync.agent.forwarder")
MIN_BATCH_LIMIT = 16


@dataclass
class SyncCounters:
    batches_sent: int = 0
    changes_acked: int = 0
    bytes_sent: int = 0
    changes_pulled: int = 0


class Forwarder:
    def __init__(
        self,
        store: AgentStore,
        client: HQClient,
        batcher: Batcher,
        *,
        backoff: Backoff,
        pull_interval_s: float,
        feed_page_size: int,
    ) -> None:
        self.store = store
        self.client = client
        self.batcher = batcher
        self.backoff = backoff
        self.pull_interval_s = pull_interval_s
        self.feed_page_size = feed_page_size
        self.counters = SyncCounters()
        self.pull_now = asyncio.Event()
        # The highest batch HQ acked that could not be forgotten here yet (a full disk): sending
        # goes on after it; it is forgotten as soon as a write succeeds again.
        self.unrecorded_ack = 0
        # Called after a feed page holding reference tables from HQ has been applied.
        self.on_references: Callable[[], Awaitable[object]] | None = None

    async def push_all(self) -> int:
        """Send every sealed batch in order until none is left; returns changes acked."""
        acked = recoveries = 0
        if self.unrecorded_ack:
            acked += await self._forget_acked(self.unrecorded_ack)
        while True:
            waiting = await self.store.unacked_batches(1, after=self.unrecorded_ack)
            if not waiting:
                # Seal what is queued, then send the *oldest* batch: the batcher task may have
                # sealed one meanwhile, and HQ takes batches strictly in order.
                await self.batcher.seal_next()
                waiting = await self.store.unacked_batches(1, after=self.unrecorded_ack)
                if not waiting:
                    return acked
            batch = waiting[0]
            answer = await self.client.push(batch.sealed)
            if isinstance(answer, Gap):
                raise RejectedError(
                    f"HQ expects batch {answer.expected} but this node's next unacked batch is "
                    f"{batch.seq}: HQ has lost acknowledged data (restored from a backup?). "
                    "Nothing is deleted here; HQ needs an operator."
                )
            if isinstance(answer, Diverged):
                recoveries += 1
                await self._recover(answer, recoveries)
                continue
            if answer.acked_through < batch.seq:
                raise RejectedError(
                    f"HQ acked through {answer.acked_through} after receiving batch {batch.seq}"
                )
            acked_through = answer.acked_through
            sealed_through = int((await self.store.meta())["next_batch_seq"]) - 1
            if acked_through > sealed_through:
                # Restored from a backup: HQ holds batches this node never sealed (since the
                # backup). HQ confirmed this one as identical to its own; the numbers after it
                # hold other content at HQ, so only this one is forgotten. The next batch sent
                # is refused as diverged, with the marks the recovery needs.
                log.warning(
                    "HQ acks batch %d but this node sealed only %d: restored from a backup?"
                    " Recovering from HQ's next answer",
                    acked_through,
                    sealed_through,
                )
                acked_through = batch.seq
            try:
                released = await self._forget_acked(acked_through)
            except DiskFull:
                # HQ holds these batches; forgetting them here waits for disk space, sending the
                # next ones does not. After a restart they are sent again and HQ acks them again.
                self.unrecorded_ack = max(self.unrecorded_ack, acked_through)
                released = 0
                log.warning("ack for batch %d not recorded yet: disk full", acked_through)
            acked += released
            self.counters.batches_sent += 1
            self.counters.changes_acked += released
            self.counters.bytes_sent += len(batch.sealed)
            self._contact()
            self.batcher.batch_limit = min(self.batcher.max_changes, self.batcher.batch_limit * 2)
            self.batcher.acked.set()

    async def _recover(self, refusal: Diverged, attempt: int) -> None:
        """HQ refused a batch as diverged: keep its changes, show the refusal in `status`, and
        renumber and restamp this node's unsent changes above HQ's marks (restore recovery)."""
        marks = HQMarks(refusal.hq_acked_through, refusal.hq_change_seq, refusal.hq_max_hlc)
        what = (
            f"HQ refused batch {refusal.batch} (changes {refusal.seqs[0]}-{refusal.seqs[1]}) as "
            f"diverged: {refusal.message} (HQ holds batches through {marks.acked_through} and "
            f"changes through {marks.change_seq} from this node)"
        )
        log.warning("%s", what)
        note = {"at_ms": system_ms(), "message": what, "batch": refusal.batch}
        try:
            await self.store.set_meta(hq_refusal=json.dumps(note))
        except StoreError as e:
            log.warning("could not record HQ's refusal: %s", e)
        recovery = None
        if attempt <= MAX_RECOVERIES:
            async with self.batcher.lock:  # no batch sealed from the old numbering meanwhile
                recovery = await self.store.recover_from_restore(marks)
        if recovery is None:
            raise RejectedError(
                f"{what}; this node's numbering is already above those marks, so renumbering "
                "cannot help: nothing is deleted, HQ's operator must compare the node's history"
            )
        self.unrecorded_ack = 0
        log.warning(
            "recovered from a restore: %d unsent changes renumbered from %s and stamped above "
            "HQ's newest stamp, %d already at HQ forgotten, %d sealed batches re-queued; next "
            "batch %d",
            recovery.renumbered,
            recovery.first_seq,
            recovery.already_at_hq,
            recovery.dropped_batches,
            recovery.next_batch_seq,
        )

    async def _forget_acked(self, acked_through: int) -> int:
        released = await self.store.mark_acked(acked_through)
        if acked_through >= self.unrecorded_ack:
            self.unrecorded_ack = 0
        return released

    async def pull_all(self) -> int:
        """Apply downstream pages until HQ says there is no more; returns records changed."""
        applied = 0
        meta = await self.store.meta()
        cursor = int(meta["feed_cursor"])
        while True:
            page = await self.client.pull(cursor, self.feed_page_size)
            applied += await self.store.apply_feed(page.changes, page.cursor, page.groups)
            if self.on_references is not None and any(
                c.collection == REFERENCES_COLLECTION for c in page.changes
            ):
                await self.on_references()
            self.counters.changes_pulled += len(page.changes)
            cursor = page.cursor
            self._contact()
            if not page.more:
                return applied

    def _contact(self) -> None:
        if self.client.clock_offset_ms is not None:
            self.store.clock.offset_ms = self.client.clock_offset_ms

    async def _record(self, error: str = "") -> None:
        """Note the sync's outcome for `status`. Bookkeeping only: when it cannot be written (a
        full disk) the loop goes on, since forwarding is what frees space."""
        values: dict[str, object] = {"hq_offset_ms": self.store.clock.offset_ms}
        if error:
            values |= {"last_error": error, "last_error_ms": system_ms()}
        else:
            values |= {"last_contact_ms": system_ms(), "last_error": ""}
        try:
            await self.store.set_meta(**values)
        except StoreError as e:
            log.warning("could not record the sync result: %s", e)

    async def sync_once(self) -> None:
        """Push, then pull -- the pull even when the push failed: a batch HQ refuses must not cut
        the office off from HQ's data.

        After a failure the link is first probed with the pull (a small signed GET): sealing a
        batch for a link that is still down would claim summary rows that could otherwise keep
        absorbing increments (fewer bytes once the link returns)."""
        # Every PROBE_EVERY-th attempt pushes without probing: a feed page that keeps failing
        # (reported like a link failure) must not stop uploads for good.
        if self.backoff.failures % PROBE_EVERY:
            try:
                await self.pull_all()
            except TransientError:
                raise  # the link is still down: keep the rows open, try again later
            except (HQError, DiskFull):
                pass  # HQ refused the pull, or it cannot be stored: that must not stop the push
        try:
            await self.push_all()
        except HQError:
            await self.pull_all()
            raise
        await self.pull_all()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.batcher.sealed.clear()
            self.pull_now.clear()
            try:
                await self.sync_once()
            except HQError as e:
                delay = self.backoff.next_delay()
                self.batcher.batch_limit = min(
                    self.batcher.max_changes, max(MIN_BATCH_LIMIT, self.batcher.batch_limit // 2)
                )
                log.warning("sync failed (retry in %.1f s): %s", delay, e)
                await self._record(str(e))
                await wait_any(delay, stop)
                continue
            except DiskFull as e:
                # Nothing is lost: a batch HQ acked but not yet forgotten here is sent again and
                # HQ answers with the same ack. Sending goes on; writes are refused meanwhile.
                delay = self.backoff.next_delay()
                log.warning("sync paused by a full disk (retry in %.1f s): %s", delay, e)
                await wait_any(delay, stop)
                continue
            except Exception as e:
                delay = self.backoff.next_delay()
                log.exception("sync failed unexpectedly (retry in %.1f s)", delay)
                await self._record(f"internal error: {type(e).__name__}: {e}")
                await wait_any(delay, stop)
                continue
            self.backoff.reset()
            await self._record()
            await wait_any(self.pull_interval_s, stop, self.batcher.sealed, self.pull_now)
