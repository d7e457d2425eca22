"""PostgreSQL sink: upsert each record into one table, guarded by the change sequence.

One run is one transaction. Its items are first written set-based (the fast path); only if the
database refuses that does the run fall back to one savepoint per item, so that an item the database
refuses (NOT NULL, CHECK, foreign key, bad value, missing grant) is REJECTED and rolled back alone
while the others commit together.

Per item (the fallback, and runs with a single item to write):

    upsert  INSERT INTO tbl AS t (key, cols..., idempotency_key, change_seq)
            SELECT r.key, r.cols... FROM jsonb_populate_record(NULL::tbl, $1::jsonb) AS r
            ON CONFLICT (key) DO UPDATE SET cols... = EXCLUDED.cols...
            WHERE t.change_seq < EXCLUDED.change_seq
    delete  DELETE FROM tbl AS t USING jsonb_populate_record(NULL::tbl, $1::jsonb) AS r
            WHERE t.key = r.key AND t.change_seq < r.change_seq

Set-based (the fast path): the same two statements over `jsonb_populate_recordset(NULL::tbl,
$1::jsonb)`, $1 a JSON array of the items' records, all inside ONE savepoint. The run is cut into
stretches of consecutive items of one op in which no target key appears twice (and at most 8 MiB of
records); each stretch is one statement and the stretches run in order. Within a stretch each item
has its own row, so the statement does to each row what the items would do one by one, and the
stretches, in run order, keep each key's order (several versions of a key, a delete between upserts
of it): the same guard, the same end state, every item DELIVERED. Keys that differ as text but are
equal as the key column's type ("42" and "042" in an integer column) fail an upsert stretch with
21000, which falls back; deletes of one row in a stretch give the same result in any order.
A run of 500 upserts of new keys is one write: 5 statements instead of ~1,500. `python -m
bench.router` (100,000 changes in runs of 500 ~800-byte beneficiary records, payload_column mode, 2
cores): 2,500 records/s item by item; 16,000-20,000 set-based, the files sink doing 21,000-25,000.

- If a set-based statement fails with anything but a target-down error, the run rolls back to that
  savepoint and is written again item by item in the same transaction: exactly the refused items
  are REJECTED, and a transient item error (lock timeout, deadlock) makes its item ERRORED and stops
  the run after the items before it, as if the fast path had not been tried (a lock timeout is
  waited out twice). A target-down error loses the whole run, as it always did. The cost of a
  refused run is its wasted set-based attempt.
- Differences from item by item arise only where rows of one stretch interact: a constraint checked
  at the end of a statement (a foreign key between them) sees the whole stretch, so a child may
  precede its parent there; statement-level triggers fire once per stretch. `statement_timeout_s`
  bounds a stretch, not an item.
- Many versions of one key in a run cost one statement each (a stretch per version): still a third
  of the round trips of a savepoint per item. They are not collapsed to the newest version, which
  would report a refused older version DELIVERED where item by item REJECTS it.
- The guard makes every item idempotent and order-proof: a repeat (same change_seq) or a replay of an
  older change never overwrites a newer row; both count as DELIVERED ("the target had it already").
  A delete leaves no tombstone: an upsert OLDER than an applied delete, replayed on its own, would
  create the row again (the router replays a run's items in order, which converges).
- The record travels as jsonb and `jsonb_populate_record(set)` converts each value with the column
  type's own input function: "2024-05-01" fills a date column, "42" an integer key, a JSON object a
  jsonb column. A value a column cannot take is `invalid_text_representation` (REJECTED).
  A mapped field missing from the payload is written as NULL (the row mirrors the record).
- Identifiers come from configuration only: each is checked against [A-Za-z_][A-Za-z0-9_]* (at most
  63 characters) and always double-quoted, so it is used exactly as written (case-sensitive: a
  table created without quotes has a lower-case name).

Classification (SQLSTATE class or client error):

    DOWN      ERRORED with `target_down` (`Outcome.unavailable`: the router waits it out without
              spending the items' retries): cannot connect, connection lost or timed out (08,
              OSError, TimeoutError), bad credentials or database (28, 3D; also a missing or
              unsafe password file), too many connections or other lack of resources (53), admin
              or crash shutdown / cannot connect now (57P0x), read-only standby (25006), I/O (58).
    ERRORED   this item, transiently: serialization failure or deadlock (40), statement canceled
              (57014), lock not available (55P03), a cached plan invalidated by ALTER TABLE, any
              SQLSTATE not listed here (when in doubt, retry rather than dead-letter).
    REJECTED  data exceptions (22: invalid text representation, value too long, out of range),
              integrity constraints (23: not null, check, unique, foreign key), undefined table or
              column and other schema mismatches (42), permission denied (42501: the role lacks a
              grant, see config/postgres-least-privilege.sql), a trigger's RAISE (P0), a row too big
              (54), a payload that is not JSON: the same item would fail again.

A failure that loses the transaction (connection lost, COMMIT failed) makes the whole run ERRORED;
an ERRORED item otherwise ends the run (later items NOT_ATTEMPTED) and the items before it commit.
A run is retried once on a new connection when a pooled connection turns out dead at BEGIN.
Outcome details carry the SQLSTATE and the server's message, never its DETAIL (which can quote the
whole failing row) and never the password.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import asyncpg
import orjson

from hq_server.logs import event
from hq_server.sinks.base import NOT_ATTEMPTED, Delivery, Outcome, Outgoing, register_sink
from hq_server.sinks.http import required_setting, settings_error
from hq_server.sinks.plaintext import Plaintext, remote_hosts
from hq_server.sinks.secrets import SecretError, SecretMask, resolve_secret
from protocol.config import at_least, between, positive, setting

log = logging.getLogger("fieldsync.sinks.postgres")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DETAIL_MAX = 500


def check_identifier(value: Any) -> str | None:
    """None if `value` is a plain SQL identifier we quote safely, else the reason."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        return "must be a plain identifier: letters, digits and _ (not first), at most 63"
    return None


