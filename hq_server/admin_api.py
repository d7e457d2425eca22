"""HQ's admin API: the conflict queue over HTTP, for review tools.

Endpoints (registered by `hq_server.app.create_app`)::

    GET  /v1/admin/conflicts?status=open|resolved|auto|all&collection=C&after=ID&limit=N
    GET  /v1/admin/conflicts/{id}
    POST /v1/admin/conflicts/{id}/resolve     {"value": V} or {"take": N}, optional "note"
    PATCH /v1/admin/records/{collection}/{key}  {"field": value, ...}: an HQ system writes fields

An HQ system (case management, say) writes with a token named after it: token NAME writes as
`hq:NAME`, so it may change the source_of_truth fields owned by `hq:NAME` and any lww or review
field -- never a field another owner holds (403). Its write is an HQ change like a resolution:
checked against the field schema, logged, routed and sent to every node.

Every request carries `Authorization: Bearer <token>`, a token from `fieldsync-hq api-token
create NAME`. Only its SHA-256 is stored and a request's token is looked up by that hash, so
neither the database nor the timing of a refusal reveals a token; tokens are never logged. What a
token does is audited with actor `api:NAME`.

Refusals are JSON `{"error": code, "message": text}` like the rest of HQ's API (app.py's middleware
turns the errors below into responses)::

    ProtocolError
    ├── Unauthorized   (401) no bearer token, or an unknown or revoked one
    ├── BadRequest     (400) query parameters or body not as documented, or a value the
    │                        field's schema refuses; nothing changed
    ├── Forbidden      (403) a source_of_truth field owned by someone else
    ├── NotFound       (404) no conflict with this id, no such record
    └── NotOpen        (409) the conflict is already resolved (or was logged as settled)

The conflict document (`conflict_json`) is the one `fieldsync-hq conflicts ... --json` prints:
sides numbered from 1 (highest stamp first; `take` and `--take` use these numbers), each with the
writing node's id and name and the write's time read from its HLC.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import hdrs, web

from hq_server.store import (
    ApiToken,
    ConflictEntry,
    ConflictNotFound,
    ConflictNotOpen,
    HQStore,
    UnstorableChange,
)
from protocol.collections import CollectionsConfig, ReferenceTable
from protocol.errors import Oversize, ProtocolError
from protocol.hlc import physical_ms
from protocol.references import REFERENCES_COLLECTION, newer_tables
from protocol.validation import validate

PREFIX = "/v1/admin"
CONFLICTS_PATH = f"{PREFIX}/conflicts"
STATUSES = ("open", "resolved", "auto", "all")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_NOTE = 2000
MAX_TOKEN_CHARS = 512
HQ_NAME = "HQ"  # the name shown for changes HQ wrote itself
_ID = r"{id:\d{1,18}}"  # within SQLite's integer range


class Unauthorized(ProtocolError):
    code = "unauthorized"
    http_status = 401


class BadRequest(ProtocolError):
    code = "bad_request"


class NotFound(ProtocolError):
    code = "not_found"
    http_status = 404


class Forbidden(ProtocolError):
    code = "forbidden"
    http_status = 403


class NotOpen(ProtocolError):
    code = "not_open"
    http_status = 409


# -- the conflict document, shared with the CLI


def iso_time(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ISO 8601 UTC with milliseconds; None stays None."""
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


async def node_names(store: HQStore) -> dict[str, str]:
    """Node id -> name for every node ever enrolled, and HQ's own id -> "HQ"."""
    names = {node.node_id: node.name for node in await store.list_nodes()}
    if store.origin:
        names[store.origin] = HQ_NAME
    return names


