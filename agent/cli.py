"""`fieldsync-agent`: set up, run and inspect a field agent.

Every command reads the config file (default /etc/fieldsync/agent.toml, or $FIELDSYNC_AGENT_CONFIG)
and works on the data folder directly, so `put`, `get` and `status` work with or without the daemon.
Failures print one line naming what to fix and exit non-zero; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import review
from agent.capture import errorqueue
from agent.capture.api import MAX_PAGE, filter_value
from agent.capture.guard import ensure_token
from agent.capture.records import (
    RecordError,
    RejectedInput,
    loads_record,
    parse_ndjson,
    record_to_write,
)
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, hq_url_problem, load_agent_config
from agent.hqclient import HQError, enroll
from agent.service import (
    FolderInUse,
    ListenError,
    NotInitialised,
    load_identity,
    open_agent,
    partial_check,
    run_agent,
)
from agent.status import read_status
from agent.store import StoreError, Write
from protocol.config import ConfigError
from protocol.files import make_private_dir, set_private_umask
from protocol.identity import NodeIdentity
from protocol.logfmt import setup_logging

T = TypeVar("T")
EXPECTED_ERRORS = (
    ConfigError,
    NotInitialised,
    FolderInUse,
    ListenError,
    RejectedInput,
    HQError,
    StoreError,
    OSError,
    ValueError,
)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"fieldsync-agent: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Expected failures become one clear line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except ConfigError as e:
        _fail(str(e), 2)
    except EXPECTED_ERRORS as e:
        _fail(str(e))
    except BaseExceptionGroup as group:
        # A failure inside the daemon's task group: say the first expected one, one line.
        expected, _ = group.split(EXPECTED_ERRORS)
        if expected is None:
            raise
        first: BaseException = expected
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        _fail(str(first), 2 if isinstance(first, ConfigError) else 1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    with friendly_errors():
        return asyncio.run(coro)
    raise AssertionError("unreachable")


def _config(path: str | None) -> AgentConfig:
    try:
        return load_agent_config(path or DEFAULT_CONFIG_PATH)
    except ConfigError as e:
        _fail(str(e), 2)
        raise


config_option = click.option(
    "--config",
    "config_path",
    envvar="FIELDSYNC_AGENT_CONFIG",
    type=click.Path(dir_okay=False),
    help=f"Agent config file (default {DEFAULT_CONFIG_PATH}).",
)


def with_config(f: Callable[..., Any]) -> Callable[..., Any]:
    @config_option
    @wraps(f)
    def wrapper(config_path: str | None, **kwargs: Any) -> Any:
        return f(_config(config_path), **kwargs)

    return wrapper


@click.group()
@click.version_option(package_name="fieldsync", prog_name="fieldsync-agent")
def main() -> None:
    """fieldsync field agent: queue changes offline, sync them to HQ when a link exists."""
    # Whatever this process creates is private (0600 files, 0700 folders); the code also sets
    # those modes itself, this covers what a library creates.
    set_private_umask()


@main.command()
@with_config
def init(config: AgentConfig) -> None:
    """Create the data folder, this node's key and local API token (0600) and the database."""
    if config.key_path.exists():
        with friendly_errors():
            identity = load_identity(config)
            _, created = ensure_token(config.token_path)
        click.echo(f"already initialised: node {identity.node_id} ({config.agent.data_dir})")
        if created:
            click.echo(f"created the local API token: {config.token_path}")
        return
    make_private_dir(config.agent.data_dir)
    identity = NodeIdentity.generate()
    identity.save(config.key_path)
    with friendly_errors():
        ensure_token(config.token_path)

    async def create_db() -> None:
        async with open_agent(config):
            pass

    _run(create_db())
    click.echo(f"initialised node {identity.node_id} in {config.agent.data_dir}")
    click.echo(f"local API token (apps send it as a bearer token): {config.token_path}")


@main.command(name="enroll")
@with_config
@click.argument("url")
@click.argument("token")
def enroll_command(config: AgentConfig, url: str, token: str) -> None:
    """Register this node with HQ at URL using a one-time TOKEN from `fieldsync-hq token create`.

    URL is https://, or plain http:// to this machine only (as hq.url in the config file): the
    token must not cross a network in clear text."""
    if (problem := hq_url_problem(url)) is not None:
        _fail(f"URL {url!r} {problem}", 2)
    with friendly_errors():
        identity = load_identity(config)
    name = config.agent.name or socket.gethostname()
    enrolment = _run(
        enroll(
            url, token, identity, name, ca_bundle=config.hq.ca_bundle, timeout_s=config.hq.timeout_s
        )
    )
    enrolment.save(config.enrolment_path)

    async def remember_groups() -> None:
        # Until the first feed page says otherwise, the groups HQ gave at enrolment hold.
        async with open_agent(config) as agent:
            await agent.store.set_meta(groups=json.dumps(sorted(enrolment.groups)))

    _run(remember_groups())
    # HQ names the node after its enrolment token, not after the name sent.
    enrolled_as = enrolment.name or name
    click.echo(
        f"enrolled node {identity.node_id} as {enrolled_as!r} with HQ {enrolment.hq_node_id}"
    )


