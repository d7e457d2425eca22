"""A fault-injecting TCP proxy on 127.0.0.1 for sink tests: put it between a sink and any TCP target.

Modes (switch at any time with `set_mode`)::

    pass       forward both ways (after `delay_ms`, if set)
    refuse     new connections are closed at once (FIN); existing ones keep working
    reset      every existing connection is reset now (RST on both sides: SO_LINGER 0 + abort),
               and every new one is reset as soon as it is accepted
    blackhole  connections are accepted but nothing is forwarded, and nothing is closed: the
               client waits until its own timeout (existing connections go silent too)

`delay_ms` delays every forwarded chunk, both ways. Bounded: at most `max_connections` at once
(more are reset), 64 KiB per read, and `stop` aborts everything and waits at most 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

Mode = Literal["pass", "refuse", "reset", "blackhole"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "reset", "blackhole")
_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET, as after a crash or a middlebox."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class FaultProxy:
    """`async with FaultProxy(host, port) as proxy:` then point the client at `proxy.port`."""

    def __init__(self, target_host: str, target_port: int, *, max_connections: int = 64) -> None:
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.delay_ms = 0
        self.accepted = 0  # connections accepted so far (any mode)
        self._mode: Mode = "pass"
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self._mode = mode
        if mode == "reset":
            for connection in list(self._connections):
                connection.reset()

    async def start(self) -> FaultProxy:
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

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(writer)
        self._connections.add(connection)
        self.accepted += 1
        try:
            await self._serve(connection, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            connection.reset()
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            for side in (connection.client, connection.upstream):
                if side is not None and not side.transport.is_closing():
                    side.transport.abort()

    async def _serve(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        mode = self._mode
        if len(self._connections) > self.max_connections or mode == "reset":
            connection.reset()
            return
        if mode == "refuse":
            writer.close()
            return
        if mode == "blackhole":
            await self._swallow(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            connection.reset()  # the target refused: so does the proxy, as a router would
            return
        connection.upstream = up_writer
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(_CHUNK):
            pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; in blackhole mode drop the data; pass EOF on (half close)."""
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            if self._mode == "blackhole":
                continue
            if self.delay_ms:
                await asyncio.sleep(self.delay_ms / 1000)
            if writer.transport.is_closing():
                return
            writer.write(data)
            await writer.drain()
        if not writer.transport.is_closing() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
