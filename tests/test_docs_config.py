"""Documentation is part of the feature: every setting is in the reference and the examples, and the
example configurations load as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_agent_config
from hq_server.config import HQConfig, load_config
from protocol.config import documented_keys

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "configuration.md").read_text()
CONFIGS = {
    "agent": (AgentConfig, ROOT / "config" / "agent.example.toml"),
    "hq": (HQConfig, ROOT / "config" / "hq.example.toml"),
}


@pytest.mark.parametrize("side", sorted(CONFIGS))
def test_every_setting_is_in_the_reference(side: str) -> None:
    cls, _ = CONFIGS[side]
    missing = [key for key in documented_keys(cls) if f"| `{key}` |" not in REFERENCE]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize("side", sorted(CONFIGS))
def test_every_setting_is_in_the_example_file(side: str) -> None:
    cls, path = CONFIGS[side]
    text = path.read_text()
    missing = [
        key
        for key in documented_keys(cls)
        if not re.search(rf"^#?\s*{re.escape(key.rsplit('.', 1)[-1])}\s*=", text, re.M)
    ]
    assert not missing, f"{path.name} lacks {missing}"


def test_every_setting_has_a_doc_text() -> None:
    for cls, _ in CONFIGS.values():
        assert all(doc.strip() for doc in documented_keys(cls).values())


def test_example_configs_load() -> None:
    agent = load_agent_config(CONFIGS["agent"][1])
    assert set(agent.collections) == {"beneficiaries", "distributions"}
    load_config(CONFIGS["hq"][1])
