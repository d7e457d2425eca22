"""The agent's local HTTP API on 127.0.0.1: apps write and read records here while offline.

    PUT    /v1/collections/{c}/records/{key}   JSON object: the whole record -> upsert
    PATCH  /v1/collections/{c}/records/{key}   JSON object: some fields of an existing record
    POST   /v1/collections/{c}/records         JSON object with the key field -> upsert
    DELETE /v1/collections/{c}/records/{key}   tombstone
    POST   /v1/collections/{c}/bulk            NDJSON, one record per line ("_op": "delete" to delete);
                                               malformed input refuses the whole body; records the
                                               collection's rules refuse go to the error queue
    GET    /v1/collections/{c}/records/{key}   the record, or 404
    GET    /v1/collections/{c}/records?f=v&after=KEY&limit=N   exact-match filters (filter_value),
                                               paged by key
    GET    /v1/status                          backlog, last contact, last error, clock offset
    GET    /v1/errors[?status=open|all]         the error queue: records the collection's rules
    GET    /v1/errors/{id}                     refused in bulk capture (kept, never dropped)
    PUT    /v1/errors/{id}                     a fixed record: checked again, kept with its errors
    POST   /v1/errors/{id}/resubmit            checked again and, if it passes, stored and synced
    POST   /v1/errors/{id}/discard             {"reason": ...}

Every request carries `Authorization: Bearer <token>` (the token in `<data_dir>/api-token`), is
addressed to a loopback Host, comes from no foreign Origin, and a write declares a JSON or NDJSON
Content-Type: agent.capture.guard, which the daemon always installs. A write the store cannot make
because the disk is full answers 507 naming the data folder and the free space; reads go on.

A 2xx answer to a write means it is fsync'd. A change with `"seq": null` (bulk: counted in
`changed` but not between `first_seq` and `last_seq`) is kept on the agent, not forwarded: what
summary and exceptions modes do with records. Errors are JSON: {"error": rule, "message": ...,
"errors": [{line, key, field, rule, message}]}.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.capture import errorqueue
from agent.capture.errorqueue import entry_for
from agent.capture.guard import Middleware
from agent.capture.records import (
    RecordError,
    RejectedInput,
    loads_record,
    parse_ndjson,
    record_to_write,
)
from agent.capture.validate import EdgeValidator
from agent.config import AgentConfig
from agent.status import read_status
from agent.store import AgentStore, DiskFull, QueuedError, StoreError, Write, WriteResult
from protocol.hlc import system_ms

log = logging.getLogger("fieldsync.agent.api")
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PAGE = 1000
# Bulk bodies parsed and committed at once. Two keep group commit busy (one parses while the other
# commits) while bounding memory: a parsed 1,000-record body takes ~10 MB of Python objects.
BULK_IN_FLIGHT = 2
BULK_SLOTS = web.AppKey("bulk_slots", asyncio.Semaphore)
STORE_KEY = web.AppKey("store", AgentStore)
CONFIG_KEY = web.AppKey("config", AgentConfig)
VALIDATOR_KEY = web.AppKey("validator", EdgeValidator)


def _error(
    status: int, rule: str, message: str, errors: list[RecordError] | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": rule, "message": message}
    if errors:
        body["errors"] = [e.to_json() for e in errors]
    return web.json_response(body, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes a JSON answer; a traceback goes to the log, never to the client."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
    except RejectedInput as e:
        return _error(422, e.errors[0].rule, str(e), e.errors)
    except DiskFull as e:
        log.error("write refused, disk full: %s", e)
        return _error(
            507,
            "disk_full",
            f"the write was not stored: the disk holding {e.data_dir} is full "
            f"({e.free_bytes} bytes free); reads and sync go on, and writes are accepted again "
            "once space is freed",
        )
    except StoreError as e:
        log.error("write failed: %s", e)
        return _error(503, "store_unavailable", f"the write was not stored: {e}")
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; see the agent log")


def _collection(request: web.Request) -> tuple[str, str]:
    name = request.match_info["collection"]
    declared = request.app[CONFIG_KEY].collections
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise web.HTTPNotFound(text=f"collection {name!r} is not configured (known: {known})")
    return name, declared[name].key


async def _json_body(request: web.Request) -> Any:
    try:
        return loads_record(await request.read())
    except ValueError as e:
        raise RejectedInput([RecordError(f"body is not valid JSON: {e}", "json")]) from e


def _result(result: WriteResult) -> dict[str, Any]:
    # A change kept on this agent (summary and exceptions modes, device-only fields) is changed
    # with no `seq`: stored and queryable here, not forwarded.
    return {"key": result.key, "changed": result.hlc is not None, "seq": result.seq}


async def _write(request: web.Request, writes: list[Write]) -> list[WriteResult]:
    results = await request.app[STORE_KEY].write(writes)
    if len(writes) == 1 and results[0].refused:
        raise RejectedInput([_refusal(writes[0], results[0])])
    return results


def _refusal(write: Write, result: WriteResult) -> RecordError:
    """Why the store's edge steps refused a write (an append_only record exists, say)."""
    return RecordError(str(result.refused), "edge", key=write.key, stage="edge")


