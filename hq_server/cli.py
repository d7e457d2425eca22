"""`fieldsync-hq`: run the HQ server, and operate its store directly (no server needed).

Output is for people and scripts alike: `token create` prints only the token, `records` prints JSON
lines, `nodes --json` prints one JSON array. Exit codes: 0 ok, 1 the operation failed (message on
stderr), 2 bad usage or configuration (one line on stderr, never a traceback).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from hq_server.admin_api import (
    conflict_json,
    current_references,
    iso_time,
    node_names,
    parse_json,
    resolution_problems,
    side_value,
)
from hq_server.app import ServeError, hq_store, load_hq_collections, serve
from hq_server.config import HQConfig, load_config
from hq_server.keys import HQKeyError
from hq_server.logs import setup_logging
from hq_server.routing.config import RoutesConfig, load_routes
from hq_server.routing.mapping import MappingError
from hq_server.routing.router import describe, map_change
from hq_server.routing.state import RouterStore, RouteState, SourceChange
from hq_server.store import (
    ConflictEntry,
    ConflictNotOpen,
    IssuedToken,
    Node,
    SQLiteHQStore,
    StoreError,
    check_groups,
)
from protocol.collections import CollectionsConfig
from protocol.config import ConfigError
from protocol.files import set_private_umask
from protocol.identity import NodeIdentity
from protocol.references import REFERENCES_COLLECTION, read_table, table_record
from protocol.transport import b64

T = TypeVar("T")
READY_PREFIX = "fieldsync-hq listening on "
_NODE_COLUMNS = (
    "NAME", "NODE ID", "GROUPS", "ENROLLED", "LAST CONTACT", "ACKED", "REVOKED", "FLAGGED"
)  # fmt: skip

config_option = click.option(
    "--config",
    "config_path",
    required=True,
    envvar="FIELDSYNC_HQ_CONFIG",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HQ config file (TOML); default from $FIELDSYNC_HQ_CONFIG.",
)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"fieldsync-hq: {message}", err=True)
    sys.exit(code)


def _load(path: Path) -> HQConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        _fail(str(e), 2)


def _actor() -> str:
    """Who ran an audited command: the OS user (uid if the user has no name)."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):
        return f"cli:uid={os.getuid()}"


def _open_store(config: HQConfig) -> SQLiteHQStore:
    """The existing store, opened as the server opens it (`hq_server.app.hq_store`): HQ's node id
    and the collections' policies, so what the CLI writes is what the server would write. Before
    HQ's first start there is no key yet: the store then reads but cannot author changes."""
    key_path = config.hq.key_path
    identity = None
    if key_path.exists():
        try:
            identity = NodeIdentity.load(key_path)
        except (OSError, ValueError, TypeError) as e:
            _fail(f"HQ key {key_path}: {e}")
    return hq_store(config.hq, identity, _collections(config), create=False)


def _collections(config: HQConfig) -> CollectionsConfig | None:
    try:
        return load_hq_collections(config.hq)
    except ConfigError as e:
        _fail(str(e), 2)


def _with_store(
    config: HQConfig,
    work: Callable[[SQLiteHQStore], Awaitable[T]],
    store: SQLiteHQStore | None = None,
) -> T:
    """Run `work` against the existing store (`store`, if already made by `_open_store`);
    StoreError becomes one line on stderr, exit 1."""
    store = _open_store(config) if store is None else store

    async def run() -> T:
        async with store:
            return await work(store)

    try:
        return asyncio.run(run())
    except StoreError as e:
        _fail(str(e))


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


_iso = iso_time


@click.group()
@click.version_option(package_name="fieldsync", prog_name="fieldsync-hq")
def main() -> None:
    """fieldsync HQ: receive field batches, serve downstream feeds, manage nodes."""
    # Whatever this process creates is private (0600 files, 0700 folders), as on the agent; the
    # store and key code set those modes themselves, this covers what a library creates.
    set_private_umask()


