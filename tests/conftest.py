"""Fixtures every test module gets."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _keep_the_umask() -> Iterator[None]:
    """Both CLIs' `main` make the process's umask private (0077); click's CliRunner runs them in
    the test process, so every test gets the session's own umask back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)
