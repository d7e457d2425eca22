"""HQ and the agents as real processes on 127.0.0.1, set up the way an operator does it.

`fieldsync-hq serve` (with a routes file: the router runs inside HQ, so killing HQ kills it too),
`fieldsync-hq token create`, `fieldsync-agent init`, `enroll` and `run`, each with its own config
file in the run's folder. An agent talks to HQ through its own TortureProxy (`[hq] url` points at
the proxy; enrolment goes to HQ directly). Each daemon's stdout and stderr go to a log file in the
run folder (`<name>.log`, appended across restarts), which is what to read after a failure.

Optional parts, each skipped with a printed note when this machine cannot provide it:
- an agent's data folder on its own tmpfs (root only): what the full-disk nemesis fills;
- libfaketime (Debian `faketime`): preloaded into an agent the clock-jump nemesis restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from torture_lib.proxy import TortureProxy

COLLECTION = "items"
KEY_FIELD = "id"
TMPFS_SIZE = "256m"
READY_TIMEOUT_S = 30.0
FILLER = "torture-filler"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run_cli(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout.strip()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Daemon:
    """One long-running process, restartable; output appended to `log`."""

    def __init__(self, name: str, log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start `argv` in a session of its own (a kill reaches anything it started)."""
        assert not self.alive, f"{self.name} is already running"
        extra = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        with self.log.open("ab") as out:
            out.write(
                f"\n==== {time.strftime('%H:%M:%S')} start: {extra} {' '.join(argv)}\n".encode()
            )
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        self.starts += 1

    def exited(self) -> str | None:
        """Why the process is gone when it should not be (None: running)."""
        if self.proc is not None and self.proc.returncode is not None:
            return f"{self.name} exited with status {self.proc.returncode}:\n{_tail(self.log)}"
        return None

    async def kill(self) -> None:
        """SIGKILL: no cleanup, no flush; what a power cut or the OOM killer does."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def terminate(self, timeout_s: float = 30) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout_s`); the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode


async def _wait_ready(
    daemon: Daemon, session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if (why := daemon.exited()) is not None:
            raise RuntimeError(why)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(2)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{daemon.name} not ready in {READY_TIMEOUT_S:.0f} s:\n{_tail(daemon.log)}")


class HQ:
    def __init__(self, root: Path, env: dict[str, str], webhook_url: str | None) -> None:
        self.root = root / "hq"
        self.data_dir = self.root / "data"
        self.sink_dir = self.root / "sink-files"
        self.port = free_port()
        self.config = self.root / "hq.toml"
        self.routes = self.root / "routes.toml"
        self.daemon = Daemon("hq", root / "hq.log", env)
        self.webhook_url = webhook_url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hq.db"

    def write_configs(self) -> None:
        self.sink_dir.mkdir(parents=True, exist_ok=True)
        routes = (
            "[routes.files]\n"
            'description = "torture: every change as JSON Lines"\n'
            f'sources = ["{COLLECTION}"]\n'
            "batch_size = 200\n\n"
            "[routes.files.sink]\n"
            'type = "files"\n'
            f'directory = "{self.sink_dir}"\n'
            'rotate = "never"\n'
        )
        if self.webhook_url:
            routes += (
                "\n[routes.hook]\n"
                'description = "torture: every change to a local webhook receiver"\n'
                f'sources = ["{COLLECTION}"]\n'
                "batch_size = 100\n\n"
                "[routes.hook.retry]\n"
                "initial_s = 0.2\nmax_s = 1.0\nattempts = 1000\n\n"
                "[routes.hook.sink]\n"
                'type = "webhook"\n'
                f'url = "{self.webhook_url}"\n'
                'secret_env = "TORTURE_WEBHOOK_SECRET"\n'
            )
        self.routes.write_text(routes)
        self.config.write_text(
            f'[hq]\ndata_dir = "{self.data_dir}"\nlisten = "127.0.0.1:{self.port}"\n'
            f'log_level = "warning"\nroutes_file = "{self.routes}"\n'
        )

    async def start(self, session: aiohttp.ClientSession) -> None:
        argv = [bin_path("fieldsync-hq"), "serve", "--config", str(self.config)]
        await self.daemon.spawn(argv)
        await _wait_ready(self.daemon, session, f"{self.url}/v1/health", {})

    def token(self, node_name: str) -> str:
        return run_cli(
            bin_path("fieldsync-hq"), "token", "create", "--config", str(self.config),
            "--node", node_name,
        )  # fmt: skip


class Agent:
    def __init__(self, root: Path, name: str, env: dict[str, str], proxy: TortureProxy) -> None:
        self.name = name
        self.root = root / name
        self.data_dir = self.root / "data"
        self.config = self.root / "agent.toml"
        self.api_port = free_port()
        self.proxy = proxy
        self.daemon = Daemon(name, root / f"{name}.log", env)
        self.tmpfs = False
        self.clock = ""  # faketime offset the agent runs under ("": the real clock)
        self.node_id = ""
        self.filled = False

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def headers(self) -> dict[str, str]:
        """The bearer token when the agent has one (`init` writes it; older agents have none)."""
        token_file = self.data_dir / "api-token"
        with contextlib.suppress(OSError):
            if token := token_file.read_text(encoding="utf-8").strip():
                return {"Authorization": f"Bearer {token}"}
        return {}

    def mount_tmpfs(self) -> str | None:
        """Put the data folder on a tmpfs of its own; None, or why not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "not root"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(self.data_dir)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            return done.stderr.strip() or f"mount exited {done.returncode}"
        self.tmpfs = True
        return None

    def unmount(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.data_dir)], capture_output=True, check=False)
            self.tmpfs = False

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'[agent]\ndata_dir = "{self.data_dir}"\nname = "torture-{self.name}"\n'
            f'listen = "127.0.0.1:{self.api_port}"\nlog_level = "warning"\n\n'
            f'[hq]\nurl = "{self.proxy.url}"\ntimeout_s = 5.0\n\n'
            "[sync]\nbackoff_initial_s = 0.2\nbackoff_max_s = 1.0\npull_interval_s = 1.0\n"
            "batch_max_changes = 250\n\n"
            f'[collections.{COLLECTION}]\nkey = "{KEY_FIELD}"\n'
        )

    def enroll(self, hq: HQ) -> None:
        cli = bin_path("fieldsync-agent")
        run_cli(cli, "init", "--config", str(self.config))
        run_cli(
            cli, "enroll", "--config", str(self.config), hq.url, hq.token(f"torture-{self.name}")
        )
        self.node_id = json.loads((self.data_dir / "hq.json").read_text())["node_id"]

    async def start(self, session: aiohttp.ClientSession, clock: str | None = None) -> None:
        """Start `run`, under `faketime -f CLOCK` when a clock offset is given (or kept)."""
        if clock is not None:
            self.clock = clock
        argv = [bin_path("fieldsync-agent"), "run", "--config", str(self.config)]
        # libfaketime preloaded into the agent itself (not the `faketime` wrapper, which forks:
        # SIGKILL must hit the process that holds the data folder).
        env = {"LD_PRELOAD": str(libfaketime()), "FAKETIME": self.clock} if self.clock else {}
        await self.daemon.spawn(argv, env)
        await _wait_ready(self.daemon, session, f"{self.api}/v1/status", self.headers())

    def fill_disk(self) -> int:
        """Fill the data folder's tmpfs to the last byte; the bytes taken."""
        path = self.data_dir / FILLER
        st = os.statvfs(self.data_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
            chunk = b"\0" * 4096
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):  # the last pages fallocate left
                    pass
            taken = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self.filled = True
        return taken

    def free_disk(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / FILLER).unlink()
        self.filled = False


def libfaketime() -> Path | None:
    """Debian's libfaketime (package faketime), multithread-safe variant: the agent has threads."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


def faketime_missing() -> str | None:
    if libfaketime() is None:
        return "libfaketime is not installed (Debian faketime; .ci/install-services installs it)"
    return None