@main.command("serve")
@config_option
def serve_command(config_path: Path) -> None:
    """Run the HQ server until SIGTERM or SIGINT."""
    config = _load(config_path)
    setup_logging(config.hq.log_level)

    def ready(url: str) -> None:
        print(READY_PREFIX + url, flush=True)

    try:
        asyncio.run(_serve(config, ready))
    except ConfigError as e:
        _fail(str(e), 2)
    except (ServeError, StoreError, HQKeyError) as e:
        _fail(str(e))


async def _serve(config: HQConfig, ready: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(config, stop, on_ready=ready)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _node_json(node: Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "node_id": node.node_id,
        "public_key": b64(node.public_key),
        "enrolled_at": _iso(node.enrolled_at),
        "last_contact": _iso(node.last_contact),
        "acked_through": node.acked_through,
        "clock_offset_ms": node.clock_offset_ms,
        "flagged_reason": node.flagged_reason,
        "revoked_at": _iso(node.revoked_at),
        "groups": list(node.groups),
    }


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@main.command("nodes")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array with every field.")
def nodes_command(config_path: Path, as_json: bool) -> None:
    """List enrolled nodes: groups, contact, high-water mark, revocation, why a node is flagged."""
    config = _load(config_path)
    nodes = _with_store(config, lambda store: store.list_nodes())
    if as_json:
        click.echo(json.dumps([_node_json(n) for n in nodes], indent=2, ensure_ascii=False))
        return
    rows = [_NODE_COLUMNS] + [
        (
            n.name,
            n.node_id,
            _groups(n.groups),
            _when(n.enrolled_at),
            _when(n.last_contact),
            str(n.acked_through),
            _when(n.revoked_at),
            n.flagged_reason or "-",
        )
        for n in nodes
    ]
    click.echo(_table(rows))


@main.group("token")
def token_group() -> None:
    """Enrolment tokens."""


@token_group.command("create")
@config_option
@click.option(
    "--node",
    "node_name",
    required=True,
    help="Name the enrolled node gets (the name the agent sends is ignored); with --reenroll, "
    "the enrolled node (name or id) the token is for.",
)
@click.option(
    "--reenroll",
    is_flag=True,
    help="Enrol the key of an enrolled node again (e.g. its enrolment file was lost): keeps the "
    "node's id, name and sequence marks. Only that node's key can use the token.",
)
@click.option(
    "--ttl-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Lifetime in hours (default: hq.token_ttl_hours).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Node group the enrolled node joins (repeatable): what it owns and reviews. With "
    "--reenroll: replaces the node's groups (none given: they are kept).",
)
def token_create(
    config_path: Path,
    node_name: str,
    reenroll: bool,
    ttl_hours: float | None,
    groups: tuple[str, ...],
) -> None:
    """Issue a one-time enrolment token bound to one node name; prints only the token (it is not
    stored, only its hash).

    An ordinary token enrols a new key; a key that is already enrolled is refused with it
    (already_enrolled) and needs a token made with --reenroll for its node."""
    config = _load(config_path)
    if not node_name.strip():
        _fail("--node must not be empty", 2)
    chosen = _check_groups(groups, "--group")
    hours = ttl_hours if ttl_hours is not None else config.hq.token_ttl_hours
    ttl_ms = max(1, round(hours * 3_600_000))

    async def create(store: SQLiteHQStore) -> tuple[IssuedToken, list[Node]]:
        issued = await store.create_token(
            node_name, ttl_ms, actor=_actor(), groups=chosen, reenroll=reenroll
        )
        named = [] if reenroll else [n for n in await store.list_nodes() if n.name == node_name]
        return issued, [n for n in named if n.active]

    issued, namesakes = _with_store(config, create)
    for node in namesakes:
        click.echo(
            f"note: node {node.node_id} is already named {node_name!r}; this token enrols a new "
            f"key as another node of that name (to enrol {node.node_id} again, use --reenroll)",
            err=True,
        )
    click.echo(issued.token)


def _check_groups(groups: Sequence[str], option: str) -> tuple[str, ...]:
    try:
        return check_groups(groups)
    except StoreError as e:
        _fail(f"{option}: {e}", 2)


def _groups(groups: Sequence[str]) -> str:
    return ",".join(groups) or "-"


@main.group("node")
def node_group() -> None:
    """Manage one node."""


@node_group.command("revoke")
@config_option
@click.argument("node")
def node_revoke(config_path: Path, node: str) -> None:
    """Revoke NODE (node id, or name of a single node): its batches and requests are refused."""
    config = _load(config_path)

    async def work(store: SQLiteHQStore) -> tuple[Node, bool]:
        found = await store.find_node(node)
        return await store.revoke_node(found.node_id, actor=_actor())

    revoked, changed = _with_store(config, work)
    if changed:
        click.echo(f"revoked {revoked.name} ({revoked.node_id})")
    else:
        click.echo(
            f"already revoked {revoked.name} ({revoked.node_id}) at {_when(revoked.revoked_at)}"
        )


@node_group.command("groups")
@config_option
@click.argument("node")
@click.option(
    "--set",
    "new_groups",
    multiple=True,
    help="Replace the node's groups with these (repeatable); without it, show them.",
)
@click.option("--clear", is_flag=True, help="Remove the node from every group.")
def node_groups(config_path: Path, node: str, new_groups: tuple[str, ...], clear: bool) -> None:
    """Show or replace the groups of NODE (node id, or name of a single node). Groups decide who
    writes source_of_truth fields and who reviews conflicts offline; the node learns them at its
    next contact. Changes are audited."""
    config = _load(config_path)
    if clear and new_groups:
        _fail("give --set GROUP ... or --clear, not both", 2)
    chosen = _check_groups(new_groups, "--set")

    async def work(store: SQLiteHQStore) -> Node:
        found = await store.find_node(node)
        if not (clear or chosen):
            return found
        return await store.set_groups(found.node_id, chosen, actor=_actor())

    changed = _with_store(config, work)
    click.echo(f"{changed.name} ({changed.node_id}): {_groups(changed.groups)}")


@main.command("records")
@config_option
@click.argument("collection")
@click.option("--count", "count_only", is_flag=True, help="Print only the number of records.")
@click.option("--deleted", is_flag=True, help="Include deleted (tombstoned) records.")
def records_command(config_path: Path, collection: str, count_only: bool, deleted: bool) -> None:
    """Print a collection's records as JSON lines (key order), or their number."""
    config = _load(config_path)
    if count_only:
        count = _with_store(config, lambda store: store.count_records(collection, deleted=deleted))
        click.echo(str(count))
        return

    async def dump(store: SQLiteHQStore) -> None:
        after = ""
        while page := await store.list_records(collection, after_key=after, deleted=deleted):
            for record in page:
                line = {
                    "key": record.key,
                    "data": record.data,
                    "version": record.version,
                    "updated_seq": record.updated_seq,
                    "deleted": record.deleted,
                }
                click.echo(json.dumps(line, ensure_ascii=False))
            after = page[-1].key

    _with_store(config, dump)


@main.command("audit")
@config_option
@click.option("--verify", is_flag=True, help="Only check the hash chain; exit 1 if it is broken.")
def audit_command(config_path: Path, verify: bool) -> None:
    """Print the audit log as JSON lines (oldest first), or verify its hash chain."""
    config = _load(config_path)
    if verify:
        broken = _with_store(config, lambda store: store.verify_audit())
        if broken is not None:
            _fail(f"audit log hash chain broken at entry {broken}")
        click.echo("audit log ok")
        return
    for entry in _with_store(config, lambda store: store.audit_log()):
        line = {
            "id": entry.id,
            "at": _iso(entry.at),
            "actor": entry.actor,
            "action": entry.action,
            "detail": entry.detail,
        }
        click.echo(json.dumps(line, ensure_ascii=False))


# -- the conflict queue


@main.group("conflicts")
def conflicts_group() -> None:
    """The conflict queue: review conflicts waiting for a person (open), and the log of settled
    ones (resolved; auto for lww losers, reverted source_of_truth writes, clock-bounded stamps)."""


def _value(value: Any, width: int = 0) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if not width or len(text) <= width else text[: width - 3] + "..."


def _who(item: dict[str, Any]) -> str:
    """`node name, when` of a side, ancestor or resolution as conflict_json gives it."""
    when = item["at"][:19].replace("T", " ") + "Z" if item.get("at") else ""
    return ", ".join(x for x in (item.get("node") or item.get("origin", "?"), when) if x)


@conflicts_group.command("list")
@config_option
@click.option(
    "--status",
    type=click.Choice(["open", "resolved", "auto", "all"]),
    default=None,
    help="Which conflicts (default: open).",
)
@click.option("--all", "every", is_flag=True, help="Every status: the whole conflict log.")
@click.option("--collection", help="Only this collection.")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only ids above this.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array ([] when none).")
def conflicts_list(
    config_path: Path,
    status: str | None,
    every: bool,
    collection: str | None,
    after: int,
    limit: int,
    as_json: bool,
) -> None:
    """List conflicts by id: the field, both sides (value, node, time), who may review it."""
    config = _load(config_path)
    if every and status not in (None, "all"):
        _fail("give --all or --status, not both", 2)
    wanted = None if every or status == "all" else status or "open"

    async def work(store: SQLiteHQStore) -> tuple[list[ConflictEntry], dict[str, str]]:
        entries = await store.list_conflicts(
            status=wanted, collection=collection, after_id=after, limit=limit + 1
        )
        return entries, await node_names(store)

    entries, names = _with_store(config, work)
    more = len(entries) > limit
    docs = [conflict_json(e, names) for e in entries[:limit]]
    if as_json:
        click.echo(json.dumps(docs, indent=2, ensure_ascii=False))
    else:
        rows = [["ID", "COLLECTION", "KEY", "FIELD", "POLICY", "STATUS", "REVIEWER", "SIDES"]]
        rows += [
            [
                str(d["id"]),
                d["collection"],
                d["key"],
                d["field"],
                d["policy"],
                d["status"],
                d["reviewer"] or "HQ",
                "  |  ".join(
                    f"{s['side']}: {_value(s['value'], 24)} ({_who(s)})" for s in d["sides"]
                ),
            ]
            for d in docs
        ]
        click.echo(_table(rows))
    if more:
        click.echo(f"more conflicts follow: --after {docs[-1]['id']} for the next page", err=True)


@conflicts_group.command("show")
@config_option
@click.argument("conflict_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def conflicts_show(config_path: Path, conflict_id: int, as_json: bool) -> None:
    """Everything about one conflict: both sides, the common ancestor, the resolution."""
    config = _load(config_path)

    async def work(store: SQLiteHQStore) -> dict[str, Any]:
        return conflict_json(await store.get_conflict(conflict_id), await node_names(store))

    doc = _with_store(config, work)
    if as_json:
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    click.echo(f"conflict {doc['id']}: {doc['collection']}/{doc['key']} field {doc['field']}")
    click.echo(
        f"policy {doc['policy']}, status {doc['status']}, opened {_when_iso(doc['opened_at'])}"
        + (f", closed {_when_iso(doc['closed_at'])}" if doc["closed_at"] else "")
    )
    click.echo(f"reviewer: {doc['reviewer'] or 'HQ only'}")
    if doc["note"]:
        click.echo(f"note: {doc['note']}")
    ancestor = doc["ancestor"]
    if ancestor is None:
        click.echo("ancestor: none (the sides did not start from a common value)")
    else:
        click.echo(f"ancestor: {_value(ancestor['value'])} ({_who(ancestor)})")
    for side in doc["sides"]:
        click.echo(
            f"side {side['side']}: {_value(side['value'])} ({_who(side)}; node {side['origin']})"
        )
    resolution = doc["resolution"]
    if resolution is not None:
        by = f" by {resolution['by']}" if resolution.get("by") else ""
        note = f" ({resolution['note']})" if resolution.get("note") else ""
        source = resolution.get("node") or resolution.get("origin")
        click.echo(
            f"resolution: {_value(resolution.get('value'))}{by}{note}; "
            f"change {resolution.get('seq')} of {source}"
        )


class _BadInput(Exception):
    """--take names a side the conflict does not have, or the value is one the field's schema
    refuses (bad input: nothing changed, exit 2)."""


def _when_iso(text: str | None) -> str:
    return "-" if text is None else text[:19].replace("T", " ") + "Z"


@conflicts_group.command("resolve")
@config_option
@click.argument("conflict_id", type=int)
@click.option("--value", "value_text", help='The value to keep, as JSON (5, "text", null).')
@click.option("--take", type=int, help="Keep side N's value (numbered as `conflicts show` does).")
@click.option("--note", default="", help="Why (kept with the resolution and in the audit log).")
def conflicts_resolve(
    config_path: Path, conflict_id: int, value_text: str | None, take: int | None, note: str
) -> None:
    """Settle an open conflict: HQ writes the chosen value as a new change that covers every
    side, so the conflict closes here and on every node that receives it. Audited."""
    config = _load(config_path)
    if (value_text is None) == (take is None):
        _fail("give --value JSON or --take N (exactly one)", 2)
    value: Any = None
    if value_text is not None:
        try:
            value = parse_json(value_text)
        except ValueError as e:
            _fail(f"--value is not JSON ({e}); quote text as JSON, e.g. --value '\"text\"'", 2)

    store = _open_store(config)
    if not store.origin:
        _fail(
            f"HQ's key {config.hq.key_path} does not exist yet, so HQ cannot write the "
            "resolution: start `fieldsync-hq serve` once first"
        )

    collections = _collections(config)

    async def work(store: SQLiteHQStore) -> tuple[ConflictEntry, dict[str, str]]:
        entry = await store.get_conflict(conflict_id)
        if entry.status != "open":
            raise ConflictNotOpen(
                f"conflict {conflict_id} is {entry.status}, not open: nothing to resolve"
            )
        chosen = value
        if take is not None:
            try:
                chosen = side_value(entry, take)
            except ValueError as e:
                raise _BadInput(f"--take {take}: {e}") from e
        references = await current_references(store, collections)
        now_ms = int(time.time() * 1000)
        problems = resolution_problems(collections, entry, chosen, now_ms, references)
        if problems:
            raise _BadInput(f"not a valid {entry.collection}.{entry.field}: {'; '.join(problems)}")
        done = await store.resolve_conflict(conflict_id, chosen, actor=_actor(), note=note)
        return done, await node_names(store)

    try:
        done, names = _with_store(config, work, store)
    except _BadInput as e:
        _fail(str(e), 2)
    doc = conflict_json(done, names)
    resolution = doc["resolution"] or {}
    click.echo(
        f"resolved conflict {doc['id']}: {doc['collection']}/{doc['key']} {doc['field']} = "
        f"{_value(resolution.get('value'))} (HQ change {resolution.get('seq')}, sent to every "
        "node)"
    )


# -- admin API tokens


# -- reference tables sent to the agents


@main.group("references")
def references_group() -> None:
    """Reference tables (admin codes, sites, lookups) sent to every agent."""


@references_group.command("push")
@config_option
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--column", default=None, help="Column (CSV) or key (JSON) holding the codes.")
@click.option("--value-column", default=None, help="For a lookup table: the column of values.")
def references_push(
    config_path: Path, name: str, file: Path, column: str | None, value_column: str | None
) -> None:
    """Send a newer version of reference table NAME, read from FILE, to every agent. Agents check
    records against it from their next sync on (offline ones when their link returns). Audited."""
    config = _load(config_path)
    collections = _collections(config)
    if collections is not None:
        known = collections.references.get(name)
        if known is None:
            names = ", ".join(sorted(collections.references)) or "none"
            _fail(f"no reference table {name!r} in {collections.source} (tables: {names})", 2)
        if (known.values is not None) != (value_column is not None):
            kind = "a lookup table: give --value-column" if known.values else "a list of codes"
            _fail(f"reference table {name!r} is {kind}", 2)
    try:
        table = read_table(name, file, column=column, value_column=value_column)
    except (OSError, ValueError) as e:
        _fail(f"{file}: {e}", 2)
    if not table.codes:
        _fail(f"{file}: no codes found; an empty table would refuse every record", 2)
    store = _open_store(config)
    if not store.origin:
        _fail(f"HQ's key {config.hq.key_path} does not exist yet: start `fieldsync-hq serve` once")
    actor = _actor()

    async def work(store: SQLiteHQStore) -> Any:
        return await store.write_record(
            REFERENCES_COLLECTION,
            name,
            table_record(table, pushed_by=actor),
            actor=actor,
            action="reference.push",
            detail={"codes": len(table.codes), "file": str(file)},
        )

    change = _with_store(config, work, store)
    click.echo(
        f"reference table {name}: {len(table.codes)} codes from {file.name} queued for every "
        f"agent (HQ change {change.seq})"
    )


@references_group.command("list")
@config_option
def references_list(config_path: Path) -> None:
    """The tables HQ has sent, with their size and who pushed them."""
    config = _load(config_path)

    async def work(store: SQLiteHQStore) -> list[Any]:
        return await store.list_records(REFERENCES_COLLECTION)

    rows = [["NAME", "CODES", "SOURCE", "PUSHED BY"]]
    for record in _with_store(config, work):
        data = record.data
        rows.append(
            [
                record.key,
                str(len(data.get("codes", []))),
                str(data.get("source")),
                str(data.get("pushed_by")),
            ]
        )
    click.echo(_table(rows) if len(rows) > 1 else "no reference tables sent yet")


@main.group("api-token")
def api_token_group() -> None:
    """Bearer tokens for HQ's admin API (/v1/admin/...)."""


@api_token_group.command("create")
@config_option
@click.argument("name")
def api_token_create(config_path: Path, name: str) -> None:
    """Issue an admin-API token called NAME; prints only the token, which is shown this once
    (only its hash is stored). What the token does is audited as api:NAME."""
    config = _load(config_path)
    issued = _with_store(config, lambda store: store.create_api_token(name, actor=_actor()))
    click.echo(issued.token)


@api_token_group.command("revoke")
@config_option
@click.argument("name")
def api_token_revoke(config_path: Path, name: str) -> None:
    """Revoke the admin-API token NAME: its requests are refused (401) from now on. Audited."""
    config = _load(config_path)
    changed = _with_store(config, lambda store: store.revoke_api_token(name, actor=_actor()))
    click.echo(f"revoked API token {name}" if changed else f"API token {name} was already revoked")


@api_token_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def api_token_list(config_path: Path, as_json: bool) -> None:
    """List admin-API tokens (names and dates; the tokens themselves are not stored)."""
    tokens = _with_store(_load(config_path), lambda store: store.list_api_tokens())
    docs = [
        {
            "name": t.name,
            "created_at": _iso(t.created_at),
            "created_by": t.created_by,
            "revoked_at": _iso(t.revoked_at),
        }
        for t in tokens
    ]
    if as_json:
        click.echo(json.dumps(docs, indent=2, ensure_ascii=False))
        return
    rows = [["NAME", "CREATED", "CREATED BY", "REVOKED"]]
    rows += [[t.name, _when(t.created_at), t.created_by, _when(t.revoked_at)] for t in tokens]
    click.echo(_table(rows))


# -- routes and the dead-letter queue


def _routes(config: HQConfig) -> RoutesConfig:
    if config.hq.routes_file is None:
        _fail("hq.routes_file is not set in the config: no routes are configured", 2)
    try:
        return load_routes(config.hq.routes_file)
    except ConfigError as e:
        _fail(str(e), 2)


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    header, *body = rows
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
    return "\n".join(lines)


@main.command("routes")
@config_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json", "markdown"]),
    default="table",
    show_default=True,
)
def routes_command(config_path: Path, output: str) -> None:
    """Inventory of every route: source, target, data, mapping, trigger, error handling, owner,
    state, with delivery counts and the dead-letter backlog."""
    config = _load(config_path)
    routes = _routes(config)

    async def gather(store: SQLiteHQStore) -> tuple[dict[str, RouteState], dict[str, int]]:
        router_store = RouterStore(store)
        await router_store.open()
        states = await router_store.states()
        dead = {name: await router_store.count_dead_letters(name) for name in routes.routes}
        return states, dead

    if config.hq.db_path.exists():
        states, dead = _with_store(config, gather)
    else:  # before HQ's first start: the inventory still validates and lists every route
        states, dead = {}, dict.fromkeys(routes.routes, 0)
    entries = []
    for name, route in routes.routes.items():
        entry = describe(route)
        state = states.get(name, RouteState(name))
        entry |= {
            "delivered": state.delivered,
            "dead_letters_open": dead[name],
            "position": state.cursor,
            "last_error": state.last_error or "",
        }
        entries.append(entry)
    if output == "json":
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    columns = [
        "name",
        "state",
        "source",
        "filter",
        "mapping",
        "target",
        "trigger",
        "error_handling",
        "owner",
        "delivered",
        "dead_letters_open",
    ]
    rows = [[c.upper().replace("_", " ") for c in columns]]
    rows += [[str(e[c]) for c in columns] for e in entries]
    click.echo(_markdown(rows) if output == "markdown" else _table(rows))


@main.group("route")
def route_group() -> None:
    """Work with one route."""


@route_group.command("test")
@config_option
@click.argument("name")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sample source records: one JSON object, a JSON array, or NDJSON.",
)
def route_test(config_path: Path, name: str, input_path: Path) -> None:
    """Show what route NAME would deliver for sample input (dry run: nothing is sent)."""
    routes = _routes(_load(config_path))
    route = routes.routes.get(name)
    if route is None:
        _fail(f"no route {name!r} (known: {', '.join(sorted(routes.routes)) or 'none'})")
    text = input_path.read_text(encoding="utf-8").strip()
    try:
        loaded = json.loads(text)
        samples = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError:
        try:
            samples = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            _fail(f"{input_path}: line {e.lineno}: not JSON: {e.msg}")
    collection = route.section.sources[0]
    for number, record in enumerate(samples, start=1):
        if not isinstance(record, dict):
            _fail(f"{input_path}: sample {number} is not a JSON object")
        # No record key: the mapping takes it from its source_key field, as for a real record.
        change = SourceChange(0, "sample", number, collection, "", "upsert", record)
        if not route.wants(collection, record):
            click.echo(json.dumps({"sample": number, "filtered_out": True}))
            continue
        try:
            mapped = map_change(route, change)
        except MappingError as e:
            click.echo(json.dumps({"sample": number, "mapping_error": str(e)}))
            continue
        for item in mapped:
            click.echo(
                json.dumps(
                    {"sample": number, "target_key": item.target_key, "record": item.payload},
                    ensure_ascii=False,
                )
            )


