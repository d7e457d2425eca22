"""Atomic file writes: a reader or a crash sees the old file or the whole new one, never half.

Temp file in the same folder (created with its final mode), fsync, rename over the target -- or
link, when the target must not be replaced -- then fsync the folder so the rename itself survives a
power cut.
"""

from __future__ import annotations

import contextlib
import os
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