def _checker(request: web.Request) -> Callable[..., list[RecordError]] | None:
    validator = request.app.get(VALIDATOR_KEY)
    return validator.check if validator is not None else None


def _checked(request: web.Request, write: Write, *, partial: bool = False) -> Write:
    check = _checker(request)
    if check is not None and (refused := check(write, partial=partial)):
        raise RejectedInput(refused)
    return write


async def _one_record(request: web.Request, *, partial: bool) -> Write:
    collection, key_field = _collection(request)
    key = request.match_info["key"]
    write = record_to_write(await _json_body(request), collection, key_field, key=key)
    if write.op == "upsert":
        write.fields.setdefault(key_field, key)
    return _checked(request, write, partial=partial)


async def put_record(request: web.Request) -> web.Response:
    (result,) = await _write(request, [await _one_record(request, partial=False)])
    return web.json_response(_result(result))


async def patch_record(request: web.Request) -> web.Response:
    write = await _one_record(request, partial=True)
    patch = Write(write.collection, write.key, write.op, write.fields, True, edge=write.edge)
    (result,) = await _write(request, [patch])
    if result.missing:
        raise web.HTTPNotFound(text=f"no record {write.key!r} in {write.collection}: PUT it whole")
    return web.json_response(_result(result))


async def post_record(request: web.Request) -> web.Response:
    collection, key_field = _collection(request)
    write = _checked(request, record_to_write(await _json_body(request), collection, key_field))
    (result,) = await _write(request, [write])
    return web.json_response(_result(result), status=201 if result.seq else 200)


async def delete_record(request: web.Request) -> web.Response:
    collection, _ = _collection(request)
    key = request.match_info["key"]
    (result,) = await _write(request, [_checked(request, Write(collection, key, "delete", {}))])
    if result.seq is None:
        raise web.HTTPNotFound(text=f"record {key!r} does not exist in {collection}")
    return web.json_response(_result(result))


async def bulk(request: web.Request) -> web.Response:
    collection, key_field = _collection(request)
    body = await request.read()
    store = request.app[STORE_KEY]
    refused: list[QueuedError] = []

    def queue(record: Any, line: int | None, errors: list[RecordError]) -> None:
        refused.append(
            entry_for(record, collection, key_field, line, "request body", errors, system_ms())
        )

    async with request.app[BULK_SLOTS]:
        writes = parse_ndjson(
            body.splitlines(),
            collection,
            key_field,
            source="request body",
            check=_checker(request),
            on_refused=queue,
        )
        del body
        results = await store.write(writes)
        for write, result in zip(writes, results, strict=True):
            if result.refused:  # e.g. an append_only record sent again with other values
                record = {key_field: write.key, **write.fields}
                error = _refusal(write, result)
                queue(record, None, [error])
        del writes
        if refused:  # durable before the answer, like the accepted records
            await store.queue_errors(refused)
    stored = [r for r in results if not r.refused]
    changed = [r for r in stored if r.hlc is not None]
    forwarded = [r.seq for r in changed if r.seq is not None]
    return web.json_response(
        {
            "accepted": len(stored),
            "changed": len(changed),
            "unchanged": len(stored) - len(changed),
            "first_seq": forwarded[0] if forwarded else None,
            "last_seq": forwarded[-1] if forwarded else None,
            "queued_errors": len(refused),
            "errors": [error for entry in refused for error in entry.errors],
        }
    )


# ---- the error queue ---------------------------------------------------------------------------


def _entry_json(entry: QueuedError) -> dict[str, Any]:
    return {
        "id": entry.id,
        "collection": entry.collection,
        "key": entry.key,
        "status": entry.status,
        "errors": entry.errors,
        "payload": entry.payload,
        "source": entry.source,
        "line": entry.line,
        "received_ms": entry.received_ms,
        "note": entry.note,
    }


def _id_param(text: str, what: str) -> int:
    """A positive database id from the URL; anything else is a 400, never a 500."""
    if not text.isdigit() or len(text) > 18:
        raise web.HTTPBadRequest(text=f"{what} must be an error-queue id (a number)")
    return int(text)


def _entry_id(request: web.Request) -> int:
    return _id_param(request.match_info["id"], "the id")


async def list_errors(request: web.Request) -> web.Response:
    status = request.query.get("status", "open")
    entries = await request.app[STORE_KEY].queued_errors(
        None if status == "all" else status,
        limit=MAX_PAGE,
        after_id=int(request.query.get("after", 0)),
    )
    return web.json_response({"errors": [_entry_json(e) for e in entries]})