def _written(item: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """A side or ancestor with the writing node's name and the write's time."""
    return {
        **item,
        "node": names.get(item["origin"]),
        "at": iso_time(physical_ms(item["hlc"])),
    }


def conflict_json(entry: ConflictEntry, names: Mapping[str, str]) -> dict[str, Any]:
    """Everything about a conflict as one JSON-ready dict (stable keys; see the module doc)."""
    resolution = None
    if entry.resolution is not None:
        resolution = {**entry.resolution, "node": names.get(entry.resolution.get("origin", ""))}
    return {
        "id": entry.id,
        "collection": entry.collection,
        "key": entry.key,
        "field": entry.field,
        "policy": entry.policy,
        "status": entry.status,
        "sides": [
            {"side": number, **_written(side, names)}
            for number, side in enumerate(entry.sides, start=1)
        ],
        "ancestor": _written(entry.ancestor, names) if entry.ancestor is not None else None,
        "reviewer": entry.reviewer,
        "note": entry.note,
        "opened_at": iso_time(entry.opened_at),
        "closed_at": iso_time(entry.closed_at),
        "resolution": resolution,
    }


def side_value(entry: ConflictEntry, take: int) -> Any:
    """The value of side `take` (1-based, as `conflict_json` numbers them); ValueError naming the
    valid numbers otherwise."""
    if not 1 <= take <= len(entry.sides):
        raise ValueError(
            f"conflict {entry.id} has {len(entry.sides)} side(s): take a number from 1 to "
            f"{len(entry.sides)}"
        )
    return entry.sides[take - 1]["value"]


async def current_references(
    store: HQStore, collections: CollectionsConfig | None
) -> dict[str, ReferenceTable]:
    """The reference tables records are judged against now: the collections file's, replaced by
    the newer ones HQ has sent (as the agents use them)."""
    if collections is None:
        return {}
    pushed = await store.list_records(REFERENCES_COLLECTION, limit=10_000)
    used, _ = newer_tables(collections.references, (r.data for r in pushed))
    return {**collections.references, **used}


def field_problems(
    collections: CollectionsConfig | None,
    collection_name: str,
    fields: Mapping[str, Any],
    now_ms: int,
    references: Mapping[str, ReferenceTable] | None = None,
) -> list[str]:
    """What the collection's schema says against these fields of a record (partial check;
    renamed fields by their wire names); nothing for collections the file does not declare.
    `references`: the tables to check codes against (`current_references`)."""
    collection = collections.collections.get(collection_name) if collections else None
    if collections is None or collection is None:
        return []
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    declared = {collection.declared_name(n): v for n, v in fields.items()}
    violations = validate(
        collection,
        declared,
        references=collections.references if references is None else references,
        today=now.date(),
        now=now,
        partial=True,
    )
    return [str(v) for v in violations]


def resolution_problems(
    collections: CollectionsConfig | None,
    entry: ConflictEntry,
    value: Any,
    now_ms: int,
    references: Mapping[str, ReferenceTable] | None = None,
) -> list[str]:
    """What is wrong with `value` as the new value of the conflict's field, checked as an agent
    checks a resolution (the field's schema, partial record): HQ's change reaches every node, so
    it must be one they would accept. A field no longer declared is not checked."""
    collection = collections.collections.get(entry.collection) if collections else None
    if collection is None or collection.declared_name(entry.field) not in collection.fields:
        return []
    return field_problems(collections, entry.collection, {entry.field: value}, now_ms, references)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range for a number")
    return number


def parse_json(text: str | bytes) -> Any:
    """Strict JSON: NaN, Infinity and numbers beyond a double (1e999) are refused, as they cannot
    be stored; ValueError says why."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


# -- handlers


class AdminAPI:
    """The admin handlers. `store` and `collections` return HQ's open store and its collections
    file (both are loaded at startup, after the routes are registered); `wall` is HQ's clock in
    ms; `note` adds fields to the request's log line."""

    def __init__(
        self,
        *,
        store: Callable[[], HQStore],
        collections: Callable[[], CollectionsConfig | None],
        wall: Callable[[], int],
        note: Callable[..., None],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`changed` is called after HQ wrote a change (it wakes the router)."""
        self._store = store
        self._collections = collections
        self._wall = wall
        self._note = note
        self._changed = changed

    def register(self, app: web.Application) -> None:
        app.router.add_get(CONFLICTS_PATH, self.list_conflicts)
        app.router.add_get(f"{CONFLICTS_PATH}/{_ID}", self.show_conflict)
        app.router.add_post(f"{CONFLICTS_PATH}/{_ID}/resolve", self.resolve_conflict)
        app.router.add_patch(f"{PREFIX}/records/{{collection}}/{{key}}", self.write_record)
        app.on_response_prepare.append(_challenge)

    async def _caller(self, request: web.Request) -> ApiToken:
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "send 'Authorization: Bearer TOKEN' with a token from "
                "`fieldsync-hq api-token create NAME`"
            )
        found = None
        if len(token) <= MAX_TOKEN_CHARS:
            found = await self._store().check_api_token(token)
        if found is None:
            raise Unauthorized("the API token is not valid (unknown or revoked)")
        self._note(actor=found.actor)
        return found

    async def list_conflicts(self, request: web.Request) -> web.Response:
        await self._caller(request)
        status = request.query.get("status", "open")
        if status not in STATUSES:
            raise BadRequest(f"query parameter 'status' must be one of {', '.join(STATUSES)}")
        collection = request.query.get("collection") or None
        after = _int_query(request, "after", 0, 0, (1 << 63) - 1)
        limit = _int_query(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        store = self._store()
        entries = await store.list_conflicts(
            status=None if status == "all" else status,
            collection=collection,
            after_id=after,
            limit=limit + 1,
        )
        more = len(entries) > limit
        entries = entries[:limit]
        names = await node_names(store)
        self._note(result="ok", conflicts=len(entries))
        return web.json_response(
            {
                "conflicts": [conflict_json(e, names) for e in entries],
                "more": more,
                "next_after": entries[-1].id if entries else after,
            }
        )

    async def show_conflict(self, request: web.Request) -> web.Response:
        await self._caller(request)
        store = self._store()
        entry = await _get(store, int(request.match_info["id"]))
        self._note(result="ok", conflict=entry.id)
        return web.json_response(conflict_json(entry, await node_names(store)))

    async def resolve_conflict(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        conflict_id = int(request.match_info["id"])
        self._note(conflict=conflict_id)
        choice, note = _resolve_body(await _read_body(request))
        store = self._store()
        entry = await _get(store, conflict_id)
        if entry.status != "open":
            raise NotOpen(f"conflict {conflict_id} is {entry.status}, not open: nothing to resolve")
        if isinstance(choice, _Take):
            try:
                value = side_value(entry, choice.number)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        else:
            value = choice
        collections = self._collections()
        references = await current_references(store, collections)
        problems = resolution_problems(collections, entry, value, self._wall(), references)
        if problems:
            raise BadRequest(
                f"'value' is not a valid {entry.collection}.{entry.field}: {'; '.join(problems)}"
            )
        try:
            done = await store.resolve_conflict(conflict_id, value, actor=caller.actor, note=note)
        except ConflictNotFound as e:
            raise NotFound(str(e)) from e
        except ConflictNotOpen as e:
            raise NotOpen(str(e)) from e
        except UnstorableChange as e:
            raise BadRequest(str(e)) from e
        self._note(result="resolved")
        self._changed()
        return web.json_response(conflict_json(done, await node_names(store)))

    async def write_record(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        collection_name, key = request.match_info["collection"], request.match_info["key"]
        self._note(collection=collection_name, key=key)
        try:
            fields = parse_json(await _read_body(request))
        except ValueError as e:
            raise BadRequest(f"the body must be a JSON object of fields: {e}") from e
        if not isinstance(fields, dict) or not fields:
            raise BadRequest("the body must be a JSON object of the fields to write")
        collections = self._collections()
        collection = collections.collections.get(collection_name) if collections else None
        system = f"hq:{caller.name}"
        if collection is None:
            raise NotFound(
                f"collection {collection_name!r} is not declared in HQ's collections file "
                "(hq.collections_file): HQ systems write declared collections only"
            )
        renamed = collection.transform.rename if collection.transform is not None else {}
        for name in fields:
            if name in renamed:
                raise BadRequest(f"{name!r} is stored as {renamed[name]!r}: write that name")
        if collection.key in fields:
            raise BadRequest(f"{collection.key!r} is the record key: it cannot change")
        for name in fields:
            owner = collection.owner(name)
            if collection.policy(name) == "source_of_truth" and owner != system:
                raise Forbidden(
                    f"{collection_name}.{name} is owned by {owner}; token {caller.name!r} "
                    f"writes as {system}"
                )
        store = self._store()
        references = await current_references(store, collections)
        problems = field_problems(collections, collection_name, fields, self._wall(), references)
        if problems:
            raise BadRequest(f"{collection_name}/{key}: {'; '.join(problems)}")
        record = await store.get_record(collection_name, key)
        if record is None or record.deleted:
            raise NotFound(f"no record {key!r} in {collection_name}")
        try:
            change = await store.write_record(
                collection_name,
                key,
                fields,
                actor=caller.actor,
                action="record.write",
                detail={"fields": sorted(fields)},
            )
        except UnstorableChange as e:
            raise BadRequest(str(e)) from e
        self._changed()
        written = await store.get_record(collection_name, key)
        self._note(result="written", seq=change.seq)
        return web.json_response(
            {
                "collection": collection_name,
                "key": key,
                "change": {"origin": change.origin, "seq": change.seq, "hlc": change.hlc},
                "record": written.data if written is not None else None,
            }
        )


class _Take:
    def __init__(self, number: int) -> None:
        self.number = number


async def _get(store: HQStore, conflict_id: int) -> ConflictEntry:
    try:
        return await store.get_conflict(conflict_id)
    except ConflictNotFound as e:
        raise NotFound(str(e)) from e


async def _challenge(request: web.Request, response: web.StreamResponse) -> None:
    """RFC 6750: a 401 names the scheme the client should use."""
    if response.status == 401 and request.path.startswith(PREFIX + "/"):
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="fieldsync-hq"'


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    # ASCII digits only ("²".isdigit() is True).
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"query parameter {name!r} must be an integer from {low} to {high}")
    return int(text)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Oversize(f"request body exceeds the {MAX_BODY_BYTES}-byte limit")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise Oversize(f"request body exceeds the {MAX_BODY_BYTES}-byte limit")
    return raw


def _resolve_body(raw: bytes) -> tuple[Any, str]:
    """(value or _Take, note) from a resolve request's body; BadRequest naming what is wrong."""
    try:
        doc = parse_json(raw)
    except ValueError as e:  # includes UnicodeDecodeError
        raise BadRequest(f"the body must be a JSON object: {e}") from e
    if not isinstance(doc, dict):
        raise BadRequest('the body must be a JSON object: {"value": ...} or {"take": N}')
    unknown = sorted(set(doc) - {"value", "take", "note"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}: use value, take, note")
    if ("value" in doc) == ("take" in doc):
        raise BadRequest("give exactly one of 'value' (the value to keep) or 'take' (a side)")
    note = doc.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise BadRequest(f"'note' must be a string of at most {MAX_NOTE} characters")
    if "take" in doc:
        take = doc["take"]
        if isinstance(take, bool) or not isinstance(take, int) or take < 1:
            raise BadRequest("'take' must be a side number (1 for the first side)")
        return _Take(take), note
    return doc["value"], note
