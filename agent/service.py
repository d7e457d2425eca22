"""The agent daemon: local API, batcher and forwarder in one asyncio process.

SIGTERM/SIGINT set a stop event; shutdown stops capture first (no new writes accepted), then the
sync loops, then closes the store. State lives only in SQLite, so a kill -9 at any point resumes
exactly where it stopped: unsent batches are resent byte-identical and HQ deduplicates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from agent import review
from agent.backoff import Backoff
from agent.batcher import Batcher
from agent.capture.api import create_app
from agent.capture.guard import access_guard, ensure_token
from agent.capture.validate import EdgeValidator
from agent.config import AgentConfig, listen_problem
from agent.enrolment import Enrolment
from agent.forwarder import Forwarder
from agent.hqclient import HQClient
from agent.store import AgentStore, Write
from protocol.collections import load_collections
from protocol.config import ConfigError
from protocol.files import (
    FolderLocked,
    check_private_file,
    create_private_file,
    hold_lock,
    make_private_dir,
    tighten,
)
from protocol.identity import NodeIdentity
from protocol.merge import field_policies

log = logging.getLogger("fieldsync.agent")
SHUTDOWN_TIMEOUT_S = 20.0


class NotInitialised(Exception):
    """The data folder has no key or no enrolment yet; the message says which command to run."""


class FolderInUse(Exception):
    """Another running agent holds this data folder (it would sign with the same node key)."""


class ListenError(Exception):
    """The local API cannot listen where agent.listen says (the port is taken, say)."""


LOCK_FILENAME = "agent.lock"


@dataclass
class Agent:
    config: AgentConfig
    identity: NodeIdentity
    enrolment: Enrolment | None
    store: AgentStore

    def batcher(self) -> Batcher:
        sync = self.config.sync
        return Batcher(
            self.store,
            self.identity,
            max_changes=sync.batch_max_changes,
            max_bytes=sync.batch_max_bytes,
            window=sync.window,
            zstd_level=sync.zstd_level,
        )

    def client(self) -> HQClient:
        if self.enrolment is None:
            raise NotInitialised(
                "this agent is not enrolled with HQ: run `fieldsync-agent enroll URL TOKEN`"
            )
        return HQClient(
            self.enrolment,
            self.identity,
            url=self.config.hq.url or None,
            ca_bundle=self.config.hq.ca_bundle,
            timeout_s=self.config.hq.timeout_s,
        )

    async def validator(self) -> EdgeValidator | None:
        """The edge checks of `agent.collections_file` (None without one), with the newest
        reference tables HQ has sent."""
        validator = EdgeValidator.for_agent(self.config, self.store.clock.physical)
        if validator is not None:
            await validator.load_references(self.store)
        return validator

    def forwarder(self, client: HQClient, batcher: Batcher) -> Forwarder:
        sync = self.config.sync
        return Forwarder(
            self.store,
            client,
            batcher,
            backoff=Backoff(sync.backoff_initial_s, sync.backoff_max_s),
            pull_interval_s=sync.pull_interval_s,
            feed_page_size=sync.feed_page_size,
        )


def load_identity(config: AgentConfig) -> NodeIdentity:
    if not config.key_path.exists():
        raise NotInitialised(f"no node key at {config.key_path}: run `fieldsync-agent init` first")
    return NodeIdentity.load(config.key_path)


def secure_data_dir(config: AgentConfig) -> None:
    """The data folder 0700 and what is in it 0600, whatever the umask: agent.db is created empty
    and private before SQLite opens it (SQLite gives -wal and -shm the database's mode). A folder
    or file an earlier version made readable by others is tightened, with a warning."""
    data_dir = config.agent.data_dir
    tightened = [data_dir] if make_private_dir(data_dir) else []
    create_private_file(config.db_path)
    db = config.db_path
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if tighten(path):
            tightened.append(path)
    if tighten(config.enrolment_path):
        tightened.append(config.enrolment_path)
    for path in tightened:
        log.warning("%s was readable by others: made private (0700 folder, 0600 files)", path)


@contextlib.asynccontextmanager
async def open_agent(config: AgentConfig) -> AsyncIterator[Agent]:
    identity = load_identity(config)
    secure_data_dir(config)
    enrolment = Enrolment.load(config.enrolment_path) if config.enrolment_path.exists() else None
    collections = config.agent.collections_file
    policies = field_policies(load_collections(collections) if collections else None)
    store = await AgentStore.open(config.db_path, identity.node_id, policies)
    store.clock.max_drift_ms = int(config.sync.max_clock_drift_s * 1000)
    try:
        yield Agent(config, identity, enrolment, store)
    finally:
        await store.close()


def partial_check(validator: EdgeValidator | None) -> Callable[[Write], Sequence[object]] | None:
    """The edge validator's check of the fields a write carries (for conflict resolutions)."""
    if validator is None:
        return None

    def check(write: Write) -> Sequence[object]:
        # Checked under the fields' declared names (a conflict names a renamed field by its wire
        # name), on a copy: the resolution itself is written as it is, outside the edge steps.
        collection = validator.collections.collections.get(write.collection)
        fields = write.fields
        if collection is not None:
            fields = {collection.declared_name(n): v for n, v in fields.items()}
        probe = Write(write.collection, write.key, write.op, fields, must_exist=write.must_exist)
        return validator.check(probe, partial=True)

    return check


def api_token(config: AgentConfig) -> str:
    """The local API's token; an agent set up before tokens existed gets one here (logged with
    the file's name, never its content)."""
    token, created = ensure_token(config.token_path)
    if created:
        log.info(
            "created the local API token in %s (mode 0600): apps read it there", config.token_path
        )
    return token


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The local API's server TLS context when agent.tls_cert and agent.tls_key are set."""
    cert, key = config.agent.tls_cert, config.agent.tls_key
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        check_private_file(key, "TLS private key")
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("agent config", "agent.tls_cert / agent.tls_key", str(e)) from e
    return context


async def start_api(agent: Agent, validator: EdgeValidator | None) -> web.AppRunner:
    """The local API, listening: bound before the sync loops start, so a refusal to listen is
    one clear error (not a failure inside the task group)."""
    config = agent.config
    host, _, port = config.agent.listen.rpartition(":")
    context = tls_context(config)
    guard = access_guard(
        api_token(config), config.token_path, allow_remote=config.agent.allow_remote
    )
    app = create_app(agent.store, config, validator, guard)
    review.add_routes(app, agent.store, partial_check(validator))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
        try:
            await site.start()
        except OSError as e:
            reason = e.strerror or str(e)
            hint = " (another agent running? pick another port in agent.listen)"
            raise ListenError(
                f"agent.listen: cannot listen on {config.agent.listen}: {reason}"
                + (hint if e.errno == errno.EADDRINUSE else "")
            ) from e
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0] if runner.addresses else (host, port)
    scheme = "https" if context else "http"
    print(f"fieldsync-agent listening on {scheme}://{bound[0]}:{bound[1]}", flush=True)
    log.info("local API listening on %s://%s:%s", scheme, bound[0], bound[1])
    return runner