def check_optional_identifier(value: Any) -> str | None:
    return None if value == "" else check_identifier(value)


def check_table(value: Any) -> str | None:
    parts = str(value).split(".")
    if len(parts) > 2 or any(check_identifier(p) for p in parts):
        return "must be TABLE or SCHEMA.TABLE, each a plain identifier (letters, digits, _)"
    return None


def check_columns(value: Any) -> str | None:
    for field_name, column in dict(value).items():
        if not isinstance(field_name, str) or not field_name:
            return "payload field names must be non-empty strings"
        if check_identifier(column) is not None:
            return f"column for {field_name!r}: {check_identifier(column)}"
    return None


def quote_identifier(name: str) -> str:
    """`name` double-quoted for SQL. Refuses anything but a plain identifier (asyncpg has no
    identifier quoting and identifiers cannot be bind parameters)."""
    if (reason := check_identifier(name)) is not None:
        raise ValueError(f"{name!r}: {reason}")
    return '"' + name.replace('"', '""') + '"'


def quote_table(name: str) -> str:
    """TABLE or SCHEMA.TABLE, each part quoted."""
    if (reason := check_table(name)) is not None:
        raise ValueError(f"{name!r}: {reason}")
    return ".".join(quote_identifier(part) for part in name.split("."))


@dataclasses.dataclass(frozen=True)
class PostgresSettings:
    """`type = "postgres"`: rows in one table of a PostgreSQL database (see postgres.py)."""

    database: str = required_setting("Database name (required).")
    user: str = required_setting(
        "Role to log in as (required); give it only the grants in "
        "config/postgres-least-privilege.sql."
    )
    table: str = required_setting(
        "Target table, TABLE or SCHEMA.TABLE (required). Plain identifiers only, used as written "
        "(case-sensitive).",
        check_table,
    )
    host: str = setting("localhost", "Server host name or address.")
    port: int = setting(5432, "Server port.", between(1, 65535))
    password_env: str | None = setting(
        None,
        "Environment variable holding the role's password. Neither this nor password_file: no "
        "password (trust, peer or certificate authentication).",
    )
    password_file: Path | None = setting(
        None,
        "File holding the role's password, mode 0600 or stricter; re-read at each new "
        "connection, so a rotated password needs no restart.",
    )
    # No "prefer"/"require": they encrypt without checking who answers. TLS here always verifies;
    # "disable" is for a server on this machine or a private socket, said so explicitly.
    sslmode: Literal["disable", "verify-ca", "verify-full"] = setting(
        "verify-full",
        "TLS to the server: verify-full (certificate and host name), verify-ca, or disable "
        "(plain connection: only for a server on this host).",
    )
    key_column: str = setting(
        "key",
        "Column receiving the record's target key; must have a UNIQUE or PRIMARY KEY constraint.",
        check_identifier,
    )
    columns: dict[str, str] = setting(
        {},
        "Mapped payload field -> column. Fields not listed are not stored; a listed field "
        "missing from the payload is written as NULL. Set this or payload_column.",
        check_columns,
    )
    payload_column: str = setting(
        "",
        "jsonb column receiving the whole payload (instead of `columns`).",
        check_optional_identifier,
    )
    idempotency_column: str = setting(
        "idempotency_key",
        "Column receiving the idempotency key of the last change applied; empty: not stored.",
        check_optional_identifier,
    )
    change_seq_column: str = setting(
        "change_seq",
        "bigint column receiving the change sequence; a row is only overwritten or deleted by a "
        "higher one, so a replayed older change never wins.",
        check_identifier,
    )
    pool_size: int = setting(
        2, "Most connections this sink opens (its runs are sequential).", between(1, 20)
    )
    connect_timeout_s: float = setting(10.0, "Seconds to establish a connection.", positive)
    statement_timeout_s: float = setting(
        30.0, "Seconds one statement (or COMMIT) may take before the run is ERRORED.", at_least(0.1)
    )

    def __post_init__(self) -> None:
        # build() checks keys one at a time; combinations (and direct construction) are checked here.
        checks: dict[str, Callable[[Any], str | None]] = {
            "table": check_table,
            "key_column": check_identifier,
            "change_seq_column": check_identifier,
            "payload_column": check_optional_identifier,
            "idempotency_column": check_optional_identifier,
            "columns": check_columns,
        }
        for name in ("database", "user"):
            if not getattr(self, name):
                raise settings_error(name, "must not be empty")
        for name, check in checks.items():
            if (reason := check(getattr(self, name))) is not None:
                raise settings_error(name, reason)
        if bool(self.columns) == bool(self.payload_column):
            raise settings_error("columns", "set exactly one of columns and payload_column")
        if self.password_env and self.password_file:
            raise settings_error("password_env", "set password_env or password_file, not both")
        used = [self.key_column, self.change_seq_column, *self.columns.values()]
        used += [c for c in (self.payload_column, self.idempotency_column) if c]
        if len(set(used)) != len(used):
            raise settings_error("columns", f"a column is used twice: {sorted(used)}")

    def plaintext(self) -> list[Plaintext]:
        """sslmode = "disable" to a host that is not this machine (see `sinks.plaintext`)."""
        remote = remote_hosts(self.host)
        if self.sslmode != "disable" or not remote:
            return []
        return [
            Plaintext(
                "sslmode",
                f'sslmode = "disable" to {", ".join(remote)}',
                'set sslmode = "verify-full" (the server needs a TLS certificate)',
            )
        ]


