"""Files sink: append records to JSON Lines or CSV files that appear in their final name only whole.

Layout, in `directory`::

    <prefix>-<YYYYmmddTHHMMSS>-<seq>.<jsonl|csv>.part   the file being written (at most one)
    <prefix>-<YYYYmmddTHHMMSS>-<seq>.<jsonl|csv>        finished files: never written again
    .<prefix>.<jsonl|csv>.lock                          held while a sink writes this prefix

The timestamp is when the file was started (UTC); `seq` grows by one per file and never repeats in
the directory, so sorting names by seq gives the write order even if the clock jumps.

Guarantees, for consumers:

- **A finished file is never partial.** Records are appended to the .part file and fsynced before
  `send` reports them DELIVERED; rotation fsyncs the file, renames it to its final name and fsyncs
  the directory. A consumer that reads only names without `.part` never sees half a file or half a
  record, and a file never changes once it has its final name.
- **At least once, deduplicate by idempotency_key.** Every line (JSONL) or row (CSV) carries the
  item's idempotency_key, identical for every repeat of the item. Within one process the sink
  skips an item it has already written (the last 100,000 keys), and after a crash it reads the
  keys of the .part it finishes. A repeat can still appear twice -- e.g. a crash after a file was
  finished but before the router recorded the delivery -- so consumers must deduplicate on
  idempotency_key (keep the first; later copies are identical).
- **Crash recovery.** When a sink starts (or resumes after an I/O error) it finishes any .part
  left behind: a torn last record (written, never acknowledged) is cut off, and the rest is renamed
  to its final name; a .part without records is deleted.

Time rotation is checked when items arrive and at `close`: a file whose hour or day has passed is
finished by the next `send` or by `close`, not by a timer, so an idle route keeps its last .part
until then. Size rotation finishes a file as soon as it reaches `max_bytes` (so a file can exceed
it by one record).

JSON Lines: one object per line, the webhook body's shape::

    {"idempotency_key": ..., "route": ..., "collection": ..., "key": target_key, "op": ...,
     "record": {...}, "change_seq": ...}

CSV (RFC 4180, UTF-8, CRLF, a header row in every file): the columns `idempotency_key, route,
collection, op, key, change_seq`, then the configured `columns` from the record. Text values are
written as they are, null as an empty cell, everything else (numbers, booleans, objects, lists) as
JSON text. Record fields not in `columns` are not written.

Spreadsheet formula injection (OWASP "CSV Injection"): a spreadsheet opening the file runs a cell
that starts with `=`, `+`, `-` or `@` as a formula (`=HYPERLINK(...)`, `=cmd|...`), and records come
from field offices, so by default a text cell (the key included) that starts with one of those, a
tab, a carriage return, a line feed or NUL -- or with one of the four after leading whitespace --
is written with a single quote in front (`'=1+1`), which spreadsheets show as the text itself.
Numbers, booleans, objects and lists (JSON text) are never changed: they cannot start a formula.
Separators and quotes inside cells are quoted by RFC 4180, so no cell can start in mid-value.
`csv_escape_formulas = false` writes text exactly as it is, for consumers that are programs only.

Delivery outcomes: an I/O error (disk full, permission denied, directory missing, another process
holding the lock) is ERRORED as "target down" (`Outcome.unavailable`: it is never the record's
fault, so it spends no retry budget) with the reason, and whatever part of the run was not yet
fsynced is cut off again, so nothing is half delivered; a record that cannot be encoded (NaN, a
non-JSON value) is REJECTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import errno
import fcntl
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

from hq_server.logs import event
from hq_server.sinks.base import NOT_ATTEMPTED, Outcome, Outgoing, register_sink
from protocol.config import ConfigError, at_least, setting
from protocol.files import fsync_directory

log = logging.getLogger("fieldsync.sinks.files")

MIB = 1024 * 1024
METADATA_COLUMNS = ("idempotency_key", "route", "collection", "op", "key", "change_seq")
PART_SUFFIX = ".part"
RECENT_KEYS = 100_000  # idempotency keys remembered to skip in-process repeats
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "not found (directory not created, moved or not mounted?)",
    errno.EIO: "I/O error",
    errno.EBUSY: "busy",
}


def _prefix(value: Any) -> str | None:
    ok = _PREFIX.match(str(value))
    return None if ok else "must be 1-100 letters, digits, '.', '_' or '-', not starting with '.'"


def _file_mode(value: Any) -> str | None:
    if not 0 <= value <= 0o777:
        return "must be a permission mode such as 0o640"
    return None if value & 0o600 == 0o600 else "must let the owner read and write (0o600)"


@dataclass(frozen=True)
class FilesSettings:
    directory: Path = dataclasses.field(
        metadata={
            "doc": "Folder the files are written to (required). It must exist: it is not "
            "created, so an unmounted disk is reported instead of filled in its place.",
            "check": None,
        }
    )
    format: Literal["jsonl", "csv"] = setting(
        "jsonl",
        '"jsonl" (one JSON object per line, every field kept) or "csv" (the columns listed in '
        "columns, with a header row in every file).",
    )
    prefix: str = setting(
        "fieldsync",
        "Start of every file name: <prefix>-<YYYYmmddTHHMMSS>-<seq>.<format>. Give each route "
        "writing to the same folder its own prefix.",
        _prefix,
    )
    max_bytes: int = setting(
        64 * MIB,
        "Finish a file once it holds this many bytes (it may exceed it by one record); 0: no "
        "size limit.",
        at_least(0),
    )
    rotate: Literal["hourly", "daily", "never"] = setting(
        "daily",
        'Also finish a file when its UTC hour ("hourly") or day ("daily") has passed, at the '
        'next send or at shutdown; "never": only by size and at shutdown.',
    )
    columns: list[str] = setting(
        [],
        "CSV only, required there: record fields to write, in order, after the fixed columns "
        "idempotency_key, route, collection, op, key, change_seq. Nested values are written as "
        "JSON text.",
    )
    file_mode: int = setting(
        0o640, "Permissions of the files written, e.g. 0o600 or 0o640.", _file_mode
    )
    csv_escape_formulas: bool = setting(
        True,
        "CSV only: write a text cell that a spreadsheet would run as a formula (starting with "
        "=, +, -, @, tab, CR, LF or NUL, or =, +, -, @ after leading spaces) with a single quote in "
        "front, per OWASP's CSV-injection guidance. false: text exactly as it is (for consumers "
        "that are programs only).",
    )

    def __post_init__(self) -> None:
        # build() checks keys one at a time; combinations can only be checked here.
        def invalid(key: str, reason: str) -> ConfigError:
            return ConfigError("<sink settings>", key, reason)

        if self.format == "jsonl":
            if self.columns:
                raise invalid("columns", 'only applies to format = "csv" (jsonl keeps every field)')
            return
        if not self.columns:
            raise invalid("columns", 'is required with format = "csv"')
        if any(not isinstance(c, str) or not c for c in self.columns):
            raise invalid("columns", "must be non-empty field names")
        if len(set(self.columns)) != len(self.columns):
            raise invalid("columns", "lists a field twice")
        if clash := sorted(set(self.columns) & set(METADATA_COLUMNS)):
            raise invalid(
                "columns",
                f"{', '.join(clash)} clash with the fixed columns; rename them in the mapping",
            )


def describe_os_error(error: OSError) -> str:
    """A one-line reason for an Outcome: what failed, where, and what it usually means."""
    name = errno.errorcode.get(error.errno or 0, "")
    reason = error.strerror or str(error)
    hint = _HINTS.get(error.errno or 0)
    where = f" {error.filename}" if error.filename else ""
    text = f"cannot write{where}: {reason}"
    if name:
        text += f" ({name})"
    if hint and error.errno and reason == os.strerror(error.errno):  # not one of our own texts
        text += f": {hint}"
    return text


def _json_text(value: Any) -> str:
    """Compact JSON that stays on one line for every line splitter.

    json.dumps escapes control characters, but leaves U+0085, U+2028 and U+2029 raw -- which
    Python's str.splitlines() and some JSON Lines readers treat as line breaks. They can only occur
    inside JSON strings, where their escaped form means the same.
    """
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def jsonl_line(item: Outgoing) -> bytes:
    """One JSON Lines record for `item` (ValueError/TypeError if the record is not JSON)."""
    document = {
        "idempotency_key": item.idempotency_key,
        "route": item.route,
        "collection": item.collection,
        "key": item.target_key,
        "op": item.op,
        "record": item.payload,
        "change_seq": item.change_seq,
    }
    return (_json_text(document) + "\n").encode("utf-8")


FORMULA_TRIGGERS = ("=", "+", "-", "@")
_FORMULA_FIRST = (*FORMULA_TRIGGERS, "\t", "\r", "\n", "\0")


def escape_formula(text: str) -> str:
    """`text` with a leading single quote if a spreadsheet would treat it as a formula (OWASP
    CSV Injection): it starts with =, +, -, @, tab, CR, LF or NUL, or with =, +, -, @ after
    leading whitespace."""
    if text.startswith(_FORMULA_FIRST) or text.lstrip().startswith(FORMULA_TRIGGERS):
        return "'" + text
    return text


def _csv_cell(value: Any, escape: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return escape_formula(value) if escape else value
    return _json_text(value)  # numbers, booleans, objects, lists: never a formula


def _csv_record(cells: Iterable[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue().encode("utf-8")


def csv_row(item: Outgoing, columns: Sequence[str], *, escape_formulas: bool = True) -> bytes:
    """One CSV record for `item` (ValueError/TypeError if a value is not JSON); text that a
    spreadsheet would run as a formula is escaped unless `escape_formulas` is false."""
    fixed = [
        item.idempotency_key,
        item.route,
        item.collection,
        item.op,
        _csv_cell(item.target_key, escape_formulas),  # keys come from the field too
        str(item.change_seq),
    ]
    cells = (_csv_cell(item.payload.get(c), escape_formulas) for c in columns)
    return _csv_record([*fixed, *cells])


@dataclass
class _Part:
    """The .part file being written: its descriptor and what of it is known durable."""

    path: Path
    fd: int
    identity: tuple[int, int]  # (st_dev, st_ino): detects the file being moved or deleted
    bucket: tuple[int, ...] | None  # the UTC hour/day it belongs to (time rotation)
    size: int = 0  # bytes written (a CSV header included)
    records: int = 0  # records written (a CSV header not included)
    synced: int = 0  # bytes known to be on disk (fsynced)


def _identity(fd_or_path: int | Path) -> tuple[int, int]:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino


class _Writer:
    """All blocking file work, run in a worker thread; one mutex serialises it.

    The mutex matters when a `send` is cancelled: its thread still runs to the end (a thread
    cannot be interrupted), and the next `send` must wait for it rather than interleave writes.
    """

    def __init__(self, settings: FilesSettings) -> None:
        self.settings = settings
        self.directory = Path(settings.directory)
        self.ext = settings.format
        self.lock_path = self.directory / f".{settings.prefix}.{self.ext}.lock"
        self.names = re.compile(
            rf"^{re.escape(settings.prefix)}-(\d{{8}}T\d{{6}})-(\d+)\.{self.ext}"
            rf"({re.escape(PART_SUFFIX)})?$"
        )
        self.mutex = threading.Lock()
        self.lock_fd: int | None = None
        self.part: _Part | None = None
        self.next_seq = 1
        self.recent: dict[str, None] = {}  # insertion-ordered: the oldest key is evicted first

    # -- the send path

    def write(self, items: Sequence[Outgoing], now: float) -> list[Outcome]:
        with self.mutex:
            outcomes: list[Outcome | None] = [None] * len(items)
            pending: list[int] = []  # written (or already present) but not yet fsynced
            pending_keys: set[str] = set()
            index = 0
            try:
                self._ready(now)
                for index, item in enumerate(items):
                    key = item.idempotency_key
                    if key in self.recent or key in pending_keys:
                        pending.append(index)  # already written: delivered with the others
                        continue
                    try:
                        data = self._encode(item)
                    except (TypeError, ValueError) as e:
                        outcomes[index] = Outcome.rejected(f"record cannot be encoded: {e}")
                        continue
                    part = self.part or self._start(now)
                    self._append(part, data)
                    part.records += 1
                    pending.append(index)
                    pending_keys.add(key)
                    if self.settings.max_bytes and part.size >= self.settings.max_bytes:
                        self._finish()
                        self._commit(items, pending, outcomes)
                        pending_keys.clear()
                if pending:
                    if self.part is not None:
                        self._sync(self.part)
                    self._commit(items, pending, outcomes)
            except OSError as e:
                self._abandon()
                first = pending[0] if pending else index
                failure = Outcome.unavailable(describe_os_error(e))
                outcomes[first:] = [failure] + [NOT_ATTEMPTED] * (len(items) - first - 1)
                event(
                    log,
                    logging.WARNING,
                    "files delivery errored",
                    directory=str(self.directory),
                    prefix=self.settings.prefix,
                    idempotency_key=items[first].idempotency_key,
                    detail=failure.detail,
                )
            return [o if o is not None else NOT_ATTEMPTED for o in outcomes]

    def _encode(self, item: Outgoing) -> bytes:
        if self.ext == "jsonl":
            return jsonl_line(item)
        return csv_row(
            item, self.settings.columns, escape_formulas=self.settings.csv_escape_formulas
        )

    def _commit(
        self, items: Sequence[Outgoing], pending: list[int], outcomes: list[Outcome | None]
    ) -> None:
        """The pending items are durable: mark them DELIVERED and remember their keys."""
        for i in pending:
            outcomes[i] = Outcome.delivered()
            self.recent[items[i].idempotency_key] = None
        while len(self.recent) > RECENT_KEYS:
            del self.recent[next(iter(self.recent))]
        pending.clear()

    def _bucket(self, when: float) -> tuple[int, ...] | None:
        t = time.gmtime(when)
        if self.settings.rotate == "hourly":
            return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour)
        if self.settings.rotate == "daily":
            return (t.tm_year, t.tm_mon, t.tm_mday)
        return None

    def _ready(self, now: float) -> None:
        """Hold the lock, have recovered leftovers, and have a current (or no) .part file."""
        if self.lock_fd is not None and _identity(self.lock_fd) != self._path_identity(
            self.lock_path
        ):
            raise FileNotFoundError(
                errno.ENOENT, "the directory was moved, deleted or replaced", str(self.directory)
            )
        part = self.part
        if part is not None:
            if self._path_identity(part.path) != part.identity:
                raise FileNotFoundError(
                    errno.ENOENT, "the file being written was moved or deleted", str(part.path)
                )
            if self._bucket(now) != part.bucket:
                self._finish()
        if self.lock_fd is None:
            self._acquire()

    @staticmethod
    def _path_identity(path: Path) -> tuple[int, int] | None:
        try:
            return _identity(path)
        except FileNotFoundError:
            return None

    def _acquire(self) -> None:
        if not self.directory.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                "directory does not exist (not created or not mounted?)",
                str(self.directory),
            )
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise OSError(
                errno.EBUSY,
                f"another files sink is writing {self.settings.prefix}-*.{self.ext} here",
                str(self.directory),
            ) from e
        except OSError:
            os.close(fd)
            raise
        self.lock_fd = fd
        try:
            self._recover()
        except BaseException:
            self._release()  # a later send retries the recovery from the start
            raise

    def _start(self, now: float) -> _Part:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        path = self.directory / f"{self.settings.prefix}-{stamp}-{seq:06d}.{self.ext}{PART_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, self.settings.file_mode)
        part = _Part(path, fd, _identity(fd), self._bucket(now))
        self.part = part
        os.fchmod(fd, self.settings.file_mode)  # the umask may have narrowed it
        if self.ext == "csv":
            self._append(part, _csv_record([*METADATA_COLUMNS, *self.settings.columns]))
        self._sync(part)
        fsync_directory(self.directory)  # the new name must survive a crash with its records
        return part

    @staticmethod
    def _append(part: _Part, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(part.fd, view)
            part.size += written
            view = view[written:]

    @staticmethod
    def _sync(part: _Part) -> None:
        os.fsync(part.fd)
        part.synced = part.size

    def _finish(self) -> None:
        """fsync the .part, give it its final name (or delete it if empty), fsync the folder."""
        part = self.part
        assert part is not None
        self._sync(part)
        records = part.records
        final = part.path.with_name(part.path.name.removesuffix(PART_SUFFIX))
        if records > 0:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "refusing to overwrite", str(final))
            os.rename(part.path, final)
        else:
            os.unlink(part.path)
        self.part = None
        os.close(part.fd)
        fsync_directory(self.directory)
        if records > 0:
            event(
                log,
                logging.INFO,
                "file finished",
                path=str(final),
                records=records,
                bytes=part.size,
            )

    def _abandon(self) -> None:
        """After an I/O error: cut what was not fsynced, let go of the file and the lock.

        The next send starts over (lock, recovery of this .part, new .part): after a failed
        fsync the kernel may have dropped the unwritten pages, so the old descriptor is not
        trusted again.
        """
        part, self.part = self.part, None
        if part is not None:
            # If the cut fails, recovery still cuts a torn tail; a whole unsynced record may stay
            # and show up again with the retry (a repeat, which consumers deduplicate).
            with contextlib.suppress(OSError):
                os.ftruncate(part.fd, part.synced)
            with contextlib.suppress(OSError):
                os.close(part.fd)
        self._release()

    def _release(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    # -- recovery

    def _recover(self) -> None:
        """Finish .part files left by a crash or an I/O error; find the next free seq."""
        leftovers: list[tuple[int, Path]] = []
        highest = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = self.names.match(entry.name)
                if match:
                    seq = int(match.group(2))
                    highest = max(highest, seq)
                    if match.group(3):
                        leftovers.append((seq, self.directory / entry.name))
        self.next_seq = max(self.next_seq, highest + 1)
        for _, path in sorted(leftovers):
            self._finish_leftover(path)

    def _finish_leftover(self, path: Path) -> None:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            good, keys = self._scan_jsonl(f) if self.ext == "jsonl" else self._scan_csv(f)
            if good < size:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        for key in keys:
            self.recent[key] = None
        while len(self.recent) > RECENT_KEYS:
            del self.recent[next(iter(self.recent))]
        final = path.with_name(path.name.removesuffix(PART_SUFFIX))
        if keys:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "a finished file has this name", str(final))
            os.rename(path, final)
        else:
            os.unlink(path)
        fsync_directory(self.directory)
        event(
            log,
            logging.WARNING,
            "finished a file left by an earlier run",
            path=str(final if keys else path),
            records=len(keys),
            cut_bytes=size - good,
        )

    @staticmethod
    def _scan_jsonl(f: IO[bytes]) -> tuple[int, list[str]]:
        """(bytes up to the end of the last complete line, idempotency keys of complete lines)."""
        good, keys = 0, []
        for line in f:
            if not line.endswith(b"\n"):
                break
            good += len(line)
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict) and isinstance(document.get("idempotency_key"), str):
                keys.append(document["idempotency_key"])
        return good, keys

    @staticmethod
    def _scan_csv(f: IO[bytes]) -> tuple[int, list[str]]:
        """Like `_scan_jsonl` for CSV: a record ends at a line break outside quotes.

        With the csv module's quoting (fields with quotes, commas or line breaks are quoted,
        quotes doubled), counting quote characters tells whether a line break is inside a field.
        """
        good, keys, record, in_quotes, header = 0, [], b"", False, True
        for line in f:
            record += line
            in_quotes ^= line.count(b'"') % 2 == 1
            if in_quotes or not line.endswith(b"\n"):
                continue
            good += len(record)
            if header:
                header = False
            else:
                rows = list(csv.reader(io.StringIO(record.decode("utf-8", errors="replace"))))
                if rows and rows[0]:
                    keys.append(rows[0][0])
            record = b""
        return good, keys

    # -- shutdown

    def prepare(self) -> None:
        with self.mutex:
            if self.lock_fd is None:
                self._acquire()

    def close(self) -> None:
        with self.mutex:
            try:
                if self.part is not None:
                    self._finish()
            except OSError as e:
                event(
                    log,
                    logging.ERROR,
                    "cannot finish the current file; the next start will",
                    directory=str(self.directory),
                    detail=describe_os_error(e),
                )
                self._abandon()
            finally:
                self._release()


@register_sink("files", FilesSettings, "Append records to JSON Lines or CSV files, rotated")
class FilesSink:
    """Writes each run to the current .part file, fsyncs once per send, rotates by size and time.

    `clock` (Unix seconds) is injectable so tests can cross an hour without waiting.
    """

    kind: ClassVar[str] = "files"

    def __init__(self, settings: FilesSettings, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self._clock = clock
        self._writer = _Writer(settings)
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        s = self.settings
        return f"FilesSink(directory={str(s.directory)!r}, prefix={s.prefix!r}, format={s.format})"

    async def open(self) -> None:
        """Take the lock and finish leftovers now; if the folder is not there yet, `send` will
        report it per run (and retry), which shows in the route's state."""
        async with self._lock:
            try:
                await asyncio.to_thread(self._writer.prepare)
            except OSError as e:
                event(
                    log,
                    logging.WARNING,
                    "files sink not ready yet",
                    directory=str(self.settings.directory),
                    detail=describe_os_error(e),
                )

    async def send(self, items: Sequence[Outgoing]) -> list[Outcome]:
        if not items:
            return []
        now = self._clock()
        async with self._lock:
            return await asyncio.to_thread(self._writer.write, items, now)

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._writer.close)