@main.command()
@with_config
def run(config: AgentConfig) -> None:
    """Run the agent daemon (local API, batcher, forwarder) until SIGTERM or Ctrl-C."""
    setup_logging(config.agent.log_level)
    _run(run_agent(config))


@main.command()
@with_config
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config: AgentConfig, as_json: bool) -> None:
    """Backlog (changes and bytes), last contact with HQ, last error, HQ clock offset."""

    async def read() -> dict[str, Any]:
        async with open_agent(config) as agent:
            return await read_status(agent.store)

    info = _run(read())
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    # What an operator must see first (disk full, an HQ refusal), one line each.
    for warning in info.get("warnings") or ():
        click.echo(f"WARNING: {warning}")
    labels = {
        "node_id": "node",
        "backlog_changes": "changes waiting",
        "backlog_bytes": "bytes waiting",
        "sealed_batches_waiting": "sealed batches",
        "acked_changes": "changes delivered",
        "last_contact": "last contact",
        "last_error": "last error",
        "hq_clock_offset_ms": "HQ clock offset (ms)",
        "restore_recoveries": "restore recoveries",
        "last_recovery": "last recovery",
    }
    for key, label in labels.items():
        value = info.get(key)
        click.echo(f"{label:>22}: {value if value is not None else '-'}")


@main.command()
@with_config
@click.argument("collection")
@click.argument("record", required=False)
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), help="NDJSON file.")
def put(config: AgentConfig, collection: str, record: str | None, path: str | None) -> None:
    """Write one RECORD (a JSON object) or every line of an NDJSON --file to COLLECTION."""
    if collection not in config.collections:
        _fail(f"collection {collection!r} is not configured in [collections]")
    key_field = config.collections[collection].key
    if path is None and record is None:
        _fail("give a RECORD or --file")
    obj: Any = None
    lines: list[bytes] = []
    if path is not None:
        with friendly_errors(), open(path, "rb") as f:
            lines = f.readlines()
    elif record is not None:
        try:
            obj = loads_record(record)
        except ValueError as e:
            _fail(f"RECORD is not valid JSON: {e}")

    async def write() -> list[Any]:
        async with open_agent(config) as agent:
            # Checked against the collections file with the agent's clock (it tracks HQ's time).
            validator = await agent.validator()
            check = validator.check if validator is not None else None
            writes: list[Write]
            if path is not None:
                writes = parse_ndjson(lines, collection, key_field, source=path, check=check)
            else:
                writes = [record_to_write(obj, collection, key_field)]
                if check is not None and (refused := check(writes[0])):
                    raise RejectedInput(refused)
            return await agent.store.write(writes)

    results = _run(write())
    refused = [r for r in results if r.refused]
    for result in refused:
        click.echo(f"{collection}/{result.key}: refused: {result.refused}", err=True)
    # Stored when it has a stamp: a record kept on this node only (summary mode) has no change
    # sequence but was written.
    changed = sum(1 for r in results if r.hlc is not None)
    stored = len(results) - len(refused)
    click.echo(
        f"stored {stored} records ({changed} changed, {stored - changed} unchanged)"
        + (f"; {len(refused)} refused" if refused else "")
    )
    if refused:
        sys.exit(1)


@main.group()
def errors() -> None:
    """The error queue: records the collection's rules refused, kept for you to fix."""


