"""`make torture` (CYCLES=N): the torture suite, real processes under faults, checked against
every acknowledged write. The parts live in tests/torture_lib/ (see its __init__ for the map and
torture_lib/run.py for the options); this file only makes them importable and runs them.

    .venv/bin/python tests/torture.py --cycles 200 [--seed N] [--cycle-s 5.5] [--keep]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # torture_lib, and the project (hq_server's webhook verifier)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from torture_lib.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