async def show_error(request: web.Request) -> web.Response:
    entry = await request.app[STORE_KEY].queued_error(_entry_id(request))
    if entry is None:
        raise web.HTTPNotFound(text="no such error-queue entry")
    return web.json_response(_entry_json(entry))


async def fix_error(request: web.Request) -> web.Response:
    payload = await _json_body(request)
    if not isinstance(payload, dict):
        raise RejectedInput(
            [RecordError("the fixed record must be a JSON object", "record_is_object")]
        )
    try:
        remaining = await errorqueue.fix(
            request.app[STORE_KEY],
            request.app[CONFIG_KEY],
            request.app.get(VALIDATOR_KEY),
            _entry_id(request),
            payload,
        )
    except errorqueue.UnknownEntry as e:
        raise web.HTTPNotFound(text=str(e)) from e
    return web.json_response({"ready": not remaining, "errors": [e.to_json() for e in remaining]})


async def resubmit_error(request: web.Request) -> web.Response:
    try:
        remaining = await errorqueue.resubmit(
            request.app[STORE_KEY],
            request.app[CONFIG_KEY],
            request.app.get(VALIDATOR_KEY),
            _entry_id(request),
            system_ms(),
        )
    except errorqueue.UnknownEntry as e:
        raise web.HTTPNotFound(text=str(e)) from e
    if remaining:
        raise RejectedInput(remaining)
    return web.json_response({"stored": True})


async def discard_error(request: web.Request) -> web.Response:
    body = await _json_body(request)
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    try:
        await errorqueue.discard(
            request.app[STORE_KEY], _entry_id(request), str(reason), system_ms()
        )
    except errorqueue.UnknownEntry as e:
        raise web.HTTPNotFound(text=str(e)) from e
    except ValueError as e:
        raise web.HTTPBadRequest(text=str(e)) from e
    return web.json_response({"discarded": True})


async def get_record(request: web.Request) -> web.Response:
    collection, _ = _collection(request)
    key = request.match_info["key"]
    record = await request.app[STORE_KEY].get(collection, key)
    if record is None:
        raise web.HTTPNotFound(text=f"no record {key!r} in {collection}")
    return web.json_response(record)


def filter_value(text: str) -> Any:
    """The value a read filter matches (the API's `?field=value`, the CLI's `--where
    field=value`): `household_size=5` matches the number 5, `household_size="5"` the text "5",
    `village=Kibera` (not JSON) the text "Kibera"; `true`, `false` and `null` their JSON values."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def list_records(request: web.Request) -> web.Response:
    collection, _ = _collection(request)
    query = dict(request.query)
    after = query.pop("after", None)
    try:
        limit = int(query.pop("limit", "100"))
    except ValueError as e:
        raise web.HTTPBadRequest(text="limit must be an integer") from e
    if not 1 <= limit <= MAX_PAGE:
        raise web.HTTPBadRequest(text=f"limit must be between 1 and {MAX_PAGE}")
    filters = {name: filter_value(value) for name, value in query.items()}
    try:
        records, next_after = await request.app[STORE_KEY].page(collection, filters, after, limit)
    except ValueError as e:
        raise web.HTTPBadRequest(text=str(e)) from e
    return web.json_response({"records": records, "next_after": next_after})


async def status(request: web.Request) -> web.Response:
    return web.json_response(await read_status(request.app[STORE_KEY]))


def create_app(
    store: AgentStore,
    config: AgentConfig,
    validator: EdgeValidator | None = None,
    guard: Middleware | None = None,
) -> web.Application:
    """The API's routes. `guard` (agent.capture.guard.access_guard) decides who may call it; the
    daemon always passes one. Without it every caller is trusted: for in-process tests only."""
    middlewares = [_errors] if guard is None else [guard, _errors]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[CONFIG_KEY] = config
    if validator is not None:
        app[VALIDATOR_KEY] = validator
    app[BULK_SLOTS] = asyncio.Semaphore(BULK_IN_FLIGHT)
    base = "/v1/collections/{collection}"
    app.router.add_put(base + "/records/{key}", put_record)
    app.router.add_patch(base + "/records/{key}", patch_record)
    app.router.add_post(base + "/records", post_record)
    app.router.add_delete(base + "/records/{key}", delete_record)
    app.router.add_post(base + "/bulk", bulk)
    app.router.add_get(base + "/records/{key}", get_record)
    app.router.add_get(base + "/records", list_records)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/errors", list_errors)
    app.router.add_get("/v1/errors/{id}", show_error)
    app.router.add_put("/v1/errors/{id}", fix_error)
    app.router.add_post("/v1/errors/{id}/resubmit", resubmit_error)
    app.router.add_post("/v1/errors/{id}/discard", discard_error)
    return app
