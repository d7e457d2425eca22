"""The files sink in real folders: atomic finishing, rotation by size and time (injected clock),
CSV columns, crash recovery of .part files, and a full disk (a small tmpfs, when run as root).

Provides the `files-jsonl` and `files-csv` conformance harnesses; their 'unavailable' moves the
folder away (as an unmounted disk would), and their tiny max_bytes rotates files during the suite.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sink_harness import items, outgoing
from sink_harness_registry import register_harness

from hq_server.sinks.base import NOT_ATTEMPTED, SINK_TYPES, Delivery, Outcome, Outgoing
from hq_server.sinks.files import FilesSettings, FilesSink, csv_row, jsonl_line
from protocol.config import ConfigError, build, documented_keys

pytestmark = pytest.mark.timeout(30)
NAME = re.compile(r"^(?P<prefix>.+)-(?P<stamp>\d{8}T\d{6})-(?P<seq>\d{6})\.(jsonl|csv)(\.part)?$")
COLUMNS = ["id", "n", "amount"]
T0 = 1_704_164_399.0  # 2024-01-02T02:59:59Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def data_files(directory: Path, *, parts: bool = True) -> list[Path]:
    """The sink's files in write order (by seq)."""
    found = [p for p in directory.iterdir() if NAME.match(p.name)]
    if not parts:
        found = [p for p in found if not p.name.endswith(".part")]
    return sorted(found, key=lambda p: int(NAME.match(p.name)["seq"]))  # type: ignore[index]


def _cell(text: str) -> Any:
    """A CSV cell back to a value: JSON text where it parses, else the text (test payloads only)."""
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_documents(path: Path) -> list[dict[str, Any]]:
    """Every record of one file as {"idempotency_key", "key", "record", ...}."""
    if ".jsonl" in path.name:
        return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fixed = ("idempotency_key", "route", "collection", "op", "key", "change_seq")
    return [
        {
            **{k: row[k] for k in fixed},
            "record": {k: _cell(v) for k, v in row.items() if k not in fixed and v != ""},
        }
        for row in rows
    ]


class FilesHarness:
    def __init__(self, name: str, root: Path, format: Any) -> None:
        self.name = name
        self.directory = root / "out"
        self.away = root / "out-unmounted"
        self.directory.mkdir()
        self.format = format

    async def make_sink(self) -> FilesSink:
        columns = COLUMNS if self.format == "csv" else []
        settings = FilesSettings(
            directory=self.directory,
            format=self.format,
            prefix="grants",
            columns=columns,
            max_bytes=400,
            rotate="hourly",
        )
        sink = FilesSink(settings)
        await sink.open()
        return sink

    def _holding(self) -> Path:
        """Where the files are now (while 'unmounted', they are still on the other disk)."""
        return self.away if self.away.exists() else self.directory

    async def received(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (doc["idempotency_key"], doc["record"])
            for path in data_files(self._holding())
            for doc in read_documents(path)
        ]

    async def current(self) -> dict[str, dict[str, Any]]:
        return {
            doc["key"]: doc["record"]
            for path in data_files(self._holding())
            for doc in read_documents(path)
        }

    async def set_available(self, available: bool) -> None:
        if available and self.away.exists():
            self.away.rename(self.directory)
        elif not available and self.directory.exists():
            self.directory.rename(self.away)

    def rejected_item(self, base: Outgoing) -> Outgoing | None:
        return replace(base, payload={**base.payload, "amount": float("nan")})

    async def cleanup(self) -> None:
        await self.set_available(True)


@register_harness("files-jsonl")
@pytest.fixture
def files_jsonl_harness(tmp_path: Path) -> FilesHarness:
    return FilesHarness("files-jsonl", tmp_path, "jsonl")


@register_harness("files-csv")
@pytest.fixture
def files_csv_harness(tmp_path: Path) -> FilesHarness:
    return FilesHarness("files-csv", tmp_path, "csv")


