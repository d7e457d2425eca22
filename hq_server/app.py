"""HQ's HTTP API (aiohttp): routes per `protocol.transport`, error mapping, request logs, runner.

Error contract: every refusal is JSON `{"error": code, "message": text}` with the status of the
`ProtocolError` raised (400/401/403/404/409/413; the admin API in `hq_server.admin_api` raises
them too), 409 `{"error": "gap", "expected": N}` for a sequence gap, 409 `{"error": "diverged",
"node", "batch", "seqs": [first, last], "hq_acked_through", "hq_change_seq", "hq_max_hlc"}` for a
batch or change number reused with other content (`_diverged`),
415 for a batch sent with another content type, 503 `{"error": "unavailable"}` when the store fails
(disk full: nothing was committed, retry later), and `{"error": "internal"}` with status 500 for
anything unexpected. Tracebacks go to HQ's log, never to the client. Each request ends in exactly one
JSON log line with its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from hq_server.admin_api import AdminAPI
from hq_server.config import HQConfig, HQSection
from hq_server.feed import FeedService, authenticate
from hq_server.ingest import Ingestor, peek_signer
from hq_server.keys import load_or_create_identity
from hq_server.logs import event
from hq_server.routing.config import load_routes
from hq_server.routing.router import Router, RouteSetupError
from hq_server.routing.state import RouterStore
from hq_server.store import (
    EnrollmentRefused,
    HQStore,
    IngestResult,
    IngestStatus,
    SQLiteHQStore,
    StoreError,
)
from protocol.collections import CollectionsConfig, load_collections
from protocol.errors import Oversize, ProtocolError
from protocol.hlc import HybridClock, system_ms
from protocol.identity import PUBLIC_KEY_BYTES, NodeIdentity
from protocol.merge import field_policies
from protocol.transport import (
    BATCHES_PATH,
    CHANGES_PATH,
    ENROLL_PATH,
    SEALED_CONTENT_TYPE,
    b64,
    unb64,
)

HEALTH_PATH = "/v1/health"
MAX_ENROLL_BYTES = 16 * 1024
MAX_NODE_NAME = 200
SHUTDOWN_TIMEOUT_S = 20.0
CLOCK_META_KEY = "hq_clock"
_MAX_INT64 = (1 << 63) - 1
ACCEPTED_BATCH_TYPES = frozenset({SEALED_CONTENT_TYPE, "application/octet-stream"})

log = logging.getLogger("fieldsync.hq")
request_log = logging.getLogger("fieldsync.hq.http")

# Per-request outcome fields, filled in by handlers and written as one log line by the middleware.
_outcome: ContextVar[dict[str, Any]] = ContextVar("fieldsync_hq_outcome")
_INCOMPLETE = (ConnectionError, EOFError, aiohttp.ClientPayloadError, HttpProcessingError)


class BadRequest(ProtocolError):
    """A request HQ cannot parse (query parameters, enrolment JSON)."""

    code = "bad_request"


class ServeError(Exception):
    """HQ cannot start serving (address in use, unreadable TLS files); the message says why."""


@dataclass(frozen=True)
class HQState:
    """What the handlers share; created at startup, closed at cleanup."""

    config: HQSection
    store: HQStore
    identity: NodeIdentity
    clock: HybridClock
    ingestor: Ingestor
    feed: FeedService
    router: Router | None = None  # routes changes onward, when hq.routes_file is set
    collections: CollectionsConfig | None = None  # hq.collections_file: schemas and policies


CONFIG = web.AppKey("fieldsync_config", HQConfig)
STATE = web.AppKey("fieldsync_state", HQState)


def _note(**fields: Any) -> None:
    """Add fields to this request's outcome log line."""
    with contextlib.suppress(LookupError):
        _outcome.get().update(fields)