class _RunLost(Exception):
    """The run's transaction is gone (connection lost, COMMIT failed): every item is ERRORED."""

    def __init__(self, outcome: Outcome, *, before_begin: bool = False) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome
        self.before_begin = before_begin


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_RUN_ERRORS = (SecretError, asyncpg.PostgresError, *_CONNECTION_ERRORS)

# SQLSTATE classes whose errors are about the item: the same item fails again.
_REJECT_CLASSES = {"22", "23", "42", "44", "54", "P0"}
# SQLSTATEs saying the server as a whole is unusable now (the router waits, spending no retries):
# connection exception, bad credentials or database, lack of resources (too many connections,
# disk full), operator intervention (admin/crash shutdown, cannot connect now), a read-only standby.
_DOWN_CLASSES = {"08", "28", "3D", "53", "57", "58"}
_DOWN_STATES = {"25006"}
_ITEM_TRANSIENT_STATES = {"57014"}  # query_canceled (statement timeout): this item, not the server
_POPULATE = ("jsonb_populate_record", "jsonb_populate_recordset")
# At most this many characters of records per set-based statement (~10,000 beneficiary records): far
# from jsonb's 256 MB limit, and a statement stays short against statement_timeout_s.
_STRETCH_CHARS = 8 * 1024 * 1024


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _sqlstate(error: BaseException) -> str:
    return str(getattr(error, "sqlstate", "") or "")


