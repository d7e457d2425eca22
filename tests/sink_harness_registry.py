"""Which sink harnesses the conformance suite (tests/test_sink_conformance.py) runs against.

A harness is provided by a pytest fixture that yields a ready `sink_harness.SinkHarness` with a
fresh, empty target, and tears it down afterwards. Register the fixture where you define it, in a
module named `tests/test_sink_<anything>.py` -- the conformance suite imports every such module,
so registering needs no edit anywhere else::

    # tests/test_sink_postgres.py
    from sink_harness_registry import register_harness

    @pytest.fixture(scope="session")
    def postgres_server(tmp_path_factory): ...          # yours, any scope

    @register_harness("postgres", marks=(pytest.mark.postgres,), uses=(postgres_server,))
    @pytest.fixture
    async def postgres_harness(postgres_server, tmp_path) -> AsyncIterator[SinkHarness]:
        harness = PostgresHarness(postgres_server, ...)
        yield harness
        await harness.cleanup()

- `name` is the test id (`test_...[postgres]`) and must be unique.
- The registry entry is the fixture's name (`HARNESSES["postgres"].fixture == "postgres_harness"`);
  the suite resolves it with `request.getfixturevalue`. For that, the fixture -- and every fixture
  it depends on that is defined in your module rather than in a conftest or a plugin -- is made
  visible to the conformance module: list those in `uses`. Two different fixtures with the same
  name are refused at collection, so name them after your sink (`postgres_server`, not `server`).
- `marks` go on every conformance test of this harness (e.g. a marker that CI selects or that a
  fixture skips on); register custom markers in pyproject.toml (warnings are errors).
- Optional harness attributes the suite reads when present:
  `secrets` -- the secret values the sink was given (passwords, API keys, issued tokens), read
  after the scenario; the suite checks none appears in `repr(sink)`, outcome details or logs.
  Without it, that check is skipped for the harness.
- `received()` lists what a well-behaved consumer of the target keeps. For a target that cannot
  deduplicate by itself (a queue), deduplicate there the way your documentation tells consumers to
  (by idempotency key); never hide anything else.

A module that calls `pytest.importorskip` (say, the driver is not installed) simply registers
nothing, and its harness is not run. A module that fails to import otherwise shows up as one
failing conformance test (`...[import-error:test_sink_x]`); the other harnesses still run.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

HARNESS_MODULES = "test_sink_*.py"  # in this folder; each may register harnesses
F = TypeVar("F")


@dataclass(frozen=True)
class HarnessEntry:
    name: str  # the parameter id in the conformance suite
    fixture: str  # the pytest fixture that yields the SinkHarness
    module: str  # where it was registered
    marks: tuple[pytest.MarkDecorator, ...] = ()
    exported: tuple[Any, ...] = ()  # fixture objects to make visible to the conformance module


HARNESSES: dict[str, HarnessEntry] = {}
IMPORT_ERRORS: dict[str, str] = {}  # module -> why it could not be imported


def fixture_name(fixture: Any) -> str:
    """The name pytest knows a `@pytest.fixture` object by."""
    name = getattr(fixture, "name", None)
    if not isinstance(name, str) or not hasattr(fixture, "_fixture_function_marker"):
        raise TypeError(f"{fixture!r} is not a pytest fixture; put @register_harness above it")
    return name


def register_harness(
    name: str, *, marks: Iterable[pytest.MarkDecorator] = (), uses: Iterable[Any] = ()
) -> Callable[[F], F]:
    """Decorator for a harness fixture (place it above `@pytest.fixture`); see the module doc."""

    def register(fixture: F) -> F:
        module = getattr(fixture, "__module__", "?")
        entry = HarnessEntry(
            name=name,
            fixture=fixture_name(fixture),
            module=module,
            marks=tuple(marks),
            exported=(fixture, *uses),
        )
        for used in entry.exported:
            fixture_name(used)
        known = HARNESSES.get(name)
        if known is not None and (known.module, known.fixture) != (module, entry.fixture):
            raise ValueError(
                f"sink harness {name!r} is registered twice ({known.module}, {module})"
            )
        HARNESSES[name] = entry
        return fixture

    return register


def load_harness_modules(directory: Path, *, skip: str) -> None:
    """Import every tests/test_sink_*.py (but `skip`, the caller) so they can register.

    pytest imports test modules of this folder under their bare names (tests/ has no __init__.py
    and the default `prepend` import mode), so importing them by that name here yields the very
    module objects pytest collects later: nothing is imported or registered twice.
    """
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    for path in sorted(directory.glob(HARNESS_MODULES)):
        if path.stem == skip:
            continue
        try:
            importlib.import_module(path.stem)
        except pytest.skip.Exception:
            continue  # e.g. pytest.importorskip: that module's sink cannot be tested here
        except Exception as e:  # reported as a failing test, not a collection error for all
            IMPORT_ERRORS[path.stem] = f"{type(e).__name__}: {e}"


def exported_fixtures() -> dict[str, Any]:
    """Fixture name -> fixture object, for every harness; refuses two fixtures with one name."""
    out: dict[str, Any] = {}
    for entry in HARNESSES.values():
        for fixture in entry.exported:
            name = fixture_name(fixture)
            if name in out and out[name] is not fixture:
                raise ValueError(
                    f"two different fixtures are named {name!r} (one from {entry.module}); "
                    "rename one so the conformance suite can see both"
                )
            out[name] = fixture
    return out