async def _serve_api(runner: web.AppRunner, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then close capture first (no new writes accepted)."""
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def run_agent(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set); then shut down in order."""
    if (problem := listen_problem(config)) is not None:
        raise ConfigError("agent config", *problem)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    load_identity(config)  # NotInitialised before anything is created or locked
    with lock_data_dir(config):
        await _run_locked(config, stop)
    log.info("stopped")


@contextlib.contextmanager
def lock_data_dir(config: AgentConfig) -> Iterator[None]:
    """Hold `<data_dir>/agent.lock` for the daemon's life: a second agent on the same folder
    would sign with the same node key and number changes from the same counters."""
    path = config.agent.data_dir / LOCK_FILENAME
    try:
        with hold_lock(path, "fieldsync-agent"):
            yield
    except FolderLocked as e:
        holder = f"PID {e.pid}" if e.pid is not None else "another process"
        raise FolderInUse(
            f"{config.agent.data_dir} is in use by another fieldsync-agent ({holder}): stop it, "
            "or give this agent its own agent.data_dir"
        ) from e


async def _run_locked(config: AgentConfig, stop: asyncio.Event) -> None:
    async with open_agent(config) as agent:
        batcher = agent.batcher()
        validator = await agent.validator()
        async with agent.client() as client:
            forwarder = agent.forwarder(client, batcher)
            if validator is not None:
                # A newer reference table from HQ applies to the very next record checked.
                forwarder.on_references = functools.partial(validator.load_references, agent.store)
            sync_stop = asyncio.Event()
            runner = await start_api(agent, validator)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_serve_api(runner, stop))
                loops = [
                    tasks.create_task(batcher.run(sync_stop)),
                    tasks.create_task(forwarder.run(sync_stop)),
                ]
                await stop.wait()
                log.info("stopping: capture closed, draining sync loops")
                sync_stop.set()
                try:
                    async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                        await asyncio.gather(*loops)
                except TimeoutError:
                    log.warning("sync loops did not stop in %.0f s; cancelling", SHUTDOWN_TIMEOUT_S)
                    for task in loops:
                        task.cancel()