@contextlib.asynccontextmanager
async def opened(settings: FilesSettings, clock: Clock | None = None) -> AsyncIterator[FilesSink]:
    sink = FilesSink(settings, clock=clock or Clock())
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def settings(directory: Path, **overrides: Any) -> FilesSettings:
    base: dict[str, Any] = {"directory": directory, "prefix": "grants", "rotate": "never"}
    return FilesSettings(**{**base, **overrides})


def delivered(outcomes: list[Outcome]) -> bool:
    return all(o.status is Delivery.DELIVERED for o in outcomes)


# -- atomic files


async def test_records_go_to_a_part_file_that_close_finishes(tmp_path: Path) -> None:
    async with opened(settings(tmp_path)) as sink:
        assert delivered(await sink.send(items(3)))
        (part,) = data_files(tmp_path)
        assert part.name == "grants-20240102T025959-000001.jsonl.part"
        assert [d["idempotency_key"] for d in read_documents(part)] == [
            i.idempotency_key for i in items(3)
        ]
        assert oct(part.stat().st_mode & 0o777) == oct(0o640)
    (final,) = data_files(tmp_path)
    assert final.name == "grants-20240102T025959-000001.jsonl"
    assert read_documents(final)[0] == json.loads(jsonl_line(items(1)[0]))
    assert read_documents(final)[0]["record"] == items(1)[0].payload


async def test_rotation_by_size_finishes_files_as_they_fill(tmp_path: Path) -> None:
    line = len(jsonl_line(outgoing(1)))
    async with opened(settings(tmp_path, max_bytes=3 * line)) as sink:
        assert delivered(await sink.send(items(7)))
        names = [p.name for p in data_files(tmp_path)]
        assert names == [
            "grants-20240102T025959-000001.jsonl",
            "grants-20240102T025959-000002.jsonl",
            "grants-20240102T025959-000003.jsonl.part",
        ]
    files = data_files(tmp_path)
    assert [len(read_documents(p)) for p in files] == [3, 3, 1]
    assert all(p.stat().st_size <= 3 * line + 5 for p in files)
    keys = [d["idempotency_key"] for p in files for d in read_documents(p)]
    assert keys == [i.idempotency_key for i in items(7)]


@pytest.mark.parametrize(
    ("rotate", "later", "rotated"),
    [
        ("hourly", 1, True),  # 02:59:59 -> 03:00:00
        ("hourly", -3600 + 2, False),  # still 02:xx (clock went back within the hour)
        ("daily", 1, False),  # same day
        ("daily", 21 * 3600 + 1, True),  # 2024-01-03
        ("never", 7 * 86400, False),
    ],
)
async def test_rotation_by_time(tmp_path: Path, rotate: Any, later: float, rotated: bool) -> None:
    clock = Clock()
    async with opened(settings(tmp_path, rotate=rotate), clock) as sink:
        assert delivered(await sink.send(items(2)))
        clock.now += later
        assert delivered(await sink.send(items(2, start=3)))
        files = data_files(tmp_path)
        assert len(files) == (2 if rotated else 1)
        if rotated:
            assert not files[0].name.endswith(".part")
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock.now))
            assert files[1].name == f"grants-{stamp}-000002.jsonl.part"


async def test_seq_continues_after_a_restart(tmp_path: Path) -> None:
    for start in (1, 3):
        async with opened(settings(tmp_path)) as sink:
            assert delivered(await sink.send(items(2, start=start)))
    assert [NAME.match(p.name)["seq"] for p in data_files(tmp_path)] == ["000001", "000002"]  # type: ignore[index]


async def test_an_empty_sink_leaves_no_file(tmp_path: Path) -> None:
    async with opened(settings(tmp_path, format="csv", columns=COLUMNS)) as sink:
        assert await sink.send([]) == []
    assert data_files(tmp_path) == []


# -- formats