def target_down(error: BaseException) -> bool:
    """True if `error` says the server (or the connection to it) is unusable, not the item."""
    if isinstance(error, asyncpg.PostgresError):
        state = _sqlstate(error)
        if state in _ITEM_TRANSIENT_STATES:
            return False
        return state[:2] in _DOWN_CLASSES or state in _DOWN_STATES
    return isinstance(error, (*_CONNECTION_ERRORS, SecretError))


def classify(error: BaseException, *, table: str = "", user: str = "") -> Outcome:
    """The Outcome for an error raised while writing one item (see the module docstring)."""
    if isinstance(error, asyncpg.PostgresError):
        state = _sqlstate(error)
        # the message only: the server's DETAIL may quote the whole failing row (a personal record)
        text = f"{state} {type(error).__name__}: {_short(str(getattr(error, 'message', error)))}"
        if state == "42501":
            return Outcome.rejected(
                f"permission denied: role {user!r} lacks a grant on {table!r} (it needs SELECT, "
                f"INSERT, UPDATE, DELETE: see config/postgres-least-privilege.sql): {text}"
            )
        if target_down(error):
            return Outcome.unavailable(text)
        if state[:2] in _REJECT_CLASSES and not isinstance(
            error, asyncpg.InvalidCachedStatementError
        ):
            return Outcome.rejected(text)
        return Outcome.errored(text)  # serialization failure, deadlock, lock timeout, unknown
    if isinstance(error, SecretError):
        return Outcome.unavailable(f"credentials: {error}")
    if isinstance(error, _CONNECTION_ERRORS):
        return Outcome.unavailable(f"connection: {type(error).__name__}: {_short(str(error))}")
    return Outcome.errored(f"{type(error).__name__}: {_short(str(error))}")


