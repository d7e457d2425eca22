"""PostgreSQL sink against a real PostgreSQL server (tests/services.py), as the least-privilege role
of config/postgres-least-privilege.sql; plus `PostgresHarness` for the sink conformance suite."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from services import PostgresServer, postgres_server
from sink_harness import outgoing
from sink_harness_registry import register_harness
from sink_proxy import FaultProxy

from agent import fieldgen
from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outcome, Outgoing, Sink
from hq_server.sinks.postgres import (
    PostgresSettings,
    PostgresSink,
    classify,
    quote_identifier,
    quote_table,
    stretches,
)
from hq_server.sinks.secrets import SecretError
from protocol.config import ConfigError, build, documented_keys
from protocol.logfmt import JSONFormatter

PASSWORD_ENV = "FIELDSYNC_TEST_PG_PASSWORD"
COLUMNS = {"name": "name", "amount": "amount", "born": "born"}

pytestmark = pytest.mark.timeout(60)


# --- helpers ------------------------------------------------------------------------------------


def item(key: str, seq: int, payload: dict[str, Any] | None = None, op: str = "upsert") -> Outgoing:
    return Outgoing(
        idempotency_key=f"pg:{key}:{seq}",
        route="finance",
        collection="grants",
        source_key=key,
        target_key=key,
        op=op,  # type: ignore[arg-type]
        payload=payload if payload is not None else {"name": f"name {key} v{seq}", "amount": seq},
        change_seq=seq,
    )


def statuses(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.status.value for o in outcomes]


def settings_for(server: PostgresServer, table: str, **overrides: Any) -> PostgresSettings:
    values: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "database": server.database,
        "user": server.app_user,
        "table": table,
        "password_env": PASSWORD_ENV,
        "columns": dict(COLUMNS),
        "sslmode": "disable",
        "connect_timeout_s": 3.0,
        "statement_timeout_s": 5.0,
    }
    values.update(overrides)
    return PostgresSettings(**values)


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log line of every logger at DEBUG, formatted with its structured fields."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(JSONFormatter())
    loggers = [logging.getLogger(), logging.getLogger("fieldsync"), logging.getLogger("asyncpg")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


@pytest.fixture
def password_env(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PASSWORD_ENV, postgres_server.app_password)
    return postgres_server.app_password


@pytest.fixture
async def admin(postgres_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_server.superuser_dsn, ssl="disable")
    try:
        yield conn
    finally:
        await conn.close()


async def create_table(
    server: PostgresServer, admin: asyncpg.Connection, *, grant: bool = True, extra: str = ""
) -> str:
    table = f"t_{uuid.uuid4().hex[:10]}"
    await admin.execute(
        f"""CREATE TABLE public.{table} (
            key text PRIMARY KEY,
            name varchar(20) NOT NULL,
            amount integer CHECK (amount >= 0),
            born date,
            idempotency_key text,
            change_seq bigint NOT NULL{extra})"""
    )
    if grant:
        server.grant(table)
    return table


@pytest.fixture
async def table(postgres_server: PostgresServer, admin: asyncpg.Connection) -> str:
    return await create_table(postgres_server, admin)


@pytest.fixture
async def sink(
    postgres_server: PostgresServer,
    table: str,
    password_env: str,
) -> AsyncIterator[PostgresSink]:
    s = PostgresSink(settings_for(postgres_server, table))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def rows(admin: asyncpg.Connection, table: str) -> dict[str, dict[str, Any]]:
    records = await admin.fetch(f"SELECT * FROM public.{table} ORDER BY key")
    return {r["key"]: dict(r) for r in records}


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement sent with `Connection.execute` from now on (BEGIN, SAVEPOINT, the sink's
    writes, RELEASE, ROLLBACK TO, COMMIT), by any connection: clear it just before the send."""
    sent: list[str] = []
    original = asyncpg.connection.Connection.execute

    async def execute(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append(query)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", execute)
    return sent


def shape(sink: PostgresSink, sent: Sequence[str]) -> list[str]:
    """`sent` as short names: the sink's own statements by kind, the others by their first word
    (ROLLBACK TO: to a savepoint), without the reset the pool sends when a connection comes back."""
    names = {
        sink.upsert_set_sql: "upsert-set",
        sink.delete_set_sql: "delete-set",
        sink.upsert_sql: "upsert",
        sink.delete_sql: "delete",
    }
    short = []
    for query in sent:
        if "pg_advisory_unlock_all()" in query:
            continue
        words = query.rstrip(";").split()
        short.append(
            names.get(query)
            or " ".join(words[:2] if words[:2] == ["ROLLBACK", "TO"] else words[:1])
        )
    return short


def fast(*writes: str) -> list[str]:
    """The statements of a run written set-based: `writes` in one savepoint."""
    return ["BEGIN", "SAVEPOINT", *writes, "RELEASE", "COMMIT"]


FELL_BACK = "run refused as a set"


# --- settings and SQL, no server ------------------------------------------------------------------


def test_registered_like_any_sink_with_documented_settings() -> None:
    assert SINK_TYPES["postgres"].settings is PostgresSettings
    docs = documented_keys(PostgresSettings)
    assert set(docs) == {
        "database",
        "user",
        "table",
        "host",
        "port",
        "password_env",
        "password_file",
        "sslmode",
        "key_column",
        "columns",
        "payload_column",
        "idempotency_column",
        "change_seq_column",
        "pool_size",
        "connect_timeout_s",
        "statement_timeout_s",
    }
    assert all(text.strip() for text in docs.values())
    assert SINK_TYPES["postgres"].factory is PostgresSink


@pytest.mark.parametrize(
    "name", ["", "1abc", "a-b", 'a"b', "a;drop table x", "a b", "é", "x" * 64, "a.b"]
)
def test_identifier_validation_refuses_anything_but_plain_names(name: str) -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        quote_identifier(name)


def test_identifiers_are_always_quoted() -> None:
    assert quote_identifier("Key_1") == '"Key_1"'
    assert quote_table("finance.grants") == '"finance"."grants"'
    for bad in ("a.b.c", "a..b", ".a", 'a."b"'):
        with pytest.raises(ValueError, match=r"TABLE or SCHEMA\.TABLE"):
            quote_table(bad)


def test_stretches_cut_at_an_op_change_a_repeated_key_and_a_size() -> None:
    run = [
        item("a", 1),
        item("b", 2),
        item("c", 3, op="delete"),
        item("d", 4, op="delete"),
        item("c", 5),  # op changes
        item("e", 6),
        item("c", 7),  # c again
        item("f", 8),
        item("x", 9, op="delete"),
        item("x", 10, op="delete"),  # x again, even among deletes
    ]
    records = {i: "{}" for i in range(len(run))}
    assert stretches(run, records) == [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9]]
    # items left out (not JSON-encodable, REJECTED up front) take no part
    assert stretches(run, {i: "{}" for i in (0, 1, 4, 6, 7)}) == [[0, 1, 4], [6, 7]]
    assert stretches(run, {}) == []
    hot = [item("k", seq) for seq in range(1, 6)]
    assert stretches(hot, {i: "{}" for i in range(5)}) == [[0], [1], [2], [3], [4]]
    # a stretch holds at most max_chars of records (with a comma each), or one bigger record
    many = [item(f"k{n}", n) for n in range(6)]
    sized = {0: "x" * 4, 1: "x" * 5, 2: "x" * 20, 3: "x", 4: "x", 5: "x"}
    assert stretches(many, sized, max_chars=10) == [[0, 1], [2], [3, 4, 5]]
    assert stretches(many, sized, max_chars=9) == [[0], [1], [2], [3, 4, 5]]


