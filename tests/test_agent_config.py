"""config/agent.example.toml stays loadable and complete: every agent setting is shown in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from agent_fixtures import make_config

from agent.config import AgentConfig, load_agent_config
from protocol.config import ConfigError, documented_keys

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"
SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
KEY = re.compile(r"^\s*(?:#\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def keys_by_section(text: str) -> dict[str, set[str]]:
    """Keys set or shown commented-out (`# key = ...`) under each [section] of a TOML file."""
    sections: dict[str, set[str]] = {"": set()}
    current = ""
    for line in text.splitlines():
        if match := SECTION.match(line):
            current = match.group(1).strip()
            sections.setdefault(current, set())
        elif match := KEY.match(line):
            sections[current].add(match.group(1))
    return sections


def test_the_example_config_loads() -> None:
    config = load_agent_config(EXAMPLE)
    assert config.agent.listen == "127.0.0.1:8470"
    assert set(config.collections) >= {"beneficiaries", "distributions"}
    assert config.collections["beneficiaries"].key == "beneficiary_id"
    assert config.hq.ca_bundle is None  # shown commented out


def test_the_example_shows_every_documented_key_in_its_section() -> None:
    shown = keys_by_section(EXAMPLE.read_text(encoding="utf-8"))
    missing = []
    for dotted in documented_keys(AgentConfig):
        *path, name = dotted.split(".")
        section = ".".join(path)
        if "*" in path:  # a table of sections, e.g. collections.*.key
            pattern = re.compile(re.escape(section).replace(r"\*", r"[^.]+") + "$")
            candidates = [s for s in shown if pattern.match(s)]
        else:
            candidates = [section]
        if not candidates or not all(name in shown.get(s, set()) for s in candidates):
            missing.append(dotted)
    assert missing == [], f"add these keys to {EXAMPLE.name}: {missing}"


def test_the_example_values_are_the_defaults() -> None:
    example = load_agent_config(EXAMPLE)
    default = AgentConfig()
    assert example.agent == default.agent
    assert example.hq == default.hq
    assert example.sync == default.sync


def test_every_setting_has_a_doc_text() -> None:
    for key, doc in documented_keys(AgentConfig).items():
        assert doc.strip(), f"{key} has no doc text"


def test_test_configs_go_through_the_same_checks(tmp_path: Path) -> None:
    config = make_config(tmp_path, window=2)
    assert config.sync.window == 2 and config.db_path == tmp_path / "data" / "agent.db"
    with pytest.raises(ConfigError, match=r"test\.toml: sync\.window: must be between 1 and 64"):
        make_config(tmp_path, window=65)