def _with_queue(config: AgentConfig, work: Callable[..., Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        async with open_agent(config) as agent:
            validator = await agent.validator()
            return await work(agent.store, validator)

    with friendly_errors():
        try:
            return asyncio.run(run())
        except errorqueue.UnknownEntry as e:
            _fail(str(e.args[0]))
    raise AssertionError("unreachable")


@errors.command("list")
@with_config
@click.option("--all", "everything", is_flag=True, help="Also resubmitted and discarded entries.")
def errors_list(config: AgentConfig, everything: bool) -> None:
    """Entries waiting for a fix (id, collection, key, rules broken)."""

    async def work(store: Any, validator: Any) -> list[Any]:
        return list(await store.queued_errors(None if everything else "open", limit=10_000))

    entries = _with_queue(config, work)
    if not entries:
        click.echo("the error queue is empty")
    for entry in entries:
        rules = ", ".join(sorted({e["rule"] for e in entry.errors}))
        click.echo(f"{entry.id:>6}  {entry.status:<11} {entry.collection}/{entry.key}  {rules}")


@errors.command("show")
@with_config
@click.argument("entry_id", type=int)
def errors_show(config: AgentConfig, entry_id: int) -> None:
    """One entry: what is wrong (field, rule, message) and the record as submitted."""

    async def work(store: Any, validator: Any) -> Any:
        entry = await store.queued_error(entry_id)
        if entry is None:
            raise errorqueue.UnknownEntry(f"no error-queue entry {entry_id}")
        return entry

    entry = _with_queue(config, work)
    click.echo(f"entry {entry.id} ({entry.status}): {entry.collection}/{entry.key}")
    for error in entry.errors:
        click.echo(f"  - {error.get('text', error.get('message'))}")
    click.echo(json.dumps(entry.payload, indent=2, ensure_ascii=False))


@errors.command("fix")
@with_config
@click.argument("entry_id", type=int)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="FIELD=JSON",
    help="Set a field (the value is JSON, or text): --set household_size=4",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False),
    help="The whole corrected record as a JSON file.",
)
def errors_fix(
    config: AgentConfig, entry_id: int, assignments: tuple[str, ...], path: str | None
) -> None:
    """Correct an entry's record and check it again (then: errors resubmit ID)."""
    replacement = None
    if path is not None:
        with friendly_errors():
            replacement = loads_record(Path(path).read_bytes())

    async def work(store: Any, validator: Any) -> list[Any]:
        entry = await store.queued_error(entry_id)
        if entry is None or entry.status != "open":
            raise errorqueue.UnknownEntry(f"no open error-queue entry {entry_id}")
        payload = dict(entry.payload) if replacement is None else replacement
        for assignment in assignments:
            name, sep, text = assignment.partition("=")
            if not sep or not name:
                raise RejectedInput([RecordError("--set takes FIELD=VALUE", "usage")])
            try:
                payload[name] = loads_record(text)
            except ValueError:
                payload[name] = text
        return await errorqueue.fix(store, config, validator, entry_id, payload)

    remaining = _with_queue(config, work)
    if remaining:
        click.echo(f"entry {entry_id} still has problems:")
        for error in remaining:
            click.echo(f"  - {error}")
        sys.exit(1)
    click.echo(
        f"entry {entry_id} now passes; store it with: fieldsync-agent errors resubmit {entry_id}"
    )


@errors.command("resubmit")
@with_config
@click.argument("entry_id", type=int)
def errors_resubmit(config: AgentConfig, entry_id: int) -> None:
    """Check an entry again and, if it passes, store it (it then syncs like any record)."""

    async def work(store: Any, validator: Any) -> list[Any]:
        return await errorqueue.resubmit(
            store, config, validator, entry_id, int(time.time() * 1000)
        )

    remaining = _with_queue(config, work)
    if remaining:
        _fail("; ".join(str(e) for e in remaining))
    click.echo(f"entry {entry_id} stored")


@errors.command("discard")
@with_config
@click.argument("entry_id", type=int)
@click.option("--reason", required=True, help="Why the record is not kept.")
def errors_discard(config: AgentConfig, entry_id: int, reason: str) -> None:
    """Give up on an entry, with a reason (it stays listed as discarded)."""

    async def work(store: Any, validator: Any) -> None:
        await errorqueue.discard(store, entry_id, reason, int(time.time() * 1000))

    _with_queue(config, work)
    click.echo(f"entry {entry_id} discarded")


@main.group()
def conflicts() -> None:
    """Review conflicts (concurrent edits a person must decide), also while offline."""


def _with_review(config: AgentConfig, work: Callable[..., Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        async with open_agent(config) as agent:
            validator = await agent.validator()
            return await work(agent.store, partial_check(validator))

    with friendly_errors():
        try:
            return asyncio.run(run())
        except review.ReviewError as e:
            _fail(str(e))
    raise AssertionError("unreachable")


def _side_lines(conflict: review.LocalConflict) -> list[str]:
    return [
        f"  {n}. {json.dumps(side.value, ensure_ascii=False)}  by {side.origin} "
        f"at {review.to_json_when(side.hlc)}" + ("  (shown now)" if n == 1 else "")
        for n, side in enumerate(conflict.sides, 1)
    ]


@conflicts.command("list")
@with_config
@click.option("--collection", default=None, help="Only this collection.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def conflicts_list(config: AgentConfig, collection: str | None, as_json: bool) -> None:
    """Open conflicts on this node's copy; those marked 'here' can be resolved offline."""

    async def work(store: Any, check: Any) -> list[review.LocalConflict]:
        return await review.list_conflicts(store, collection)

    found = _with_review(config, work)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in found], indent=2, ensure_ascii=False))
        return
    if not found:
        click.echo("no open conflicts")
    for c in found:
        where = "here" if c.resolvable_here else f"by {c.reviewer or 'HQ'}"
        values = " | ".join(json.dumps(h.value, ensure_ascii=False) for h in c.sides)
        click.echo(f"{c.collection}/{c.key}  {c.field}: {values}  (resolve {where})")