@main.group("dlq")
def dlq_group() -> None:
    """The dead-letter queue: deliveries that were rejected or ran out of attempts."""


def _router_store(config: HQConfig, work: Callable[[RouterStore], Awaitable[T]]) -> T:
    async def run(store: SQLiteHQStore) -> T:
        router_store = RouterStore(store)
        await router_store.open()
        return await work(router_store)

    return _with_store(config, run)


@dlq_group.command("list")
@config_option
@click.option("--route", "route_name", help="Only this route.")
@click.option(
    "--status",
    type=click.Choice(["open", "resubmit", "delivered", "discarded", "all"]),
    default="open",
    show_default=True,
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(
    config_path: Path, route_name: str | None, status: str, limit: int, as_json: bool
) -> None:
    """List dead letters (oldest first)."""
    letters = _router_store(
        _load(config_path),
        lambda rs: rs.dead_letters(
            route=route_name, status=None if status == "all" else status, limit=limit
        ),
    )
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter.to_json(), ensure_ascii=False))
        return
    rows = [["ID", "ROUTE", "KEY", "REASON", "ATTEMPTS", "LAST FAILED", "STATUS", "ERROR"]]
    rows += [
        [
            str(d.id),
            d.route,
            f"{d.collection}/{d.key}",
            d.reason,
            str(d.attempts),
            _when(d.last_failed_at),
            d.status,
            d.error[:60],
        ]
        for d in letters
    ]
    click.echo(_table(rows))


