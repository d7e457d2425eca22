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


def test_a_relative_data_dir_follows_the_config_file_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9, defect 10: two agents started from one folder shared one node key."""
    site = tmp_path / "etc" / "site-a"
    site.mkdir(parents=True)
    path = site / "agent.toml"
    path.write_text(
        '[agent]\ndata_dir = "state"\ncollections_file = "collections.toml"\n'
        'tls_cert = "../tls/cert.pem"\ntls_key = "/abs/key.pem"\n'
        '[hq]\nca_bundle = "ca.pem"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_agent_config(Path("etc/site-a/agent.toml"))
    assert config.agent.data_dir == site.resolve() / "state"
    assert config.key_path == site.resolve() / "state" / "node.key"
    assert config.agent.collections_file == site.resolve() / "collections.toml"
    assert config.agent.tls_cert == site.resolve() / "../tls/cert.pem"
    assert config.agent.tls_key == Path("/abs/key.pem")
    assert config.hq.ca_bundle == site.resolve() / "ca.pem"


@pytest.mark.parametrize(
    "url",
    [
        "http://hq.example.org",
        "http://127.0.0.1.evil.example",
        "http://localhost.evil.example:8443",
        "ftp://hq.example.org",
        "hq.example.org:8443",
        "https://",
    ],
)
def test_hq_url_must_be_https_or_loopback(tmp_path: Path, url: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[hq]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=r"hq\.url"):
        load_agent_config(path)


@pytest.mark.parametrize(
    "url",
    ["https://hq.example.org:8443", "http://127.0.0.1:8443", "http://[::1]:1", "http://localhost"],
)
def test_hq_url_accepts_https_and_plain_http_to_loopback(tmp_path: Path, url: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[hq]\nurl = "{url}"\n')
    assert load_agent_config(path).hq.url == url