@conflicts.command("show")
@with_config
@click.argument("collection")
@click.argument("key")
@click.argument("field")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def conflicts_show(
    config: AgentConfig, collection: str, key: str, field: str, as_json: bool
) -> None:
    """One conflict: every side with who wrote it and when."""

    async def work(store: Any, check: Any) -> review.LocalConflict:
        return await review.get_conflict(store, collection, key, field)

    conflict = _with_review(config, work)
    if as_json:
        click.echo(json.dumps(conflict.to_json(), indent=2, ensure_ascii=False))
        return
    who = "this node" if conflict.resolvable_here else (conflict.reviewer or "HQ")
    click.echo(f"{collection}/{key} field {field!r} (resolved by {who}):")
    for line in _side_lines(conflict):
        click.echo(line)


@conflicts.command("resolve")
@with_config
@click.argument("collection")
@click.argument("key")
@click.argument("field")
@click.option("--value", "value_text", default=None, help="The value to keep, as JSON.")
@click.option("--take", type=int, default=None, help="Keep side N as numbered by `show`.")
def conflicts_resolve(
    config: AgentConfig,
    collection: str,
    key: str,
    field: str,
    value_text: str | None,
    take: int | None,
) -> None:
    """Decide a conflict on this node (offline is fine): it syncs to HQ with the next link."""
    if (value_text is None) == (take is None):
        _fail("give exactly one of --value JSON or --take N", 2)
    value: Any = None
    if value_text is not None:
        try:
            value = loads_record(value_text)
        except ValueError as e:
            _fail(f"--value is not valid JSON: {e}", 2)

    async def work(store: Any, check: Any) -> tuple[Any, Any, int]:
        return await review.resolve(
            store, collection, key, field, value=value, take=take, check=check
        )

    _, written, seq = _with_review(config, work)
    click.echo(
        f"resolved {collection}/{key} {field} = {json.dumps(written, ensure_ascii=False)} "
        f"(local change {seq}; it reaches HQ and the other nodes with the next sync)"
    )


@main.command()
@with_config
@click.argument("collection")
@click.argument("key")
def get(config: AgentConfig, collection: str, key: str) -> None:
    """Print one record as JSON."""

    async def read() -> dict[str, Any] | None:
        async with open_agent(config) as agent:
            return await agent.store.get(collection, key)

    found = _run(read())
    if found is None:
        _fail(f"no record {key!r} in {collection}")
    click.echo(json.dumps(found, indent=2, ensure_ascii=False))


@main.command("list")
@with_config
@click.argument("collection")
@click.option(
    "--where",
    "conditions",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Only records whose FIELD equals VALUE (JSON, or text): --where household_size=4. "
    "Repeat to require several.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_PAGE),
    default=100,
    show_default=True,
    help="Most records.",
)
@click.option("--after", default=None, metavar="KEY", help="Start after this record key (paging).")
def list_command(
    config: AgentConfig,
    collection: str,
    conditions: tuple[str, ...],
    limit: int,
    after: str | None,
) -> None:
    """Print COLLECTION's records as JSON lines, in key order, filtered like the local API's
    `GET /v1/collections/COLLECTION/records?FIELD=VALUE`."""
    if collection not in config.collections:
        _fail(f"collection {collection!r} is not configured in [collections]")
    filters: dict[str, Any] = {}
    for condition in conditions:
        name, sep, text = condition.partition("=")
        if not sep or not name:
            _fail(f"--where takes FIELD=VALUE, got {condition!r}", 2)
        filters[name] = filter_value(text)

    async def read() -> tuple[list[dict[str, Any]], str | None]:
        async with open_agent(config) as agent:
            return await agent.store.page(collection, filters, after, limit)

    records, next_after = _run(read())
    for record in records:
        click.echo(json.dumps(record, ensure_ascii=False))
    if next_after is not None:
        click.echo(f"more records: add --after {next_after}", err=True)


@main.command()
@click.argument("collection", type=click.Choice(["beneficiaries", "distributions"]))
@click.option("--count", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def generate(collection: str, count: int, seed: int, out: Path) -> None:
    """Write COUNT realistic generated field records as NDJSON (seeded, deterministic)."""
    from agent import fieldgen  # imported here: the daemon should not carry the generator's data

    written = fieldgen.write_ndjson(out, collection, count, seed)
    click.echo(f"wrote {written} {collection} to {out}")
