# Every target creates or refreshes .venv itself, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check bench torture dist clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m agent.demo

test: $(STAMP)
	./.ci/install-services
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.foundation
	$(BIN)/python -m bench.router

# The torture suite (tests/torture.py): real CLIs and processes under SIGKILL, a fault proxy, a
# full disk and clock jumps, checked against every acknowledged write. CYCLES=N sets its length.
CYCLES ?= 200
torture: $(STAMP)
	./.ci/install-services
	$(BIN)/python tests/torture.py --cycles $(CYCLES)

# sdist and wheel in dist/ (the wheel carries the example configs and systemd units).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m zipfile -l dist/*.whl | grep -E 'share/fieldsync/(config|systemd)/' >/dev/null

clean:
	rm -rf $(VENV) .demo build dist *.egg-info
