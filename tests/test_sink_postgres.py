"""PostgreSQL sink against a real PostgreSQL server (tests/services.py), as the least-privilege role
of config/postgres-least-privilege.sql; plus `PostgresHarness` for the sink conformance suite."""

from __future__ import annotations

import dataclasses
import json
import logging
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

from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outcome, Outgoing, Sink
from hq_server.sinks.postgres import (
    PostgresSettings,
    PostgresSink,
    classify,
    quote_identifier,
    quote_table,
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
