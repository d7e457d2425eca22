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

from hq_server.app import ServeError, serve
from hq_server.config import HQConfig, load_config
from hq_server.keys import HQKeyError
from hq_server.logs import setup_logging
from hq_server.store import Node, SQLiteHQStore, StoreError
from protocol.config import ConfigError
from protocol.transport import b64

T = TypeVar("T")
READY_PREFIX = "fieldsync-hq listening on "
_NODE_COLUMNS = ("NAME", "NODE ID", "ENROLLED", "LAST CONTACT", "ACKED", "FLAGGED", "REVOKED")

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


def _with_store(config: HQConfig, work: Callable[[SQLiteHQStore], Awaitable[T]]) -> T:
    """Run `work` against the existing store; StoreError becomes one line on stderr, exit 1."""

    async def run() -> T:
        async with SQLiteHQStore(config.hq.db_path, create=False) as store:
            return await work(store)

    try:
        return asyncio.run(run())
    except StoreError as e:
        _fail(str(e))


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


@click.group()
@click.version_option(package_name="fieldsync", prog_name="fieldsync-hq")
def main() -> None:
    """fieldsync HQ: receive field batches, serve downstream feeds, manage nodes."""


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
    """List enrolled nodes: contact, high-water mark, clock flags, revocation."""
    config = _load(config_path)
    nodes = _with_store(config, lambda store: store.list_nodes())
    if as_json:
        click.echo(json.dumps([_node_json(n) for n in nodes], indent=2, ensure_ascii=False))
        return
    rows = [_NODE_COLUMNS] + [
        (
            n.name,
            n.node_id,
            _when(n.enrolled_at),
            _when(n.last_contact),
            str(n.acked_through),
            "yes" if n.flagged_reason else "-",
            _when(n.revoked_at),
        )
        for n in nodes
    ]
    click.echo(_table(rows))


@main.group("token")
def token_group() -> None:
    """Enrolment tokens."""


@token_group.command("create")
@config_option
@click.option("--node", "node_name", required=True, help="Name the enrolled node will get.")
@click.option(
    "--ttl-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Lifetime in hours (default: hq.token_ttl_hours).",
)
def token_create(config_path: Path, node_name: str, ttl_hours: float | None) -> None:
    """Issue a one-time enrolment token; prints only the token (it is not stored, only its hash)."""
    config = _load(config_path)
    if not node_name.strip():
        _fail("--node must not be empty", 2)
    hours = ttl_hours if ttl_hours is not None else config.hq.token_ttl_hours
    ttl_ms = max(1, round(hours * 3_600_000))
    issued = _with_store(
        config, lambda store: store.create_token(node_name, ttl_ms, actor=_actor())
    )
    click.echo(issued.token)


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


if __name__ == "__main__":
    main()
