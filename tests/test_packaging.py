"""The wheel an operator installs carries what the docs promise: the example configurations and
the systemd units, beside the three packages (`make dist` builds the same wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_the_wheel_carries_the_example_configs_and_the_systemd_units(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fieldsync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = next(n.split("/data/")[0] for n in names if ".data/data/" in n) + "/data/share/fieldsync"
    shipped = {f"{data}/config/{p.name}" for p in (ROOT / "config").iterdir() if p.is_file()} | {
        f"{data}/systemd/{p.name}" for p in (ROOT / "packaging").glob("*.service")
    }
    assert shipped <= names, sorted(shipped - names)
    for package in ("agent", "hq_server", "protocol"):
        assert f"{package}/__init__.py" in names
    # Tests, benchmarks and the demo's data never ship.
    assert not [n for n in names if n.startswith(("tests/", "bench/", ".demo/"))]
