"""Real PostgreSQL and RabbitMQ servers for tests, started in temp folders on free 127.0.0.1 ports.

Not a conftest: a test module that needs a server imports its session fixture, and pytest shares it:

    from services import postgres_server  # noqa: F401  (a pytest fixture)

    async def test_x(postgres_server: PostgresServer) -> None: ...

Each server starts once per test session however many modules import its fixture (a reference
count in this module: pytest makes one fixture definition per importing module) and stops at the end
of the session, also when tests fail. Missing server binaries FAIL the fixture with a pointer to
`.ci/install-services`: CI must run these tests, never skip them quietly.

PostgreSQL runs as the `postgres` user when the tests run as root (initdb refuses root), in a folder
that user owns under the system temp folder (short enough for the unix socket path). Host
connections need a password (scram-sha-256); the superuser and the least-privilege sink role
(`config/postgres-least-privilege.sql`) get random ones. RabbitMQ runs as the current user with its
whole environment (home, Erlang cookie, node name, ports, logs, data) in its temp folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAST_PRIVILEGE_SQL = ROOT / "config" / "postgres-least-privilege.sql"
INSTALL_HINT = "run `.ci/install-services` (as root) to install PostgreSQL and RabbitMQ"
HOST = "127.0.0.1"


class ServiceUnavailable(RuntimeError):
    """A server could not be started; the message says why and what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries if it lost a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _run(
    cmd: list[str],
    *,
    what: str,
    env: dict[str, str] | None = None,
    as_user: str | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {}
    if as_user is not None:
        kwargs.update(user=as_user, group=as_user, extra_groups=[])
    try:
        done = subprocess.run(
            cmd,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as e:
        raise ServiceUnavailable(f"{what}: timed out after {timeout} s: {' '.join(cmd)}") from e
    if check and done.returncode != 0:
        raise ServiceUnavailable(
            f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        )
    return done


# --- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin folder (Debian layout)."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise ServiceUnavailable(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            + INSTALL_HINT
        )
    return found[-1]


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster: database `database`, superuser `postgres`, and the sink's
    least-privilege role `app_user` with SELECT/INSERT/UPDATE/DELETE on the tables granted to it."""

    base: Path
    bin_dir: Path
    port: int
    superuser_password: str
    app_password: str
    host: str = HOST
    superuser: str = "postgres"
    database: str = "fieldsync_test"
    app_user: str = "fieldsync_sink"
    _as_user: str | None = None
    _running: bool = False

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def superuser_dsn(self) -> str:
        return self.dsn(self.superuser, self.superuser_password)

    @property
    def app_dsn(self) -> str:
        return self.dsn(self.app_user, self.app_password)

    def dsn(self, user: str, password: str, database: str | None = None) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database or self.database}"

    @property
    def running(self) -> bool:
        return self._running

    def __repr__(self) -> str:  # no passwords in test output
        return f"PostgresServer({self.host}:{self.port}, base={self.base})"

    def _pg_ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return _run(
            cmd, what="pg_ctl " + args[-1], as_user=self._as_user, cwd=self.base, timeout=timeout
        )

    def start(self) -> None:
        """Start (or start again after `stop`) on the same port; returns once it accepts connections."""
        if self._running:
            return
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses={self.host} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._pg_ctl("-l", str(self.base / "server.log"), "-w", "-t", "30", "-o", options, "start")
        self._running = True

    def stop(self) -> None:
        """Stop fast (open connections get admin_shutdown); the data stays for a later `start`."""
        if not self._running:
            return
        self._pg_ctl("-m", "fast", "-w", "stop")
        self._running = False

    def psql(self, *args: str, database: str | None = None) -> str:
        """Run psql as the superuser over TCP (password from the environment, never argv)."""
        env = {**_clean_env(), "PGPASSWORD": self.superuser_password, "PGCONNECT_TIMEOUT": "10"}
        cmd = [
            str(self.bin_dir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-d",
            database or self.database,
            *args,
        ]
        return _run(cmd, what="psql", env=env).stdout

    def grant(self, table: str, schema: str = "public") -> None:
        """Give the sink role access to one more table, with config/postgres-least-privilege.sql."""
        self.psql(
            *("-v", f"role={self.app_user}", "-v", f"schema={schema}", "-v", f"table={table}"),
            *("-f", str(LEAST_PRIVILEGE_SQL)),
        )

    def destroy(self) -> None:
        with contextlib.suppress(ServiceUnavailable):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    return env


def start_postgres(tmpdir: Path | str | None = None) -> PostgresServer:
    """initdb + start a PostgreSQL cluster, create the test database and the least-privilege role.

    The cluster lives in a fresh folder under `tmpdir` if the server's user can reach it, else under
    the system temp folder (pytest's temp folders are private to root). ~1.5 s.
    """
    bin_dir = postgres_bin_dir()
    as_user: str | None = None
    if os.geteuid() == 0:
        as_user = "postgres"
        try:
            import pwd

            pw = pwd.getpwnam(as_user)
        except KeyError as e:
            raise ServiceUnavailable(
                f"no `postgres` user to run the server as: {INSTALL_HINT}"
            ) from e
    parent = Path(tmpdir) if tmpdir is not None and as_user is None else None
    base = Path(tempfile.mkdtemp(prefix="fieldsync-pg-", dir=parent))
    if as_user is not None:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    server = PostgresServer(
        base=base,
        bin_dir=bin_dir,
        port=0,
        superuser_password=secrets.token_urlsafe(16),
        app_password=secrets.token_urlsafe(16),
        _as_user=as_user,
    )
    try:
        pwfile = base / "superuser.pw"
        pwfile.write_text(server.superuser_password + "\n")
        pwfile.chmod(0o600)
        if as_user is not None:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        _run(
            [
                str(bin_dir / "initdb"),
                *("-D", str(server.data_dir), "-U", server.superuser, "--pwfile", str(pwfile)),
                *("--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"),
                "--no-sync",
            ],
            what="initdb",
            as_user=as_user,
            cwd=base,
            env=_clean_env(),
        )
        pwfile.unlink()
        for attempt in range(3):  # a free port can be taken between free_port() and bind
            server.port = free_port()
            try:
                server.start()
                break
            except ServiceUnavailable:
                if attempt == 2:
                    log = (base / "server.log").read_text(errors="replace")[-2000:]
                    raise ServiceUnavailable(
                        f"PostgreSQL did not start; server.log:\n{log}"
                    ) from None
        server.psql("-c", f"CREATE DATABASE {server.database}", database="postgres")
        server.psql(
            "-c",
            "CREATE TABLE public.fieldsync_records (key text PRIMARY KEY, payload jsonb, "
            "idempotency_key text, change_seq bigint NOT NULL)",
        )
        server.grant("fieldsync_records")
        server.psql("-c", f"ALTER ROLE {server.app_user} PASSWORD '{server.app_password}'")
    except BaseException:
        server.destroy()
        raise
    return server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- RabbitMQ -----------------------------------------------------------------------------------

RABBIT_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


@dataclass
class RabbitServer:
    """A running RabbitMQ node: user `user`/`password` with all permissions on vhost "/"."""

    base: Path
    port: int
    dist_port: int
    epmd_port: int
    password: str
    host: str = HOST
    user: str = "fieldsync"
    vhost: str = "/"
    nodename: str = ""
    _env: dict[str, str] = field(default_factory=dict)
    _running: bool = False

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / "rabbit.pid"

    @property
    def running(self) -> bool:
        return self._running

    def __repr__(self) -> str:
        return f"RabbitServer({self.host}:{self.port}, node={self.nodename}, base={self.base})"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node (~1 s each: it boots an Erlang VM)."""
        cmd = [str(RABBITMQCTL), "-n", self.nodename, *args]
        return _run(cmd, what="rabbitmqctl " + args[0], env=self._env, timeout=timeout).stdout

    def close_all_connections(self) -> None:
        """Close every client connection: the broker sends connection.close 320 CONNECTION_FORCED
        to each (asynchronously: a client may notice a moment after this returns)."""
        self.ctl("close_all_connections", "fieldsync test: connection killed")

    def stop_app(self) -> None:
        """Stop the broker but keep its Erlang node: AMQP connections are refused until start_app."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60")

    def start(self) -> None:
        if self._running:
            return
        _run(
            [str(RABBIT_SERVER), "-detached"],
            what="rabbitmq-server -detached",
            env=self._env,
            cwd=self.base,
        )
        self._running = True
        self.ctl("wait", "--timeout", "60", str(self.pid_file), timeout=90)

    def stop(self) -> None:
        """Stop the node (SIGTERM: a graceful shutdown, ~2 s; SIGKILL after 30 s) and its epmd."""
        if not self._running:
            return
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        except (OSError, ValueError):
            pass  # no pid file or no such process: nothing left to stop
        finally:
            self._running = False
            subprocess.run(
                ["epmd", "-port", str(self.epmd_port), "-kill"],
                env=self._env,
                capture_output=True,
                check=False,
                timeout=10,
            )

    def destroy(self) -> None:
        with contextlib.suppress(ServiceUnavailable, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_rabbitmq(tmpdir: Path | str | None = None) -> RabbitServer:
    """Start a RabbitMQ node in a fresh folder under `tmpdir` (or the system temp folder). ~5-8 s."""
    if not (RABBIT_SERVER.exists() and RABBITMQCTL.exists() and shutil.which("epmd")):
        raise ServiceUnavailable(f"RabbitMQ not found ({RABBIT_SERVER}, epmd): {INSTALL_HINT}")
    base = Path(tempfile.mkdtemp(prefix="fieldsync-rmq-", dir=tmpdir))
    node_port, dist_port, epmd_port = _free_ports(3)
    server = RabbitServer(
        base=base,
        port=node_port,
        dist_port=dist_port,
        epmd_port=epmd_port,
        password=secrets.token_urlsafe(16),
        nodename=f"fieldsync-test-{node_port}@localhost",
    )
    conf = base / "rabbitmq.conf"
    conf.write_text(
        "\n".join(
            [
                "loopback_users = none",
                f"default_user = {server.user}",
                f"default_pass = {server.password}",
                "default_vhost = /",
                "default_permissions.configure = .*",
                "default_permissions.read = .*",
                "default_permissions.write = .*",
                "log.console = false",
                "log.file.level = info",
                "disk_free_limit.absolute = 10MB",
                "",
            ]
        )
    )
    conf.chmod(0o600)
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq-env.conf").write_text("")
    server._env = {
        **_clean_env(),
        "HOME": str(base),
        "RABBITMQ_NODENAME": server.nodename,
        "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_NODE_PORT": str(node_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": HOST,
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(server.pid_file),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
    }
    try:
        server.start()
    except BaseException:
        logs = sorted((base / "log").glob("*.log")) if (base / "log").exists() else []
        tail = logs[0].read_text(errors="replace")[-2000:] if logs else "(no log)"
        server.destroy()
        raise ServiceUnavailable(f"RabbitMQ did not start; log:\n{tail}") from None
    return server


# --- session fixtures, shared by every module that imports them ----------------------------------

T = TypeVar("T")
_lock = threading.Lock()
_shared: dict[str, tuple[Any, int]] = {}


@contextlib.contextmanager
def _shared_server(name: str, start: Callable[[], T], destroy: Callable[[T], None]) -> Iterator[T]:
    with _lock:
        if name in _shared:
            server, refs = _shared[name]
            _shared[name] = (server, refs + 1)
        else:
            server = start()
            _shared[name] = (server, 1)
    try:
        yield server
    finally:
        with _lock:
            server, refs = _shared.pop(name)
            if refs > 1:
                _shared[name] = (server, refs - 1)
            else:
                destroy(server)


def _start_or_fail(start: Callable[[], T]) -> T:
    try:
        return start()
    except ServiceUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (see `PostgresServer`). A test that stops it must
    start it again (`try: server.stop() ... finally: server.start()`)."""
    with _shared_server(
        "postgres", lambda: _start_or_fail(start_postgres), PostgresServer.destroy
    ) as server:
        server.start()  # in case a test left it stopped
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitServer]:
    """A RabbitMQ node for the whole session (see `RabbitServer`)."""
    with _shared_server(
        "rabbitmq", lambda: _start_or_fail(start_rabbitmq), RabbitServer.destroy
    ) as server:
        yield server