@dlq_group.command("show")
@config_option
@click.argument("dead_id", type=int)
def dlq_show(config_path: Path, dead_id: int) -> None:
    """Everything about one dead letter: the change, the mapped payload, the error, the times."""
    letter = _router_store(_load(config_path), lambda rs: rs.dead_letter(dead_id))
    if letter is None:
        _fail(f"no dead letter {dead_id}")
    data = letter.to_json() | {
        "first_failed_at": _iso(letter.first_failed_at),
        "last_failed_at": _iso(letter.last_failed_at),
        "resolved_at": _iso(letter.resolved_at),
    }
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _dlq_ids(
    config: HQConfig, ids: tuple[int, ...], route_name: str | None, every: bool
) -> list[int]:
    if ids and (route_name or every):
        _fail("give dead-letter ids, or --route NAME --all, not both", 2)
    if ids:
        return list(ids)
    if not (route_name and every):
        _fail("give dead-letter ids, or --route NAME --all", 2)
    letters = _router_store(
        config, lambda rs: rs.dead_letters(route=route_name, status="open", limit=1_000_000)
    )
    return [d.id for d in letters]


@dlq_group.command("resubmit")
@config_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--route", "route_name", help="With --all: every open dead letter of this route.")
@click.option("--all", "every", is_flag=True)
def dlq_resubmit(
    config_path: Path, ids: tuple[int, ...], route_name: str | None, every: bool
) -> None:
    """Deliver dead letters again, through the route's *current* mapping and sink (after a fix).
    The running server picks them up; audited."""
    config = _load(config_path)
    chosen = _dlq_ids(config, ids, route_name, every)
    changed = _router_store(
        config,
        lambda rs: rs.set_status(
            chosen, "resubmit", actor=_actor(), now_ms=int(time.time() * 1000)
        ),
    )
    click.echo(
        f"resubmitted {len(changed)} dead letter(s)" + (f": {_ids(changed)}" if changed else "")
    )
    if len(changed) < len(chosen):
        _fail(f"not open (already handled or unknown): {_ids(sorted(set(chosen) - set(changed)))}")


@dlq_group.command("discard")
@config_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--route", "route_name", help="With --all: every open dead letter of this route.")
@click.option("--all", "every", is_flag=True)
@click.option("--reason", required=True, help="Why they are discarded (kept in the audit log).")
def dlq_discard(
    config_path: Path, ids: tuple[int, ...], route_name: str | None, every: bool, reason: str
) -> None:
    """Give up on dead letters for good (they stay listed as discarded); audited."""
    config = _load(config_path)
    chosen = _dlq_ids(config, ids, route_name, every)
    changed = _router_store(
        config,
        lambda rs: rs.set_status(
            chosen, "discarded", actor=_actor(), note=reason, now_ms=int(time.time() * 1000)
        ),
    )
    click.echo(
        f"discarded {len(changed)} dead letter(s)" + (f": {_ids(changed)}" if changed else "")
    )
    if len(changed) < len(chosen):
        _fail(f"not open (already handled or unknown): {_ids(sorted(set(chosen) - set(changed)))}")


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids))


if __name__ == "__main__":
    main()