async def test_csv_columns_header_and_values(tmp_path: Path) -> None:
    payload = {
        "id": "BEN-1",
        "name": 'Ana "Nana", da Silva\nline two',
        "tags": ["a", "b"],
        "geo": {"lat": -1.5, "ok": True},
        "empty": None,
        "ignored": "not a column",
    }
    columns = ["id", "name", "tags", "geo", "empty", "missing"]
    line = len(csv_row(outgoing(1, payload=payload), columns))
    async with opened(settings(tmp_path, format="csv", columns=columns, max_bytes=line)) as sink:
        assert delivered(
            await sink.send([outgoing(1, payload=payload), outgoing(2, payload=payload)])
        )
    files = data_files(tmp_path)
    assert len(files) == 2
    for path in files:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
        assert rows[0] == [
            "idempotency_key",
            "route",
            "collection",
            "op",
            "key",
            "change_seq",
            *columns,
        ]
        assert len(rows) == 2
        assert rows[1][6:] == [
            "BEN-1",
            'Ana "Nana", da Silva\nline two',
            '["a","b"]',
            '{"lat":-1.5,"ok":true}',
            "",
            "",
        ]
        assert path.read_bytes().endswith(b"\r\n")


async def test_jsonl_lines_survive_any_line_splitter(tmp_path: Path) -> None:
    payload = {"text": "a\u2028b\u2029c\x85d\ne", "n": 1}
    async with opened(settings(tmp_path)) as sink:
        assert delivered(await sink.send([outgoing(1, payload=payload)]))
    text = data_files(tmp_path)[0].read_text(encoding="utf-8")
    (line,) = text.splitlines()
    assert json.loads(line)["record"] == payload


async def test_unencodable_record_is_rejected_the_rest_written(tmp_path: Path) -> None:
    bad = outgoing(2, payload={"amount": float("inf")})
    odd = outgoing(3, payload={"raw": b"bytes"})
    async with opened(settings(tmp_path)) as sink:
        outcomes = await sink.send([outgoing(1), bad, odd, outgoing(4)])
    assert [o.status for o in outcomes] == [
        Delivery.DELIVERED,
        Delivery.REJECTED,
        Delivery.REJECTED,
        Delivery.DELIVERED,
    ]
    assert all(o.detail for o in outcomes[1:3])
    assert [d["change_seq"] for d in read_documents(data_files(tmp_path)[0])] == [1, 4]


# -- repeats and recovery


async def test_a_repeat_is_written_once(tmp_path: Path) -> None:
    async with opened(settings(tmp_path)) as sink:
        assert delivered(await sink.send(items(3)))
        assert delivered(await sink.send([*items(3), items(3)[0]]))
    assert len(read_documents(data_files(tmp_path)[0])) == 3


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_a_crashed_part_is_cut_to_whole_records_and_finished(
    tmp_path: Path, fmt: Any
) -> None:
    columns = COLUMNS if fmt == "csv" else []
    name = f"grants-20240101T000000-000007.{fmt}.part"
    tricky = outgoing(2, payload={"id": "x", "n": 'multi\n"line"\n', "amount": 1})
    if fmt == "csv":
        header = b"idempotency_key,route,collection,op,key,change_seq,id,n,amount\r\n"
        whole = header + csv_row(outgoing(1), columns) + csv_row(tricky, columns)
        torn = csv_row(outgoing(3), columns)[:-9]
    else:
        whole = jsonl_line(outgoing(1)) + jsonl_line(tricky)
        torn = jsonl_line(outgoing(3))[:-9]
    (tmp_path / name).write_bytes(whole + torn)
    async with opened(settings(tmp_path, format=fmt, columns=columns)) as sink:
        finished = tmp_path / name.removesuffix(".part")
        assert finished.read_bytes() == whole  # finished at open, torn record cut off
        outcomes = await sink.send([outgoing(1), tricky, outgoing(3)])  # the router's retry
        assert delivered(outcomes)
    files = data_files(tmp_path)
    assert [p.name for p in files] == [
        finished.name,
        f"grants-20240102T025959-000008.{fmt}",
    ]
    assert [d["idempotency_key"] for d in read_documents(files[1])] == [outgoing(3).idempotency_key]


async def test_a_part_without_records_is_removed(tmp_path: Path) -> None:
    (tmp_path / "grants-20240101T000000-000001.csv.part").write_bytes(b"idempotency_key,ro")
    async with opened(settings(tmp_path, format="csv", columns=COLUMNS)):
        pass
    assert data_files(tmp_path) == []


