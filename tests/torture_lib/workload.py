"""Writers: what the field apps do, through each agent's local API, recorded in the history.

Each writer owns its keys (`<agent>-<writer>-<n>`), so keys are disjoint between agents and a
key's writes are issued one at a time, in order: its final value is checkable. A writer mixes
single PUTs (new keys and whole-record updates), DELETEs of keys it knows exist, and NDJSON bulk
posts (new keys and updates), with short seeded pauses. How an answer is classified:

    2xx                           acked (the seq the agent answered is kept)
    4xx, 503, 507                 refused: the agent says nothing was stored
    other 5xx                     indeterminate
    connection refused            refused: the request was never sent -- unless aiohttp had
                                  already sent it once: it retries PUT and DELETE by itself after
                                  a dropped connection (RFC 9112 9.3.1), so a request that needed
                                  a second connection is indeterminate whatever its end
    dropped connection            indeterminate (the agent died while it had the request)
    our timeout                   late: the agent may still store it, even after later writes
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import aiohttp

from torture_lib.cluster import COLLECTION, KEY_FIELD, Agent
from torture_lib.history import History, Outcome, Write

REQUEST_TIMEOUT_S = 20.0
REFUSED_STATUSES = frozenset({503, 507})
_WORDS = ("water", "seed", "clinic", "school", "voucher", "harvest", "river", "market", "kit")


async def _count_connect(_: Any, context: SimpleNamespace, __: Any) -> None:
    if isinstance(attempt := context.trace_request_ctx, SimpleNamespace):
        attempt.connects += 1


def tracing() -> aiohttp.TraceConfig:
    """Counts the connections each request opened (more than one: aiohttp resent it)."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(_count_connect)
    return trace


def no_resend(session: aiohttp.ClientSession) -> None:
    """Ask aiohttp not to resend a PUT or DELETE after a dropped connection (a private switch,
    the one aiohttp's own test client uses; the connection count above stays the safeguard)."""
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return "acked"
    if status < 500 or status in REFUSED_STATUSES:
        return "refused"
    return "indeterminate"


class Writer:
    def __init__(
        self,
        agent: Agent,
        index: int,
        history: History,
        rng: random.Random,
        session: aiohttp.ClientSession,
        stats: Counter[str],
        *,
        pause_s: float,
    ) -> None:
        self.agent = agent
        self.index = index
        self.history = history
        self.rng = rng
        self.session = session
        self.stats = stats
        self.pause_s = pause_s
        self.created: list[str] = []  # every key this writer has written (in any outcome)
        self.present: set[str] = set()  # keys whose last write is an acknowledged upsert
        self.count = 0
        self.anomalies: list[str] = []

    def _fields(self, key: str, w: str) -> dict[str, Any]:
        note = " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(2, 30)))
        return {KEY_FIELD: key, "w": w, "n": self.count, "agent": self.agent.name, "note": note}

    def _next_w(self) -> str:
        self.count += 1
        return f"{self.agent.name}.{self.index}.{self.count}"

    def _pick_key(self, new_share: float) -> str:
        if not self.created or self.rng.random() < new_share:
            key = f"{self.agent.name}-{self.index}-{len(self.created):06d}"
            self.created.append(key)
            return key
        return self.rng.choice(self.created)

    def _upsert(self, key: str, via: str) -> Write:
        w = self._next_w()
        return self.history.new(self.agent.name, key, "upsert", w, self._fields(key, w), via)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            r = self.rng.random()
            if r < 0.25:
                await self.bulk()
            elif r < 0.88 or not self.present:
                await self.put()
            else:
                await self.delete()
            await asyncio.sleep(self.rng.uniform(0, self.pause_s))

    async def put(self) -> None:
        write = self._upsert(self._pick_key(0.4), "put")
        url = f"{self.agent.api}/v1/collections/{COLLECTION}/records/{write.key}"
        body = json.dumps(write.fields).encode()
        answer = await self._send("PUT", url, body, "application/json", [write])
        if write.outcome == "acked" and answer is not None:
            write.seq = answer.get("seq")
            if not answer.get("changed"):
                self.anomalies.append(f"PUT {write.w} answered unchanged: {answer}")

    async def delete(self) -> None:
        key = self.rng.choice(sorted(self.present))
        write = self.history.new(self.agent.name, key, "delete", self._next_w(), {}, "delete")
        url = f"{self.agent.api}/v1/collections/{COLLECTION}/records/{key}"
        answer = await self._send("DELETE", url, None, "application/json", [write])
        if write.outcome == "acked" and answer is not None:
            write.seq = answer.get("seq")

    async def bulk(self) -> None:
        writes: list[Write] = []
        keys: set[str] = set()
        for _ in range(self.rng.randint(5, 40)):
            key = self._pick_key(0.5)
            if key not in keys:
                keys.add(key)
                writes.append(self._upsert(key, "bulk"))
        body = b"\n".join(json.dumps(w.fields).encode() for w in writes) + b"\n"
        url = f"{self.agent.api}/v1/collections/{COLLECTION}/bulk"
        answer = await self._send("POST", url, body, "application/x-ndjson", writes)
        if writes[0].outcome != "acked" or answer is None:
            return
        first, last = answer.get("first_seq"), answer.get("last_seq")
        whole = answer.get("changed") == len(writes) and not answer.get("queued_errors")
        if not whole:
            # Not what a body of new values to a collection without rules should get: keep it
            # as a finding, and do not claim more than the agent said it stored.
            self.anomalies.append(f"bulk of {len(writes)} answered {answer}")
            for write in writes:
                write.outcome, write.reason = "indeterminate", "partial bulk answer"
        elif first is not None and last is not None and last - first + 1 == len(writes):
            for i, write in enumerate(writes):
                write.seq = first + i

    async def _send(
        self, method: str, url: str, body: bytes | None, content_type: str, writes: list[Write]
    ) -> dict[str, Any] | None:
        headers = {**self.agent.headers(), "Content-Type": content_type}
        outcome: Outcome
        answer: dict[str, Any] | None = None
        status: int | None = None
        attempt = SimpleNamespace(connects=0)
        try:
            async with self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                trace_request_ctx=attempt,
            ) as response:
                status = response.status
                text = await response.read()
            outcome = classify(status)
            reason = f"HTTP {status}"
            if outcome == "refused" and attempt.connects > 1:
                # e.g. a resent DELETE answered 404 because the first one deleted the record
                outcome, reason = "indeterminate", f"resent, then HTTP {status}"
            if outcome == "acked":
                answer = json.loads(text)
            else:
                reason += f": {text[:200].decode(errors='replace')}"
        except aiohttp.ClientConnectorError:
            if attempt.connects > 1:  # refused the second time: the first may have landed
                outcome, reason = "indeterminate", "resent, then connection refused"
            else:
                outcome, reason = "refused", "connection refused"  # nothing was sent
        except TimeoutError:
            outcome, reason = "late", "timed out"
        except (aiohttp.ClientError, OSError) as e:
            outcome, reason = "indeterminate", f"{type(e).__name__}: {e}"
        for write in writes:
            write.outcome, write.status, write.reason = outcome, status, reason
            if write.op == "upsert" and outcome == "acked":
                self.present.add(write.key)
            elif write.op == "delete" and outcome != "refused":
                self.present.discard(write.key)  # deleted, or maybe: do not delete it again
        self.stats[f"{method} {status or reason.split(':')[0]}"] += 1
        if outcome == "refused" and status is None:
            await asyncio.sleep(0.1)  # the agent is down: do not spin
        return answer
