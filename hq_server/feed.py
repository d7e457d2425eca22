"""Downstream: authenticate a node's signed GET and answer a page of the change log sealed by HQ.

Agents pinned HQ's key at enrolment, so a feed page is as tamper-evident as an upstream batch, even
when it travels through relays or on a USB stick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from hq_server.store import FeedPage, HQStore, Node
from protocol.change import encode_changes
from protocol.envelope import Kind, seal
from protocol.errors import UnknownNode
from protocol.hlc import HybridClock
from protocol.identity import NodeIdentity
from protocol.transport import parse_signed_request, verify_request


async def authenticate(
    store: HQStore, headers: Mapping[str, str], method: str, path_qs: str, now_ms: int
) -> tuple[Node, int]:
    """The enrolled, active node that signed this request, and its clock offset in ms.

    BadSignature (401) for a missing signature header or a signature that does not verify,
    CorruptMessage (400) for a malformed one (a time not in canonical decimal, a signature not
    base64 of 64 bytes), UnknownNode (403) for an unknown or revoked node, ClockDrift (400) for
    a request time outside the replay window (docs/protocol.md 9.2).
    """
    signed = parse_signed_request(headers)
    node = await store.get_node(signed.node_id)
    if node is None or not node.active:
        raise UnknownNode(f"node {signed.node_id} is not enrolled here (or was revoked)")
    verify_request(signed, node.public_key, method, path_qs, now_ms)
    return node, signed.time_ms - now_ms


class FeedService:
    """Pages of other nodes' changes for one node, sealed as FEED messages.

    `max_bytes` bounds a page's field data so the sealed body stays well under the receiver's
    decompressed-size cap whatever the record sizes.
    """

    def __init__(
        self,
        store: HQStore,
        identity: NodeIdentity,
        clock: HybridClock,
        *,
        page_size: int,
        max_bytes: int,
    ) -> None:
        self.store = store
        self.identity = identity
        self.clock = clock
        self.page_size = page_size
        self.max_bytes = max_bytes

    async def page(
        self, node_id: str, cursor: int, limit: int, *, groups: Sequence[str] = ()
    ) -> tuple[bytes, FeedPage]:
        """The sealed page after `cursor` (at most min(limit, page_size) changes) and its content.

        The header also tells the node its groups (signed by HQ, like the page): what it may write
        among source_of_truth fields and which review conflicts it may resolve offline."""
        page = await self.store.feed(
            node_id, cursor, min(limit, self.page_size), max_bytes=self.max_bytes
        )
        time = self.clock.now()
        sealed = await asyncio.to_thread(self._seal, page, time, list(groups))
        return sealed, page

    def _seal(self, page: FeedPage, time: int, groups: list[str]) -> bytes:
        return seal(
            self.identity,
            Kind.FEED,
            encode_changes(page.changes),
            count=len(page.changes),
            time=time,
            extra={"cursor": page.cursor, "more": page.more, "groups": groups},
        )