def _json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def _outcome_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.perf_counter()
    fields: dict[str, Any] = {}
    token = _outcome.set(fields)
    try:
        try:
            response = await handler(request)
        except ProtocolError as e:
            fields.setdefault("result", e.code)
            fields["reason"] = str(e)
            # A refused change also says which batch, change, rule and field, as data.
            details = getattr(e, "details", None)
            response = _json_error(e.http_status, e.code, str(e), **(details or {}))
        except web.HTTPException as e:
            code = e.reason.lower().replace(" ", "_")
            fields.setdefault("result", code)
            response = _json_error(e.status, code, e.reason)
        except StoreError:
            # Disk full, I/O error, database locked too long: nothing was committed (the
            # transaction rolled back), and the sender keeps its data and retries on 5xx.
            fields["result"] = "unavailable"
            event(
                log,
                logging.ERROR,
                "store failed while handling a request",
                exc_info=True,
                method=request.method,
                path=request.path,
                **fields,
            )
            response = _json_error(
                503, "unavailable", "HQ cannot store data right now; retry later"
            )
        except Exception:
            fields["result"] = "internal"
            event(
                log,
                logging.ERROR,
                "unexpected error while handling a request",
                exc_info=True,
                method=request.method,
                path=request.path,
                **fields,
            )
            response = _json_error(500, "internal", "internal error; see HQ's log")
    finally:
        _outcome.reset(token)
    event(
        request_log,
        logging.DEBUG if request.path == HEALTH_PATH else logging.INFO,
        "request",
        method=request.method,
        path=request.path,
        status=response.status,
        ms=round((time.perf_counter() - started) * 1000, 1),
        **fields,
    )
    return response


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise Oversize(f"request body of {length} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise Oversize(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
    except _INCOMPLETE as e:
        raise BadRequest(f"request body incomplete ({type(e).__name__})") from e
    return b"".join(chunks)


def _int_param(request: web.Request, name: str, default: int, minimum: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    # ASCII digits only ("²".isdigit() is True), and within SQLite's signed 64-bit range.
    if not (text.isascii() and text.isdigit()) or not minimum <= int(text) <= _MAX_INT64:
        raise BadRequest(f"query parameter {name!r} must be an integer >= {minimum}")
    return int(text)


async def _post_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if hdrs.CONTENT_TYPE in request.headers and request.content_type not in ACCEPTED_BATCH_TYPES:
        return _json_error(
            415,
            "unsupported_media_type",
            f"a batch must be sent as {SEALED_CONTENT_TYPE}, not {request.content_type}",
        )
    data = await _read_body(request, state.config.max_batch_bytes)
    _note(bytes=len(data))
    with contextlib.suppress(ProtocolError):
        _note(node=peek_signer(data))
    outcome = await state.ingestor.ingest(data)
    result = outcome.result
    _note(
        node=outcome.node_id,
        batch=outcome.batch_seq,
        changes=outcome.changes,
        result=result.status.value,
        acked_through=result.acked_through,
        appended=result.appended,
        skipped=result.skipped,
        **({"flagged": True} if outcome.flag else {}),
    )
    if result.appended and state.router is not None:
        state.router.notify()
    if result.status is IngestStatus.DIVERGED:
        return _diverged(outcome.node_id, outcome.batch_seq, result)
    if result.status is IngestStatus.GAP or outcome.ack is None:
        return _json_error(
            409,
            "gap",
            f"batch {outcome.batch_seq} is ahead of HQ, which holds batches up to "
            f"{result.acked_through} from this node; send batch {result.expected} first",
            expected=result.expected,
        )
    return web.Response(body=outcome.ack, content_type=SEALED_CONTENT_TYPE)


def _diverged(node_id: str, batch_seq: int, result: IngestResult) -> web.Response:
    """409 "diverged": the node reused a batch or change sequence number for other content. The
    body is a contract (docs/protocol.md): the agent recovers from its fields by itself."""
    first, last = result.seqs or (0, 0)
    span = f"{first}" if first == last else f"{first}-{last}"
    if batch_seq <= result.acked_through:
        what = (
            f"batch {batch_seq} (changes {span}) differs from the batch {batch_seq} HQ already "
            "holds from it"
        )
    else:
        what = (
            f"batch {batch_seq} reuses change sequence numbers {span}, which HQ already holds "
            "from it with other content"
        )
    message = (
        f"node {node_id}: {what}; its database went back in time (restored from a backup?). "
        "Nothing was stored. Recovery: renumber the unsent changes above change "
        f"{result.change_seq} and their batches above {result.acked_through}, move the clock "
        f"past {result.max_hlc} (the highest stamp HQ holds from the node), and send them again."
    )
    _note(seqs=[first, last], hq_change_seq=result.change_seq)
    event(
        log,
        logging.WARNING,
        "batch refused: diverged",
        node=node_id,
        batch=batch_seq,
        seqs=[first, last],
        hq_acked_through=result.acked_through,
        hq_change_seq=result.change_seq,
    )
    return _json_error(
        409,
        "diverged",
        message,
        node=node_id,
        batch=batch_seq,
        seqs=[first, last],
        hq_acked_through=result.acked_through,
        hq_change_seq=result.change_seq,
        hq_max_hlc=result.max_hlc,
    )


async def _get_changes(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = state.clock.physical()
    node, offset = await authenticate(
        state.store, request.headers, request.method, request.path_qs, now
    )
    _note(node=node.node_id)
    cursor = _int_param(request, "cursor", 0, minimum=0)
    limit = _int_param(request, "limit", state.config.feed_page_size, minimum=1)
    await state.store.touch_node(node.node_id, clock_offset_ms=offset)
    sealed, page = await state.feed.page(node.node_id, cursor, limit, groups=node.groups)
    _note(
        cursor=cursor,
        next_cursor=page.cursor,
        changes=len(page.changes),
        more=page.more,
        bytes=len(sealed),
        result="ok",
    )
    return web.Response(body=sealed, content_type=SEALED_CONTENT_TYPE)


async def _enroll(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = await _read_body(request, MAX_ENROLL_BYTES)
    try:
        doc = json.loads(raw)
    except ValueError as e:  # includes UnicodeDecodeError
        raise BadRequest("enrolment body must be a JSON object") from e
    if not isinstance(doc, dict):
        raise BadRequest("enrolment body must be a JSON object")
    token, key_text, name = doc.get("token"), doc.get("public_key"), doc.get("name", "")
    if not isinstance(token, str) or not token:
        raise BadRequest("'token' must be a non-empty string")
    if not isinstance(key_text, str):
        raise BadRequest("'public_key' must be a base64 string")
    if not isinstance(name, str) or len(name) > MAX_NODE_NAME:
        raise BadRequest(f"'name' must be a string of at most {MAX_NODE_NAME} characters")
    public_key = unb64(key_text, "public_key")
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise BadRequest(
            f"'public_key' must be a {PUBLIC_KEY_BYTES}-byte Ed25519 key, got {len(public_key)}"
        )
    try:
        node = await state.store.enroll(token, public_key, name_hint=name)
    except EnrollmentRefused as e:
        _note(result=e.code, reason=str(e))
        return _json_error(403, e.code, str(e))
    _note(node=node.node_id, name=node.name, result="enrolled")
    return web.json_response(
        {
            "node_id": node.node_id,
            "name": node.name,
            "hq_node_id": state.identity.node_id,
            "hq_public_key": b64(state.identity.public_key),
            "hq_time": state.clock.physical(),
            "groups": list(node.groups),
        }
    )


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def load_hq_collections(section: HQSection) -> CollectionsConfig | None:
    """hq.collections_file, loaded; None when it is not set. ConfigError (naming the file, key
    and line) when it cannot be used."""
    return load_collections(section.collections_file) if section.collections_file else None


def hq_store(
    section: HQSection,
    identity: NodeIdentity | None,
    collections: CollectionsConfig | None,
    *,
    wall: Callable[[], int] = system_ms,
    create: bool = True,
) -> SQLiteHQStore:
    """HQ's store (not yet opened) as the server uses it: the conflict policies of `collections`
    (from `load_hq_collections`), HQ's node id as the origin of the changes HQ writes
    (resolutions, corrections) and the clock bound. The server and `fieldsync-hq` open it only
    through here, so a conflict resolved from the command line is written exactly as the server
    would write it.

    `identity` None (HQ's key does not exist yet): the store reads, but cannot author changes.
    """
    return SQLiteHQStore(
        section.db_path,
        wall=wall,
        create=create,
        policies=field_policies(collections),
        origin=identity.node_id if identity is not None else "",
        max_ahead_ms=section.max_clock_ahead_s * 1000,
    )


def create_app(config: HQConfig, *, wall: Callable[[], int] = system_ms) -> web.Application:
    """The HQ application. Store, key and clock are opened at startup and closed at cleanup.

    `wall` is the millisecond clock for HQ's HLC and the store (tests inject one).
    """
    app = web.Application(middlewares=[_outcome_middleware])
    app[CONFIG] = config

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        section = config.hq
        routes = load_routes(section.routes_file) if section.routes_file else None
        identity = await asyncio.to_thread(load_or_create_identity, section.key_path)
        collections = load_hq_collections(section)
        store = hq_store(section, identity, collections, wall=wall)
        await store.open()
        clock = HybridClock(wall, max_drift_ms=section.max_clock_ahead_s * 1000)
        try:
            router = Router(routes, RouterStore(store), wall=wall) if routes else None
        except RouteSetupError as e:
            await store.close()
            raise ServeError(str(e)) from e
        router_stop = asyncio.Event()
        router_task: asyncio.Task[None] | None = None
        try:
            saved = await store.get_meta(CLOCK_META_KEY)
            if saved is not None:
                clock.observe(int(saved))
            app[STATE] = HQState(
                config=section,
                store=store,
                identity=identity,
                clock=clock,
                ingestor=Ingestor(
                    store, identity, clock, max_raw=section.max_raw_bytes, collections=collections
                ),
                feed=FeedService(
                    store,
                    identity,
                    clock,
                    page_size=section.feed_page_size,
                    max_bytes=section.max_raw_bytes // 2,
                ),
                router=router,
                collections=collections,
            )
            if router is not None:
                router_task = asyncio.create_task(router.run(router_stop), name="router")
            event(log, logging.INFO, "HQ ready", hq_node_id=identity.node_id, db=section.db_path)
            yield
        finally:
            router_stop.set()
            if router_task is not None:
                try:
                    async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                        await router_task
                except TimeoutError:
                    event(log, logging.WARNING, "router did not stop in time; cancelled")
                except Exception:
                    event(log, logging.ERROR, "router failed", exc_info=True)
            try:
                await store.set_meta(CLOCK_META_KEY, str(clock.last))
            except StoreError as e:
                event(log, logging.WARNING, "could not save HQ's clock", error=str(e))
            await store.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(BATCHES_PATH, _post_batch)
    app.router.add_get(CHANGES_PATH, _get_changes)
    app.router.add_post(ENROLL_PATH, _enroll)
    app.router.add_get(HEALTH_PATH, _health)
    AdminAPI(
        store=lambda: app[STATE].store,
        collections=lambda: app[STATE].collections,
        wall=wall,
        note=_note,
        changed=lambda: router.notify() if (router := app[STATE].router) else None,
    ).register(app)
    return app


def ssl_context(section: HQSection) -> ssl.SSLContext | None:
    """A server TLS context when both tls_cert and tls_key are set, else None (plain HTTP)."""
    if section.tls_cert is None or section.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(section.tls_cert, section.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ServeError(
            f"hq.tls_cert / hq.tls_key: cannot load {section.tls_cert} and {section.tls_key}: {e}"
        ) from e
    return context


async def serve(
    config: HQConfig,
    stop_event: asyncio.Event,
    *,
    on_ready: Callable[[str], None] | None = None,
    wall: Callable[[], int] = system_ms,
) -> None:
    """Serve until `stop_event` is set, then stop gracefully (in-flight requests may finish).

    `on_ready` receives the URL with the real bound port (listen port 0 picks a free one).
    Raises ServeError or StoreError if HQ cannot start.
    """
    context = ssl_context(config.hq)
    host, port = config.hq.host_port()
    runner = web.AppRunner(
        create_app(config, wall=wall), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context)
        try:
            await site.start()
        except OSError as e:
            raise ServeError(f"hq.listen: cannot listen on {config.hq.listen}: {e}") from e
        bound = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"{'https' if context else 'http'}://{url_host}:{bound}"
        event(log, logging.INFO, "listening", url=url)
        if on_ready is not None:
            on_ready(url)
        await stop_event.wait()
        event(log, logging.INFO, "stopping: finishing in-flight requests")
    finally:
        await runner.cleanup()
    event(log, logging.INFO, "stopped")