def test_generated_sql_guards_on_change_seq() -> None:
    s = PostgresSink(
        PostgresSettings(database="d", user="u", table="fin.grants", columns={"full name": "nm"})
    )
    assert s.upsert_sql == (
        'INSERT INTO "fin"."grants" AS t ("key", "nm", "idempotency_key", "change_seq") '
        'SELECT r."key", r."nm", r."idempotency_key", r."change_seq" '
        'FROM jsonb_populate_record(NULL::"fin"."grants", $1::jsonb) AS r '
        'ON CONFLICT ("key") DO UPDATE SET "nm" = EXCLUDED."nm", '
        '"idempotency_key" = EXCLUDED."idempotency_key", "change_seq" = EXCLUDED."change_seq" '
        'WHERE t."change_seq" < EXCLUDED."change_seq"'
    )
    assert s.delete_sql.endswith('WHERE t."key" = r."key" AND t."change_seq" < r."change_seq"')
    # the set-based statements are the same but for the function that makes the rows
    assert s.upsert_set_sql == s.upsert_sql.replace(
        "jsonb_populate_record(", "jsonb_populate_recordset("
    )
    assert s.delete_set_sql == s.delete_sql.replace(
        "jsonb_populate_record(", "jsonb_populate_recordset("
    )
    assert s.upsert_set_sql != s.upsert_sql and s.delete_set_sql != s.delete_sql


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"database": "d", "user": "u", "columns": {"a": "a"}}, "x.table", "is required"),
        ({"table": "t;", "columns": {"a": "a"}}, "x.table", "TABLE or SCHEMA.TABLE"),
        ({"table": "t", "columns": {"a": "a-b"}}, "x.columns", "plain identifier"),
        ({"table": "t", "key_column": 'k"'}, "x.key_column", "plain identifier"),
        ({"table": "t", "columns": {"a": "a"}, "password": "pw"}, "x.password", "unknown setting"),
        ({"table": "t", "columns": {"a": "a"}, "port": 70000}, "x.port", "between"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], key: str, reason: str) -> None:
    data = {"database": "d", "user": "u", **table}
    with pytest.raises(ConfigError, match=reason) as e:
        build(PostgresSettings, data, "routes.toml", "x.")
    assert e.value.key == key


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"table": "t"}, "columns"),  # neither columns nor payload_column
        ({"table": "t", "columns": {"a": "a"}, "payload_column": "p"}, "columns"),
        ({"table": "t", "columns": {"a": "key"}}, "columns"),  # key column used twice
        (
            {"table": "t", "payload_column": "p", "password_env": "E", "password_file": "/f"},
            "password_env",
        ),
        ({"table": "t", "payload_column": "p", "database": ""}, "database"),
    ],
)
def test_cross_key_settings_errors(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(PostgresSettings, {"database": "d", "user": "u", **values}, "routes.toml", "x.")
    assert e.value.key == key


def test_classification_table() -> None:
    def pg_error(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
        return cls("message")

    exc = asyncpg.exceptions
    down = [exc.ConnectionFailureError, exc.TooManyConnectionsError, exc.AdminShutdownError]
    down += [exc.CannotConnectNowError, exc.InvalidPasswordError, exc.ReadOnlySQLTransactionError]
    for cls in down:
        o = classify(pg_error(cls))
        assert (o.status, o.target_down) == (Delivery.ERRORED, True), cls
    for cls in [exc.SerializationError, exc.DeadlockDetectedError, exc.QueryCanceledError]:
        o = classify(pg_error(cls))
        assert (o.status, o.target_down) == (Delivery.ERRORED, False), cls
    rejected = [exc.NotNullViolationError, exc.CheckViolationError, exc.ForeignKeyViolationError]
    rejected += [exc.InvalidTextRepresentationError, exc.UndefinedColumnError]
    rejected += [exc.StringDataRightTruncationError, exc.InsufficientPrivilegeError]
    for cls in rejected:
        assert classify(pg_error(cls)).status is Delivery.REJECTED, cls
    for err in (ConnectionRefusedError("refused"), TimeoutError(), asyncpg.InterfaceError("x")):
        o = classify(err)
        assert (o.status, o.target_down) == (Delivery.ERRORED, True)


# --- against the server ---------------------------------------------------------------------------


async def test_upsert_insert_update_delete(
    sink: PostgresSink, admin: asyncpg.Connection, table: str
) -> None:
    out = await sink.send([item("a", 1), item("b", 2), item("c", 3)])
    assert statuses(out) == ["delivered"] * 3
    got = await rows(admin, table)
    assert list(got) == ["a", "b", "c"]
    assert got["a"]["name"] == "name a v1" and got["a"]["amount"] == 1
    assert got["a"]["idempotency_key"] == "pg:a:1" and got["a"]["change_seq"] == 1

    out = await sink.send(
        [item("a", 4, {"name": "renamed", "amount": 40}), item("b", 5, op="delete")]
    )
    assert statuses(out) == ["delivered"] * 2
    got = await rows(admin, table)
    assert list(got) == ["a", "c"]
    assert (got["a"]["name"], got["a"]["amount"], got["a"]["change_seq"]) == ("renamed", 40, 4)
    assert got["a"]["idempotency_key"] == "pg:a:4"
    # a field missing from the payload is written as NULL: the row mirrors the record
    assert (await sink.send([item("c", 6, {"name": "no amount"})]))[0].status is Delivery.DELIVERED
    assert (await rows(admin, table))["c"]["amount"] is None


async def test_older_change_never_overwrites_newer(
    sink: PostgresSink, admin: asyncpg.Connection, table: str
) -> None:
    await sink.send([item("k", 5, {"name": "newest", "amount": 5})])
    # an older upsert, an older delete and a repeat of the newest: all DELIVERED ("had it"), no-ops
    out = await sink.send(
        [
            item("k", 3, {"name": "older", "amount": 3}),
            item("k", 4, op="delete"),
            item("k", 5, {"name": "newest", "amount": 5}),
        ]
    )
    assert statuses(out) == ["delivered"] * 3
    row = (await rows(admin, table))["k"]
    assert (row["name"], row["change_seq"], row["idempotency_key"]) == ("newest", 5, "pg:k:5")
    # a newer delete wins; replaying the whole history in order converges to the same state
    await sink.send([item("k", 6, op="delete")])
    history = [item("k", 5, {"name": "newest", "amount": 5}), item("k", 6, op="delete")]
    assert statuses(await sink.send(history)) == ["delivered"] * 2
    assert await rows(admin, table) == {}


async def test_one_bad_row_rejected_while_the_rest_commit(
    sink: PostgresSink, admin: asyncpg.Connection, table: str
) -> None:
    secret_name = "Zebulon Quartermain"
    run = [
        item("ok1", 1),
        item("nonull", 2, {"amount": 2}),  # name NOT NULL
        item("check", 3, {"name": secret_name, "amount": -1}),  # CHECK (amount >= 0)
        item("text", 4, {"name": "x", "amount": "many"}),  # invalid input syntax for integer
        item("long", 5, {"name": "x" * 21, "amount": 5}),  # varchar(20)
        item("date", 6, {"name": "x", "born": "2024-02-30"}),  # date out of range
        item("notjson", 7, {"name": "x", "amount": {1, 2}}),  # a set is not JSON
        item("ok2", 8, {"name": "typed", "amount": "42", "born": "2024-05-01"}),
    ]
    out = await sink.send(run)
    assert statuses(out) == ["delivered"] + ["rejected"] * 6 + ["delivered"]
    got = await rows(admin, table)
    assert list(got) == ["ok1", "ok2"]
    assert got["ok2"]["amount"] == 42 and str(got["ok2"]["born"]) == "2024-05-01"
    details = [o.detail for o in out[1:7]]
    assert "23502" in details[0] and "name" in details[0] and "not-null" in details[0]
    assert "23514" in details[1] and "check constraint" in details[1]
    assert "22P02" in details[2]
    assert "22001" in details[3]
    assert "22008" in details[4]
    assert "not JSON-encodable" in details[5]
    # the server's DETAIL ("Failing row contains (...)") would put the record in the log: never
    assert all(secret_name not in d and "Failing row" not in d for d in details)


async def test_payload_column_mode_stores_the_whole_record(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
) -> None:
    table = "fieldsync_records"  # created and granted by start_postgres
    settings = settings_for(
        postgres_server, table, columns={}, payload_column="payload", sslmode="disable"
    )
    sink = PostgresSink(settings)
    await sink.open()
    try:
        key = f"rec-{uuid.uuid4().hex[:8]}"
        payload = {"id": key, "nested": {"list": [1, 2.5, "x"], "none": None}, "ok": True}
        assert statuses(await sink.send([item(key, 1, payload)])) == ["delivered"]
        row = await admin.fetchrow(f"SELECT * FROM {table} WHERE key = $1", key)
        assert row is not None and json.loads(row["payload"]) == payload
        assert statuses(await sink.send([item(key, 2, op="delete")])) == ["delivered"]
        assert await admin.fetchval(f"SELECT count(*) FROM {table} WHERE key = $1", key) == 0
    finally:
        await sink.close()


async def test_least_privilege_role_and_missing_grants_are_rejected(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
) -> None:
    role = await admin.fetchrow(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = $1",
        postgres_server.app_user,
    )
    assert role is not None and not any(role.values())

    ungranted = await create_table(postgres_server, admin, grant=False)
    sink = PostgresSink(settings_for(postgres_server, ungranted))
    await sink.open()
    try:
        out = await sink.send([item("a", 1)])
        assert out[0].status is Delivery.REJECTED and not out[0].target_down
        assert "permission denied" in out[0].detail and "42501" in out[0].detail
        assert "postgres-least-privilege.sql" in out[0].detail
        assert postgres_server.app_user in out[0].detail and ungranted in out[0].detail

        # SELECT is needed too: ON CONFLICT ... WHERE t.change_seq < ... reads the existing row
        postgres_server.grant(ungranted)
        assert statuses(await sink.send([item("a", 1)])) == ["delivered"]
        await admin.execute(f"REVOKE SELECT ON public.{ungranted} FROM {postgres_server.app_user}")
        out = await sink.send([item("a", 2)])
        assert out[0].status is Delivery.REJECTED and "42501" in out[0].detail
        # and the role can do nothing else: no DDL in the schema
        conn = await asyncpg.connect(postgres_server.app_dsn, ssl="disable")
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE public.intruder (x int)")
        finally:
            await conn.close()
    finally:
        await sink.close()


async def test_undefined_column_and_table_are_rejected(
    postgres_server: PostgresServer,
    table: str,
    password_env: str,
) -> None:
    for settings, state in [
        (settings_for(postgres_server, table, columns={"name": "nmae"}), "42703"),
        (settings_for(postgres_server, "no_such_table"), "42P01"),
    ]:
        sink = PostgresSink(settings)
        await sink.open()
        try:
            out = await sink.send([item("a", 1), item("b", 2)])
            assert statuses(out) == ["rejected", "rejected"]
            assert state in out[0].detail
        finally:
            await sink.close()


async def test_password_sources_and_secrecy(
    postgres_server: PostgresServer,
    table: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = postgres_server.app_password
    secret_file = tmp_path / "pg.secret"
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    with captured_logs() as lines:
        # from a 0600 file
        sink = PostgresSink(
            settings_for(postgres_server, table, password_env=None, password_file=secret_file)
        )
        await sink.open()
        assert statuses(await sink.send([item("f", 1)])) == ["delivered"]
        texts = [repr(sink), repr(sink.settings), str(sink.settings)]
        await sink.close()

        # from the environment
        monkeypatch.setenv(PASSWORD_ENV, password)
        sink = PostgresSink(settings_for(postgres_server, table))
        await sink.open()
        assert statuses(await sink.send([item("e", 1)])) == ["delivered"]
        await sink.close()

        # a wrong password: the server is unusable for us, not the item; the route waits
        monkeypatch.setenv(PASSWORD_ENV, "wrong-" + password)
        sink = PostgresSink(settings_for(postgres_server, table))
        await sink.open()
        out = await sink.send([item("w", 1), item("w2", 2)])
        await sink.close()
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert "28P01" in out[0].detail and out[1] == NOT_ATTEMPTED
        texts += [o.detail for o in out]

        # a group/world-readable file is refused at open, with the fix in the message
        secret_file.chmod(0o644)
        sink = PostgresSink(
            settings_for(postgres_server, table, password_env=None, password_file=secret_file)
        )
        with pytest.raises(SecretError, match="chmod 600") as e:
            await sink.open()
        texts.append(str(e.value))
        await sink.close()
        # and if it becomes readable while running, the next connection is refused: ERRORED
        secret_file.chmod(0o600)
        sink = PostgresSink(
            settings_for(postgres_server, table, password_env=None, password_file=secret_file)
        )
        await sink.open()
        secret_file.chmod(0o640)
        out = await sink.send([item("r", 1)])
        await sink.close()
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert "credentials" in out[0].detail and "chmod 600" in out[0].detail
        texts.append(out[0].detail)
    assert lines, "expected some log lines"
    for text in texts + lines:
        assert password not in text


async def test_server_down_is_errored_then_recovers(
    postgres_server: PostgresServer,
    sink: PostgresSink,
    admin: asyncpg.Connection,
    table: str,
) -> None:
    assert statuses(await sink.send([item("before", 1)])) == ["delivered"]
    await admin.close()
    postgres_server.stop()
    try:
        out = await sink.send([item("down1", 2), item("down2", 3)])
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert out[1] == NOT_ATTEMPTED
    finally:
        postgres_server.start()
    # the same sink reconnects by itself (its pooled connection died with the server)
    out = await sink.send([item("down1", 2), item("down2", 3)])
    assert statuses(out) == ["delivered", "delivered"]
    conn = await asyncpg.connect(postgres_server.superuser_dsn, ssl="disable")
    try:
        assert list(await rows(conn, table)) == ["before", "down1", "down2"]
    finally:
        await conn.close()


async def test_connection_killed_mid_life_reconnects(
    sink: PostgresSink, admin: asyncpg.Connection, table: str
) -> None:
    assert statuses(await sink.send([item("a", 1)])) == ["delivered"]
    killed = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'fieldsync-sink' AND datname = current_database()"
    )
    assert killed >= 1
    assert statuses(await sink.send([item("b", 2)])) == ["delivered"]
    assert list(await rows(admin, table)) == ["a", "b"]


async def test_errored_item_stops_the_run_and_earlier_items_commit(
    postgres_server: PostgresServer,
    sink: PostgresSink,
    admin: asyncpg.Connection,
    table: str,
) -> None:
    """A lock timeout on one row (another transaction holds it) is ERRORED for that item only:
    the items before it commit, the ones after it are NOT_ATTEMPTED."""
    await sink.send([item("locked", 1)])
    await admin.execute(f"ALTER ROLE {postgres_server.app_user} SET lock_timeout = '200ms'")
    await sink.close()  # new connections pick up the role setting
    await sink.open()
    try:
        async with admin.transaction():
            await admin.execute(f"SELECT * FROM public.{table} WHERE key = 'locked' FOR UPDATE")
            out = await sink.send([item("first", 2), item("locked", 3), item("after", 4)])
    finally:
        await admin.execute(f"ALTER ROLE {postgres_server.app_user} RESET lock_timeout")
    assert out[0].status is Delivery.DELIVERED
    assert out[1].status is Delivery.ERRORED and not out[1].target_down
    assert "55P03" in out[1].detail
    assert out[2] == NOT_ATTEMPTED
    assert list(await rows(admin, table)) == ["first", "locked"]


async def test_failures_that_name_no_item_error_the_whole_run(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
) -> None:
    """A deferred foreign key fails at COMMIT: no item can be blamed, the whole run is ERRORED
    (retried, not dead-lettered at once) and nothing is committed. A role that may not connect
    to the database (42501 at login) makes the target unavailable, not the items rejected."""
    parents = f"p_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE TABLE public.{parents} (id text PRIMARY KEY)")
    await admin.execute(f"INSERT INTO public.{parents} VALUES ('p1')")
    table = await create_table(
        postgres_server,
        admin,
        extra=f", parent text REFERENCES public.{parents} (id) DEFERRABLE INITIALLY DEFERRED",
    )
    columns = {**COLUMNS, "parent": "parent"}
    sink = PostgresSink(settings_for(postgres_server, table, columns=columns))
    await sink.open()
    try:
        ok = item("ok", 1, {"name": "a", "parent": "p1"})
        orphan = item("orphan", 2, {"name": "b", "parent": "nobody"})
        out = await sink.send([ok, orphan])
        assert out[0].status is Delivery.ERRORED and not out[0].target_down
        assert out[0].detail.startswith("COMMIT: 23503") and out[1] == NOT_ATTEMPTED
        assert await rows(admin, table) == {}
        assert statuses(await sink.send([ok])) == ["delivered"]

        database, role = postgres_server.database, postgres_server.app_user
        await admin.execute(f"REVOKE CONNECT ON DATABASE {database} FROM PUBLIC, {role}")
        await sink.close()  # drop the pooled connection: the next one must log in again
        try:
            out = await sink.send([item("x", 3, {"name": "c"})])
        finally:
            await admin.execute(f"GRANT CONNECT ON DATABASE {database} TO PUBLIC, {role}")
        assert out[0].status is Delivery.ERRORED and out[0].target_down
        assert "42501" in out[0].detail
    finally:
        await sink.close()


# --- the set-based fast path ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["payload_column", "columns"])
async def test_a_run_of_500_new_records_is_one_statement(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
    statements: list[str],
    mode: str,
) -> None:
    """The benchmark's shape: 500 upserts of ~750-byte beneficiary records, one INSERT."""
    if mode == "payload_column":
        table = await create_table(postgres_server, admin, extra=", record jsonb")
        await admin.execute(f"ALTER TABLE public.{table} ALTER name DROP NOT NULL")
        settings = settings_for(postgres_server, table, columns={}, payload_column="record")
    else:
        table = await create_table(postgres_server, admin)
        settings = settings_for(postgres_server, table)
    sink = PostgresSink(settings)
    await sink.open()
    try:
        records = list(fieldgen.beneficiaries(500, seed=7))
        run = [
            item(r["beneficiary_id"], n, {**r, "name": f"b{n}", "amount": n})
            for n, r in enumerate(records, start=1)
        ]
        assert 600 < sum(len(json.dumps(i.payload)) for i in run) / len(run) < 1200
        statements.clear()
        assert statuses(await sink.send(run)) == ["delivered"] * 500
        assert shape(sink, statements) == fast("upsert-set")
    finally:
        await sink.close()
    got = await rows(admin, table)
    assert len(got) == 500
    first = got[run[0].target_key]
    assert (first["change_seq"], first["idempotency_key"]) == (1, run[0].idempotency_key)
    if mode == "payload_column":
        assert json.loads(first["record"]) == run[0].payload and first["name"] is None
    else:
        assert (first["name"], first["amount"], first["born"]) == ("b1", 1, None)


async def test_several_versions_of_a_key_in_one_run(
    sink: PostgresSink, admin: asyncpg.Connection, table: str, statements: list[str]
) -> None:
    """Each version is written in order (one stretch each): the newest wins, an older version
    after a newer one is a no-op, a repeat is a no-op; all DELIVERED, no fallback."""
    run = [
        item("a", 1),
        item("b", 2),
        item("a", 3),
        item("c", 4),
        item("a", 2),  # older than a@3, after it
        item("b", 2),  # a repeat
        item("a", 5),
        item("d", 6),
    ]
    with captured_logs() as lines:
        statements.clear()
        assert statuses(await sink.send(run)) == ["delivered"] * len(run)
    # stretches: [a1 b2] [a3 c4] [a2 b2] [a5 d6]
    assert shape(sink, statements) == fast(*["upsert-set"] * 4)
    assert not any(FELL_BACK in line for line in lines)
    got = await rows(admin, table)
    assert {k: (r["change_seq"], r["name"]) for k, r in got.items()} == {
        "a": (5, "name a v5"),
        "b": (2, "name b v2"),
        "c": (4, "name c v4"),
        "d": (6, "name d v6"),
    }


async def test_deletes_interleaved_with_upserts_of_a_key(
    sink: PostgresSink, admin: asyncpg.Connection, table: str, statements: list[str]
) -> None:
    await sink.send([item("gone", 1), item("back", 1), item("stays", 1)])
    run = [
        item("gone", 2),
        item("back", 2, op="delete"),
        item("new", 3),
        item("gone", 4, op="delete"),  # deleted at the end of the run
        item("back", 5),  # upserted again after its delete
        item("stays", 6, op="delete"),
        item("stays", 7),
        item("late", 9, op="delete"),  # deletes nothing: no row yet (no tombstone either) ...
        item("late", 8),  # ... so this older upsert creates it, as item by item would
    ]
    with captured_logs() as lines:
        statements.clear()
        assert statuses(await sink.send(run)) == ["delivered"] * len(run)
    assert shape(sink, statements) == fast(
        "upsert-set",  # gone@2
        "delete-set",  # back@2
        "upsert-set",  # new@3
        "delete-set",  # gone@4
        "upsert-set",  # back@5
        "delete-set",  # stays@6
        "upsert-set",  # stays@7
        "delete-set",  # late@9
        "upsert-set",  # late@8
    )
    assert not any(FELL_BACK in line for line in lines)
    got = await rows(admin, table)
    assert {k: r["change_seq"] for k, r in got.items()} == {
        "back": 5,
        "late": 8,
        "new": 3,
        "stays": 7,
    }


async def test_a_bad_row_mid_run_falls_back_to_item_by_item(
    sink: PostgresSink, admin: asyncpg.Connection, table: str, statements: list[str]
) -> None:
    """The set-based write fails in its second stretch: everything rolls back to the fast path's
    savepoint and the run is written item by item in the same transaction, so exactly the bad row
    is REJECTED and the rest (earlier stretches included) commit once, in order."""
    run = [item(f"k{n:02}", n) for n in range(1, 21)]
    run[10] = item("k01", 11)  # a second version of k01: a new stretch starts here
    run[14] = item("bad", 15, {"amount": 15})  # NOT NULL name, in the second stretch
    run[17] = item("k05", 18, op="delete")  # a delete after the bad row, in a later stretch
    with captured_logs() as lines:
        statements.clear()
        out = await sink.send(run)
    assert statuses(out) == ["delivered"] * 14 + ["rejected"] + ["delivered"] * 5
    assert "23502" in out[14].detail
    sent = shape(sink, statements)
    assert sent[:4] == ["BEGIN", "SAVEPOINT", "upsert-set", "upsert-set"]
    assert sent[4] == "ROLLBACK TO"
    per_item = sent[5:-1]
    assert per_item == [
        step
        for i in run
        for step in ("SAVEPOINT", i.op, "ROLLBACK TO" if i is run[14] else "RELEASE")
    ]
    assert sent[-1] == "COMMIT"
    assert any(FELL_BACK in line and "23502" in line for line in lines)
    got = await rows(admin, table)
    expected = {i.target_key for i in run if i is not run[14]} - {"k05"}
    assert set(got) == expected
    assert got["k01"]["change_seq"] == 11 and got["k01"]["idempotency_key"] == "pg:k01:11"


async def test_a_replayed_older_run_never_overwrites(
    sink: PostgresSink, admin: asyncpg.Connection, table: str, statements: list[str]
) -> None:
    """A run replayed after a newer one (or the newer one repeated) changes nothing, set-based."""
    keys = [f"r{n:03}" for n in range(100)]
    newer = [item(k, 1000 + n, {"name": f"new {n}", "amount": n}) for n, k in enumerate(keys)]
    older = [
        item(k, 1 + n, op="delete") if n % 3 == 0 else item(k, 1 + n, {"name": "old", "amount": 0})
        for n, k in enumerate(keys)
    ]
    assert statuses(await sink.send(newer)) == ["delivered"] * 100
    before = await rows(admin, table)
    for replay in (older, newer, older[::2] + newer[1::2]):
        with captured_logs() as lines:
            statements.clear()
            assert statuses(await sink.send(replay)) == ["delivered"] * len(replay)
        sent = shape(sink, statements)
        assert sent[:2] == ["BEGIN", "SAVEPOINT"] and sent[-2:] == ["RELEASE", "COMMIT"]
        assert set(sent[2:-2]) <= {"upsert-set", "delete-set"}, sent
        assert not any(FELL_BACK in line for line in lines)
        assert await rows(admin, table) == before


async def test_set_based_and_item_by_item_end_in_the_same_state(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
    statements: list[str],
) -> None:
    """Random histories over a few keys (versions out of order, repeats, deletes between upserts,
    rows already there): one run set-based leaves the table exactly as the same items sent one by
    one (each a run of one: the savepoint-per-item path)."""
    fast_table = await create_table(postgres_server, admin)
    slow_table = await create_table(postgres_server, admin)
    fast_sink = PostgresSink(settings_for(postgres_server, fast_table))
    slow_sink = PostgresSink(settings_for(postgres_server, slow_table))
    await fast_sink.open()
    await slow_sink.open()
    try:
        for seed in range(12):
            rng = random.Random(seed)
            keys = [f"k{n}" for n in range(rng.randint(1, 6))]
            for t in (fast_table, slow_table):
                await admin.execute(f"TRUNCATE public.{t}")
            for key in keys:
                if rng.random() < 0.5:
                    seq = rng.randint(1, 30)
                    for t in (fast_table, slow_table):
                        await admin.execute(
                            f"INSERT INTO public.{t} (key, name, change_seq) "
                            "VALUES ($1, 'pre', $2)",
                            key,
                            seq,
                        )
            run = [
                item(k, seq, op="delete" if rng.random() < 0.3 else "upsert")
                for k, seq in ((rng.choice(keys), rng.randint(1, 30)) for _ in range(40))
            ]
            statements.clear()
            assert statuses(await fast_sink.send(run)) == ["delivered"] * len(run)
            assert "ROLLBACK TO" not in shape(fast_sink, statements), seed
            for one in run:
                assert statuses(await slow_sink.send([one])) == ["delivered"]
            assert await rows(admin, fast_table) == await rows(admin, slow_table), seed
    finally:
        await fast_sink.close()
        await slow_sink.close()


async def test_keys_equal_only_as_the_column_type(
    postgres_server: PostgresServer,
    admin: asyncpg.Connection,
    password_env: str,
    statements: list[str],
) -> None:
    """Keys "7" and "07" differ to the sink but are one integer: an upsert stretch holding both
    fails (21000) and falls back; an upsert and a delete of them are in different stretches."""
    table = f"t_{uuid.uuid4().hex[:10]}"
    await admin.execute(
        f"CREATE TABLE public.{table} (key integer PRIMARY KEY, name text, amount integer, "
        "born date, idempotency_key text, change_seq bigint NOT NULL)"
    )
    postgres_server.grant(table)
    sink = PostgresSink(settings_for(postgres_server, table))
    await sink.open()
    try:
        with captured_logs() as lines:
            statements.clear()
            out = await sink.send([item("7", 1), item("07", 2), item("8", 3)])
        assert statuses(out) == ["delivered"] * 3
        assert "ROLLBACK TO" in shape(sink, statements)
        assert any(FELL_BACK in line and "21000" in line for line in lines)
        got = await admin.fetch(f"SELECT key, change_seq FROM public.{table} ORDER BY key")
        assert [tuple(r) for r in got] == [(7, 2), (8, 3)]

        statements.clear()
        out = await sink.send([item("007", 4, op="delete"), item("7", 5), item("0008", 6)])
        assert statuses(out) == ["delivered"] * 3
        assert shape(sink, statements) == fast("delete-set", "upsert-set")
        got = await admin.fetch(f"SELECT key, change_seq FROM public.{table} ORDER BY key")
        assert [tuple(r) for r in got] == [(7, 5), (8, 6)]
    finally:
        await sink.close()


async def test_a_not_json_item_is_rejected_without_leaving_the_fast_path(
    sink: PostgresSink, admin: asyncpg.Connection, table: str, statements: list[str]
) -> None:
    run = [item("a", 1), item("set", 2, {"name": "x", "amount": {1, 2}}), item("b", 3)]
    statements.clear()
    out = await sink.send(run)
    assert statuses(out) == ["delivered", "rejected", "delivered"]
    assert "not JSON-encodable" in out[1].detail
    assert shape(sink, statements) == fast("upsert-set")
    assert list(await rows(admin, table)) == ["a", "b"]
    # a run with one item to write takes the item-by-item path: no statement to save
    statements.clear()
    assert statuses(await sink.send([item("c", 4)])) == ["delivered"]
    assert shape(sink, statements) == ["BEGIN", "SAVEPOINT", "upsert", "RELEASE", "COMMIT"]


async def test_connection_lost_during_the_set_based_write_loses_the_whole_run(
    sink: PostgresSink, admin: asyncpg.Connection, table: str
) -> None:
    """A trigger kills the sink's own backend in the middle of the set-based INSERT: the target
    is down for the run (ERRORED, target_down, the rest NOT_ATTEMPTED), no fallback, nothing
    written."""
    await admin.execute(
        f"""CREATE FUNCTION public.{table}_kill() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'kill' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
            RETURN NEW;
        END $$"""
    )
    await admin.execute(
        f"CREATE TRIGGER kill BEFORE INSERT ON public.{table} "
        f"FOR EACH ROW EXECUTE FUNCTION public.{table}_kill()"
    )
    run = [item("a", 1), item("b", 2, {"name": "kill"}), item("c", 3)]
    with captured_logs() as lines:
        out = await sink.send(run)
    assert out[0].status is Delivery.ERRORED and out[0].target_down, out[0]
    assert out[1:] == [NOT_ATTEMPTED] * 2
    assert not any(FELL_BACK in line for line in lines)
    assert await rows(admin, table) == {}
    await admin.execute(f"DROP TRIGGER kill ON public.{table}")
    assert statuses(await sink.send(run)) == ["delivered"] * 3  # reconnects by itself
    assert list(await rows(admin, table)) == ["a", "b", "c"]


# --- conformance harness --------------------------------------------------------------------------


class PostgresHarness:
    """The postgres sink, through a FaultProxy, on a fresh table `key text PRIMARY KEY, payload
    jsonb, idempotency_key, change_seq` (payload_column mode, so payloads round-trip exactly), as
    the least-privilege role with its password in a 0600 file.

    received()/current(): the table's rows, read straight from the server (not through the proxy).
    rejected_item: a negative `amount` breaks the table's CHECK constraint (23514).
    set_available: the proxy resets every connection and refuses new ones, or passes again."""

    name = "postgres"

    def __init__(self, server: PostgresServer, proxy: FaultProxy, secret_dir: Path) -> None:
        self.server = server
        self.proxy = proxy
        self.secret_dir = secret_dir
        self.table = f"conformance_{uuid.uuid4().hex[:10]}"
        self.secrets = [server.app_password]
        self._sinks: list[PostgresSink] = []

    async def setup(self) -> PostgresHarness:
        await self._admin_execute(
            f"""CREATE TABLE public.{self.table} (
                key text PRIMARY KEY,
                payload jsonb NOT NULL
                    CONSTRAINT amount_not_negative CHECK ((payload->>'amount')::numeric >= 0),
                idempotency_key text,
                change_seq bigint NOT NULL)"""
        )
        self.server.grant(self.table)
        secret = self.secret_dir / "pg-harness.secret"
        secret.write_text(self.server.app_password)
        secret.chmod(0o600)
        self.settings = PostgresSettings(
            host="127.0.0.1",
            port=self.proxy.port,
            database=self.server.database,
            user=self.server.app_user,
            table=self.table,
            password_file=secret,
            payload_column="payload",
            sslmode="disable",
            connect_timeout_s=3.0,
            statement_timeout_s=5.0,
        )
        return self

    async def _admin_execute(self, sql: str) -> None:
        conn = await asyncpg.connect(self.server.superuser_dsn, ssl="disable")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def make_sink(self) -> Sink:
        sink = PostgresSink(self.settings)
        await sink.open()
        self._sinks.append(sink)
        return sink

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        conn = await asyncpg.connect(self.server.superuser_dsn, ssl="disable")
        try:
            records = await conn.fetch(
                f"SELECT key, payload FROM public.{self.table} ORDER BY change_seq, key"
            )
        finally:
            await conn.close()
        return [(r["key"], json.loads(r["payload"])) for r in records]

    async def current(self) -> dict[str, dict[str, Any]]:
        return dict(await self.received())

    async def set_available(self, available: bool) -> None:
        self.proxy.set_mode("pass" if available else "reset")

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        return dataclasses.replace(base, payload={**base.payload, "amount": -1})

    async def cleanup(self) -> None:
        for sink in self._sinks:
            await sink.close()
        self.proxy.set_mode("pass")
        await self._admin_execute(f"DROP TABLE IF EXISTS public.{self.table}")


@register_harness("postgres", uses=(postgres_server,))
@pytest.fixture
async def postgres_harness(
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> AsyncIterator[PostgresHarness]:
    """A PostgresHarness on a fresh table of the session's server, behind its own proxy."""
    postgres_server.start()  # in case an earlier test left it stopped
    proxy = await FaultProxy(postgres_server.host, postgres_server.port).start()
    try:
        harness = await PostgresHarness(postgres_server, proxy, tmp_path).setup()
        try:
            yield harness
        finally:
            await harness.cleanup()
    finally:
        await proxy.stop()


async def test_harness_self_check(postgres_harness: PostgresHarness) -> None:
    """The harness does what the conformance suite expects of it (a smoke test of its own)."""
    harness = postgres_harness
    sink = await harness.make_sink()
    first, second = outgoing(1), outgoing(2)
    bad = harness.rejected_item(outgoing(3))
    assert bad is not None
    out = await sink.send([first, bad, second])
    assert statuses(out) == ["delivered", "rejected", "delivered"]
    assert "23514" in out[1].detail and "amount_not_negative" in out[1].detail
    assert await harness.current() == {
        first.target_key: first.payload,
        second.target_key: second.payload,
    }
    assert [k for k, _ in await harness.received()] == [first.target_key, second.target_key]
    await harness.set_available(False)
    out = await sink.send([outgoing(4), outgoing(5)])
    assert out[0].status is Delivery.ERRORED and out[0].target_down and out[1] == NOT_ATTEMPTED
    assert len(await harness.received()) == 2  # readable while the sink is cut off
    await harness.set_available(True)
    assert statuses(await sink.send([outgoing(4)])) == ["delivered"]


@pytest.mark.parametrize("mode", ["prefer", "require", "allow"])
def test_tls_modes_that_skip_certificate_checks_are_refused(mode: str) -> None:
    """TLS here always verifies: modes that encrypt without checking who answers are refused."""
    with pytest.raises(ConfigError, match="sslmode"):
        build(
            PostgresSettings,
            {"database": "d", "user": "u", "table": "t", "payload_column": "p", "sslmode": mode},
            "routes.toml",
        )