@register_sink(
    "postgres",
    PostgresSettings,
    "Upsert/delete rows of one PostgreSQL table, ordered by change_seq; one transaction per run.",
)
class PostgresSink:
    kind: ClassVar[str] = "postgres"

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        # every form of each password read (a rotated file adds the new one), for the router
        self.mask = SecretMask()
        s = settings
        table = quote_table(s.table)
        key, seq = quote_identifier(s.key_column), quote_identifier(s.change_seq_column)
        data_columns = list(s.columns.values()) or [s.payload_column]
        if s.idempotency_column:
            data_columns.append(s.idempotency_column)
        data = [quote_identifier(c) for c in data_columns] + [seq]
        self._columns = [key, *data]

        def upsert(rows: str) -> str:
            return (
                f"INSERT INTO {table} AS t ({', '.join(self._columns)}) "
                f"SELECT {', '.join('r.' + c for c in self._columns)} FROM {rows} AS r "
                f"ON CONFLICT ({key}) DO UPDATE SET "
                + ", ".join(f"{c} = EXCLUDED.{c}" for c in data)
                + f" WHERE t.{seq} < EXCLUDED.{seq}"
            )

        def delete(rows: str) -> str:
            return (
                f"DELETE FROM {table} AS t USING {rows} AS r "
                f"WHERE t.{key} = r.{key} AND t.{seq} < r.{seq}"
            )

        one, many = (f"{f}(NULL::{table}, $1::jsonb)" for f in _POPULATE)
        self.upsert_sql, self.delete_sql = upsert(one), delete(one)  # $1: one record
        self.upsert_set_sql, self.delete_set_sql = upsert(many), delete(many)  # $1: an array

    def __repr__(self) -> str:
        s = self.settings
        return f"PostgresSink({s.user}@{s.host}:{s.port}/{s.database} table={s.table})"

    def _fields(self, **extra: Any) -> dict[str, Any]:
        s = self.settings
        return {
            "sink": "postgres",
            "host": s.host,
            "port": s.port,
            "database": s.database,
            "table": s.table,
            **extra,
        }

    def _password(self) -> str | None:
        """Called by asyncpg at each new connection: a rotated password file is picked up."""
        s = self.settings
        secret = resolve_secret(f"postgres sink {s.table}", s.password_env, s.password_file)
        if secret is None:
            return None
        self.mask.add(secret, user=s.user)
        return secret.value

    async def open(self) -> None:
        """Check the credentials' source (SecretError if misconfigured) and create the pool. Does
        not connect: a server that is down at start only makes the first runs ERRORED."""
        self._password()
        await self._get_pool()

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._pool_lock:
            if self._pool is None:
                s = self.settings
                self._pool = asyncpg.create_pool(
                    host=s.host,
                    port=s.port,
                    user=s.user,
                    database=s.database,
                    password=self._password,
                    ssl=s.sslmode,
                    timeout=s.connect_timeout_s,
                    command_timeout=s.statement_timeout_s,
                    min_size=0,
                    max_size=s.pool_size,
                    max_inactive_connection_lifetime=300,
                    server_settings={"application_name": "fieldsync-sink"},
                )
                await self._pool  # min_size=0: creates no connection
            return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(10):
                    await pool.close()
            except _CONNECTION_ERRORS:  # includes TimeoutError
                pool.terminate()

    def _record(self, item: Outgoing) -> str:
        """The item as the jsonb parameter: {column: value}. TypeError if not JSON-encodable."""
        s = self.settings
        row: dict[str, Any] = {s.key_column: item.target_key, s.change_seq_column: item.change_seq}
        if item.op == "upsert":
            if s.payload_column:
                row[s.payload_column] = item.payload
            else:
                for field_name, column in s.columns.items():
                    row[column] = item.payload.get(field_name)
            if s.idempotency_column:
                row[s.idempotency_column] = item.idempotency_key
        return orjson.dumps(row).decode()

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        if not items:
            return []
        records: list[str | Outcome] = []
        for item in items:
            try:
                records.append(self._record(item))
            except (TypeError, ValueError) as e:
                records.append(Outcome.rejected(f"payload is not JSON-encodable: {_short(str(e))}"))
        for attempt in (1, 2):
            try:
                return await self._send_run(items, records)
            except _RunLost as lost:
                if lost.outcome.target_down and self._pool is not None:
                    await (
                        self._pool.expire_connections()
                    )  # idle ones are likely dead too: replace them
                # A pooled connection that died while idle fails at BEGIN: one more try with a
                # new connection before calling the run ERRORED.
                if lost.before_begin and attempt == 1:
                    continue
                event(
                    log,
                    logging.WARNING,
                    "postgres sink: run not delivered, will retry",
                    **self._fields(items=len(items), reason=lost.outcome.detail),
                )
                return [lost.outcome] + [NOT_ATTEMPTED] * (len(items) - 1)
        raise AssertionError("unreachable")

    async def _send_run(
        self, items: Sequence[Outgoing], records: Sequence[str | Outcome]
    ) -> list[Outcome]:
        """One transaction; raises _RunLost if it cannot begin or commit."""
        s = self.settings
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=s.connect_timeout_s + 1) as conn:
                transaction = conn.transaction()
                try:
                    await transaction.start()
                except _RUN_ERRORS as e:
                    raise _RunLost(self._run_failure(e), before_begin=target_down(e)) from e
                try:
                    outcomes = await self._write_run(conn, items, records)
                except BaseException:
                    await _rollback_quietly(transaction)
                    raise
                try:
                    await transaction.commit()
                except _RUN_ERRORS as e:
                    raise _RunLost(self._run_failure(e, "COMMIT: ", down=False)) from e
        except _RunLost:
            raise
        except _RUN_ERRORS as e:  # connecting, or SAVEPOINT/RELEASE on a broken connection
            raise _RunLost(self._run_failure(e)) from e
        return outcomes + [NOT_ATTEMPTED] * (len(items) - len(outcomes))

    def _classify(self, error: BaseException) -> Outcome:
        return classify(error, table=self.settings.table, user=self.settings.user)

    def _run_failure(self, error: BaseException, prefix: str = "", *, down: bool = True) -> Outcome:
        """The first item's Outcome when the run as a whole failed: always ERRORED, since no item
        is to blame. Failing to connect or to begin is the target's state (`down`: e.g. a role
        without CONNECT, 42501 at login); a failed COMMIT is transient unless classified down (a
        deferred constraint at COMMIT names no item either: retried, then dead-lettered)."""
        outcome = self._classify(error)
        detail = prefix + outcome.detail
        if down or outcome.target_down:
            return Outcome.unavailable(detail)
        return Outcome.errored(detail)

    async def _write_run(
        self, conn: asyncpg.Connection, items: Sequence[Outgoing], records: Sequence[str | Outcome]
    ) -> list[Outcome]:
        """The run's outcomes so far: set-based if the database takes it so, else item by item up
        to the first ERRORED item. Raises _RunLost if the transaction is lost."""
        writable = {i: record for i, record in enumerate(records) if isinstance(record, str)}
        if len(writable) > 1 and await self._write_set(conn, items, writable):
            return [r if isinstance(r, Outcome) else Outcome.delivered() for r in records]
        outcomes: list[Outcome] = []
        for item, record in zip(items, records, strict=True):
            outcome = (
                record if isinstance(record, Outcome) else await self._write(conn, item, record)
            )
            outcomes.append(outcome)
            if outcome.status is Delivery.ERRORED:
                break
        return outcomes

    async def _write_set(
        self,
        conn: asyncpg.Connection,
        items: Sequence[Outgoing],
        writable: dict[int, str],
    ) -> bool:
        """The fast path: the `writable` items (index -> record, in run order), stretch by stretch,
        in one savepoint. True if all are written; False if the database refused (rolled back:
        write them item by item). Raises _RunLost if the transaction is lost."""
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            for stretch in stretches(items, writable):
                sql = (
                    self.upsert_set_sql if items[stretch[0]].op == "upsert" else self.delete_set_sql
                )
                await conn.execute(sql, "[" + ",".join(writable[i] for i in stretch) + "]")
        except _RUN_ERRORS as e:
            outcome = await self._undo(savepoint, e)
            event(
                log,
                logging.INFO,
                "postgres sink: run refused as a set, writing it item by item",
                **self._fields(items=len(writable), reason=outcome.detail),
            )
            return False
        await savepoint.commit()
        return True

    async def _undo(self, savepoint: Any, error: BaseException) -> Outcome:
        """After a statement failed inside `savepoint`: the outcome it means, with the savepoint
        rolled back so the run's transaction goes on. Raises _RunLost when the target is down or
        the transaction itself is gone."""
        outcome = self._classify(error)
        if outcome.target_down:
            raise _RunLost(outcome) from error
        try:
            await savepoint.rollback()
        except _RUN_ERRORS as rollback_error:
            raise _RunLost(self._run_failure(rollback_error)) from error
        return outcome

    async def _write(self, conn: asyncpg.Connection, item: Outgoing, record: str) -> Outcome:
        """One item in its own savepoint. Raises _RunLost if the transaction is lost."""
        sql = self.upsert_sql if item.op == "upsert" else self.delete_sql
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            await conn.execute(sql, record)
        except _RUN_ERRORS as e:
            outcome = await self._undo(savepoint, e)
            event(
                log,
                logging.INFO,
                "postgres sink: item not delivered",
                **self._fields(
                    key=item.target_key,
                    change_seq=item.change_seq,
                    status=outcome.status.value,
                    reason=outcome.detail,
                ),
            )
            return outcome
        await savepoint.commit()
        return Outcome.delivered()


def stretches(
    items: Sequence[Outgoing], records: Mapping[int, str], max_chars: int = _STRETCH_CHARS
) -> list[list[int]]:
    """The indexes of `records` (into `items`, ascending) cut into the fast path's stretches, in
    run order: runs of consecutive items of one op in which no target key appears twice and whose
    records together stay under `max_chars` (unless one alone is bigger). One statement each."""
    cut: list[list[int]] = []
    keys: set[str] = set()
    size = 0
    for i, record in records.items():
        item = items[i]
        if (
            not cut
            or item.op != items[cut[-1][0]].op
            or item.target_key in keys
            or size + len(record) > max_chars
        ):
            cut.append([])
            keys.clear()
            size = 0
        cut[-1].append(i)
        keys.add(item.target_key)
        size += len(record) + 1
    return cut


async def _rollback_quietly(transaction: Any) -> None:
    try:
        await transaction.rollback()
    except Exception:  # the connection is already gone: the server rolls back by itself
        log.debug("postgres sink: rollback after a failed run failed", exc_info=True)
