"""Atomic writes: all or nothing, with the requested mode, and exclusive creation refuses."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protocol.files import atomic_write


def test_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    with atomic_write(target, mode=0o600, text=True) as f:
        f.write("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_an_error_while_writing_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def crash_mid_write() -> None:
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        crash_mid_write()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_exclusive_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "node.key"
    with atomic_write(target, exclusive=True) as f:
        f.write(b"first")
    with (
        pytest.raises(FileExistsError, match="refusing to overwrite"),
        atomic_write(target, exclusive=True) as f,
    ):
        f.write(b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]