async def test_a_missing_directory_is_errored_until_it_appears(tmp_path: Path) -> None:
    directory = tmp_path / "mount"
    async with opened(settings(directory)) as sink:
        outcomes = await sink.send(items(2))
        assert outcomes[0].status is Delivery.ERRORED and "not mounted" in outcomes[0].detail
        assert outcomes[0].target_down
        assert outcomes[1] == NOT_ATTEMPTED
        directory.mkdir()
        assert delivered(await sink.send(items(2)))


async def test_a_second_writer_of_the_same_prefix_is_errored(tmp_path: Path) -> None:
    async with opened(settings(tmp_path)) as first, opened(settings(tmp_path)) as second:
        assert delivered(await first.send(items(1)))
        (outcome,) = await second.send(items(1, start=2))
        assert outcome.status is Delivery.ERRORED and "another files sink" in outcome.detail
    async with opened(settings(tmp_path, format="csv", columns=COLUMNS)) as other_format:
        assert delivered(await other_format.send(items(1)))


# -- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


async def test_a_full_disk_is_errored_and_nothing_is_half_written(small_disk: Path) -> None:
    big = {"id": "x", "n": 1, "amount": 1, "blob": "z" * 20_000}  # larger than what is left
    async with opened(settings(small_disk)) as sink:
        assert delivered(await sink.send(items(1)))
        filler = fill(small_disk)
        filler.write_bytes(b"\0" * (filler.stat().st_size - 8192))  # leave two pages
        outcomes = await sink.send([outgoing(2, payload=big), outgoing(3)])
        assert outcomes[0].status is Delivery.ERRORED and outcomes[0].target_down
        assert "ENOSPC" in outcomes[0].detail and "disk is full" in outcomes[0].detail
        assert outcomes[1] == NOT_ATTEMPTED
        part_or_file = data_files(small_disk)
        documents = [d for p in part_or_file for d in read_documents(p)]
        assert [d["change_seq"] for d in documents] == [1]  # the torn record was cut off
        filler.unlink()
        assert delivered(await sink.send([outgoing(2, payload=big), outgoing(3)]))
    documents = [d for p in data_files(small_disk) for d in read_documents(p)]
    assert [d["change_seq"] for d in documents] == [1, 2, 3]
    assert all(not p.name.endswith(".part") for p in data_files(small_disk))


# -- settings


def test_registered_with_documented_settings() -> None:
    sink_type = SINK_TYPES["files"]
    assert sink_type.factory is FilesSink and sink_type.settings is FilesSettings
    assert all(text.strip() for text in documented_keys(FilesSettings).values())


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "directory"),
        ({"directory": "/d", "format": "xml"}, "format"),
        ({"directory": "/d", "format": "csv"}, "columns"),
        ({"directory": "/d", "columns": ["a"]}, "columns"),
        ({"directory": "/d", "format": "csv", "columns": ["a", "a"]}, "columns"),
        ({"directory": "/d", "format": "csv", "columns": ["key"]}, "columns"),
        ({"directory": "/d", "prefix": "../x"}, "prefix"),
        ({"directory": "/d", "prefix": ".hidden"}, "prefix"),
        ({"directory": "/d", "max_bytes": -1}, "max_bytes"),
        ({"directory": "/d", "rotate": "weekly"}, "rotate"),
        ({"directory": "/d", "file_mode": 0o044}, "file_mode"),
    ],
)
def test_bad_settings_are_refused(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(FilesSettings, table, "routes.toml", "routes.archive.sink.")
    assert error.value.key.endswith(key)


def test_unused_names_are_not_part_of_the_csv_header() -> None:
    row = csv_row(outgoing(1, payload={"id": "a", "other": 1}), ["id"])
    assert next(csv.reader(io.StringIO(row.decode()))) == [
        outgoing(1).idempotency_key,
        "conformance",
        "grants",
        "upsert",
        "rec-0001",
        "1",
        "a",
    ]
