"""An asyncio TCP fault proxy on 127.0.0.1, put between one agent and HQ.

tests/sink_proxy.py has pass/refuse/reset/blackhole for sinks; the torture suite also needs
truncation and a rate cap, and its modes must apply to connections already open (a fault that
starts mid-batch is the interesting one), so it has its own. Modes (`set_mode`, any time):

    pass       forward both ways
    reset      every open connection is reset now (RST both sides: SO_LINGER 0 + abort), and
               every new one as soon as it is accepted
    truncate   each connection forwards `truncate_after` more bytes in `truncate_dir` ("up": agent
               to HQ, the batch; "down": HQ to agent, the ack), then is reset
    blackhole  nothing is forwarded and nothing is closed: the agent waits for its own timeout
               (a connection that went silent stays silent after the fault is healed)
    delay      every chunk waits `delay_ms` before it is forwarded
    rate       each direction of each connection is capped at `rate_bps` bytes per second

Bounded: at most 64 connections at once (more are reset), reads of at most 16 KiB, and `stop`
aborts everything and waits at most 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "reset", "truncate", "blackhole", "delay", "rate"]
MODES: tuple[Mode, ...] = ("pass", "reset", "truncate", "blackhole", "delay", "rate")
_CHUNK = 16 * 1024
_MAX_CONNECTIONS = 64


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET, as after a crash or a middlebox."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    budget: dict[str, int] = field(default_factory=dict)  # truncate: bytes left per direction
    blackholed: bool = False

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


@dataclass
class ProxyStats:
    accepted: int = 0
    resets: int = 0
    truncated: int = 0


class TortureProxy:
    """`await TortureProxy(hq_port).start()`, then point the agent at `proxy.url`."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.truncate_after = 0
        self.truncate_dir = "down"
        self.delay_ms = 0
        self.rate_bps = 0
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(
        self,
        mode: Mode,
        *,
        truncate_after: int = 0,
        truncate_dir: str = "down",
        delay_ms: int = 0,
        rate_bps: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.mode = mode
        self.truncate_after, self.truncate_dir = truncate_after, truncate_dir
        self.delay_ms, self.rate_bps = delay_ms, rate_bps
        for connection in list(self._connections):
            if mode == "reset":
                self.stats.resets += 1
                connection.reset()
            elif mode == "truncate":
                connection.budget = {truncate_dir: truncate_after}

    async def start(self) -> TortureProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.reset()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(writer)
        self._connections.add(connection)
        self.stats.accepted += 1
        try:
            await self._serve(connection, reader)
        except (OSError, asyncio.IncompleteReadError):
            connection.reset()
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            connection.reset()

    async def _serve(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        if len(self._connections) > _MAX_CONNECTIONS or self.mode == "reset":
            self.stats.resets += 1
            connection.reset()
            return
        if self.mode == "truncate":
            connection.budget = {self.truncate_dir: self.truncate_after}
        if self.mode == "blackhole":
            while await reader.read(_CHUNK):
                pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            connection.reset()  # HQ is down: refuse as a router in front of it would
            return
        connection.upstream = up_writer
        await asyncio.gather(
            self._pump(connection, "up", reader, up_writer),
            self._pump(connection, "down", up_reader, connection.client),
            return_exceptions=True,
        )

    async def _pump(
        self,
        connection: _Connection,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Copy one direction, applying the mode as it is at each chunk; pass EOF on."""
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            if self.mode == "blackhole" or connection.blackholed:
                # Swallowed: this connection stays silent until the peer gives up, also after
                # the fault is healed (a half-dead TCP connection never comes back).
                connection.blackholed = True
                continue
            if self.mode == "delay" and self.delay_ms:
                await asyncio.sleep(self.delay_ms / 1000)
            left = connection.budget.get(direction)
            if left is not None and self.mode == "truncate":
                if len(data) >= left:
                    if left and not writer.transport.is_closing():
                        writer.write(data[:left])
                        with contextlib.suppress(OSError):
                            await writer.drain()
                    self.stats.truncated += 1
                    connection.reset()
                    return
                connection.budget[direction] = left - len(data)
            if writer.transport.is_closing():
                return
            await self._write(writer, data)
        if not writer.transport.is_closing() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.mode != "rate" or self.rate_bps <= 0:
            writer.write(data)
            await writer.drain()
            return
        step = max(256, self.rate_bps // 20)  # ~20 slices a second
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            await asyncio.sleep(len(piece) / self.rate_bps)
            if writer.transport.is_closing():
                return
            writer.write(piece)
            await writer.drain()
