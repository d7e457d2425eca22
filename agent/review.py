"""Offline conflict review on the agent: the same `review` conflicts HQ queues, resolved here.

An agent that has applied the same changes as HQ holds the same heads (protocol.merge), so it sees
the same conflicts without being told. A conflict on a field whose policy names a reviewing group
(`owner = "group:NAME"`) can be resolved on a node of that group while it is offline; the
resolution is an ordinary local change whose parent covers every side, so it closes the conflict
here at once and everywhere else when it syncs. Conflicts without a reviewing group are shown
read-only: HQ decides them.

The CLI (`fieldsync-agent conflicts list|show|resolve`) and the local API
(`GET /v1/conflicts`, `GET /v1/conflicts/{collection}/{key}/{field}`,
`POST /v1/conflicts/{collection}/{key}/{field}/resolve` with `{"value": ...}` or `{"take": N}`)
share the functions below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.store import AgentStore, Write
from protocol.hlc import format_hlc
from protocol.merge import NO_POLICIES, Head

_STORE: web.AppKey[AgentStore] = web.AppKey("review_store", AgentStore)
_CHECK: web.AppKey[Any] = web.AppKey("review_check", object)


class ReviewError(Exception):
    """A conflict cannot be shown or resolved as asked; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class LocalConflict:
    collection: str
    key: str
    field: str
    sides: list[Head]  # highest stamp first; sides[0] is the value shown until resolved
    reviewer: str | None  # group:NAME that may resolve it offline; None: HQ decides
    resolvable_here: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "key": self.key,
            "field": self.field,
            "sides": [
                {"value": h.value, "origin": h.origin, "hlc": h.hlc, "at": to_json_when(h.hlc)}
                for h in self.sides
            ],
            "reviewer": self.reviewer,
            "resolvable_here": self.resolvable_here,
        }


def to_json_when(hlc: int) -> str:
    """An HLC as readable UTC time (the raw number if it is out of range)."""
    try:
        return format_hlc(hlc)
    except (OverflowError, ValueError, OSError):
        return str(hlc)


async def list_conflicts(store: AgentStore, collection: str | None = None) -> list[LocalConflict]:
    groups = set(await store.groups())
    out = []
    for coll, key, name, heads in await store.open_conflicts(collection):
        reviewer = store.policies.get(coll, NO_POLICIES).reviewers.get(name)
        out.append(LocalConflict(coll, key, name, heads, reviewer, reviewer in groups))
    return out


async def get_conflict(store: AgentStore, collection: str, key: str, field: str) -> LocalConflict:
    for conflict in await list_conflicts(store, collection):
        if (conflict.key, conflict.field) == (key, field):
            return conflict
    raise ReviewError(f"no open conflict on {collection}/{key} field {field!r}", 404)


async def resolve(
    store: AgentStore,
    collection: str,
    key: str,
    field: str,
    *,
    value: Any = None,
    take: int | None = None,
    check: Callable[[Write], Sequence[object]] | None = None,
) -> tuple[LocalConflict, Any, int]:
    """Resolve with `value`, or with side number `take` (1-based, as listed); returns the
    conflict, the value written and the local change's sequence number. `check` (the edge
    validator's, partial) refuses a value the field's schema does not allow."""
    conflict = await get_conflict(store, collection, key, field)
    if not conflict.resolvable_here:
        who = conflict.reviewer or "HQ"
        raise ReviewError(
            f"{collection}/{key} field {field!r} is reviewed by {who}; this node is not in that "
            "group (its groups come from HQ)",
            403,
        )
    if take is not None:
        if not 1 <= take <= len(conflict.sides):
            raise ReviewError(f"take: choose a side from 1 to {len(conflict.sides)}")
        value = conflict.sides[take - 1].value
    write = Write(collection, key, "upsert", {field: value}, must_exist=True, resolves=True)
    if check is not None and (problems := check(write)):
        raise ReviewError("; ".join(str(p) for p in problems), 422)
    (result,) = await store.write([write])
    if result.missing:
        raise ReviewError(f"{collection}/{key} was deleted meanwhile: nothing to resolve", 409)
    if result.refused or result.seq is None:
        raise ReviewError(f"{collection}/{key}: {result.refused or 'nothing was written'}", 409)
    return conflict, value, result.seq


# ---- local API -----------------------------------------------------------------------------


def _error(e: ReviewError) -> web.Response:
    return web.json_response({"error": "conflict", "message": str(e)}, status=e.status)


async def _list(request: web.Request) -> web.Response:
    conflicts = await list_conflicts(request.app[_STORE], request.query.get("collection"))
    return web.json_response({"conflicts": [c.to_json() for c in conflicts]})


async def _show(request: web.Request) -> web.Response:
    m = request.match_info
    try:
        conflict = await get_conflict(request.app[_STORE], m["collection"], m["key"], m["field"])
    except ReviewError as e:
        return _error(e)
    return web.json_response(conflict.to_json())


async def _resolve(request: web.Request) -> web.Response:
    m = request.match_info
    try:
        body = await request.json()
    except ValueError:
        return _error(ReviewError('body must be JSON: {"value": ...} or {"take": N}'))
    if not isinstance(body, dict) or ("value" in body) == ("take" in body):
        return _error(ReviewError('body must be {"value": ...} or {"take": N}, exactly one'))
    take = body.get("take")
    if "take" in body and (type(take) is not int):
        return _error(ReviewError("take must be an integer"))
    try:
        conflict, value, seq = await resolve(
            request.app[_STORE],
            m["collection"],
            m["key"],
            m["field"],
            value=body.get("value"),
            take=take,
            check=request.app.get(_CHECK),
        )
    except ReviewError as e:
        return _error(e)
    return web.json_response({"resolved": conflict.to_json(), "value": value, "seq": seq})


def add_routes(
    app: web.Application,
    store: AgentStore,
    check: Callable[[Write], Sequence[object]] | None = None,
) -> None:
    """Serve offline conflict review on the agent's local API."""
    app[_STORE] = store
    app[_CHECK] = check
    app.router.add_get("/v1/conflicts", _list)
    app.router.add_get("/v1/conflicts/{collection}/{key}/{field}", _show)
    app.router.add_post("/v1/conflicts/{collection}/{key}/{field}/resolve", _resolve)
