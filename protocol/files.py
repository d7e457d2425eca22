"""Files the agent and HQ keep: atomic writes, private modes.

Atomic writes: a reader or a crash sees the old file or the whole new one, never half. Temp file in
the same folder (created with its final mode), fsync, rename over the target -- or link, when the
target must not be replaced -- then fsync the folder so the rename itself survives a power cut.

Private modes: data folders are 0700 and what is in them 0600 (records, keys, tokens). Both CLIs
set `PRIVATE_UMASK` when they start, so whatever a process creates (SQLite's -wal and -shm too) is
private without each call site remembering; `make_private_dir` and `tighten` repair folders and
files made before that (an upgrade); `check_private_file` refuses a secret others could have read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_directory(directory: Path) -> None:
    """Persist a rename in `directory`; best effort where a folder cannot be opened."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_write(
    path: Path | str, *, mode: int = 0o644, exclusive: bool = False, text: bool = False
) -> Iterator[IO[Any]]:
    """Yield a file to write; on a clean exit it replaces `path` durably and atomically.

    `exclusive`: refuse (FileExistsError) if `path` exists, atomically -- link() fails on an existing
    name, so two processes writing at once cannot both win. On an exception nothing is replaced.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        options: dict[str, Any] = {"encoding": "utf-8", "newline": "\n"} if text else {}
        with os.fdopen(fd, "w" if text else "wb", **options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(tmp_name, target)
            except FileExistsError as e:
                raise FileExistsError(f"{target}: already exists; refusing to overwrite it") from e
        else:
            os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    fsync_directory(target.parent)


PRIVATE_UMASK = 0o077
_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def set_private_umask() -> int:
    """Make every file and folder this process creates private (0600 / 0700); returns the old
    umask. Called once at CLI start: the umask is process-wide, not per thread."""
    return os.umask(PRIVATE_UMASK)


class InsecureFile(PermissionError):
    """A secret (a private key, a token) can be read by group or others; the message names the
    file, its mode and the `chmod` that fixes it."""


def check_private_file(path: Path, what: str = "private key") -> None:
    """Refuse a secret file that group or others can read or write: it may have leaked, and an
    operator should know, not have it silently repaired."""
    mode = path.stat().st_mode
    if mode & _OTHERS:
        raise InsecureFile(
            f"{path}: {what} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )


def tighten(path: Path, mode: int = 0o600) -> bool:
    """Remove group and other access from `path` if it exists and is ours (True if it changed).

    For files that are not secrets by themselves (the database): repaired with a log line by the
    caller, not refused."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    if not info.st_mode & _OTHERS or info.st_uid != os.geteuid():
        return False
    os.chmod(path, mode)
    return True


def make_private_dir(path: Path) -> bool:
    """Create `path` (and its parents) as a 0700 folder, or tighten an existing one of ours to
    0700. Returns True if an existing folder was tightened (the caller logs it)."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; this is exact
        return False
    return tighten(path, 0o700)


def create_private_file(path: Path) -> None:
    """Create an empty 0600 file if `path` does not exist (an existing one is left as it is).

    For files another library creates with its own mode: SQLite opens an existing empty file as a
    new database and gives its -wal and -shm files the mode of the database file."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class FolderLocked(Exception):
    """Another running process holds the lock file; `pid` is the one it wrote (None if unknown)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path, self.pid = path, pid
        super().__init__(f"{path} is locked by PID {pid if pid is not None else 'unknown'}")


@contextlib.contextmanager
def hold_lock(path: Path, program: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created 0600) for the life of the block, or raise
    FolderLocked at once. The file keeps the holder's PID for the error message.

    flock: the kernel drops the lock when the process dies, even by SIGKILL, so a crash never
    leaves a stale lock; the file itself stays (deleting it would let two processes lock two
    different files of one name)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").split()
            pid = int(text[1]) if len(text) > 1 and text[1].isdigit() else None
            raise FolderLocked(path, pid) from None
        # The PID is only for the message; on a full disk the lock holds without it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{program} {os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
