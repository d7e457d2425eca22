"""HQ configuration: the example file loads and documents every key; bad files are refused clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hq_server.app import load_hq_collections
from hq_server.config import HQConfig, load_config
from protocol.config import ConfigError, documented_keys

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "hq.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hq.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_copied_alone_loads_with_the_defaults(tmp_path: Path) -> None:
    """The example says it shows the defaults: a copy in an empty folder (as an operator makes
    it, /etc/fieldsync/hq.toml) is exactly the defaults, and what HQ loads at start from it (the
    collections file) loads too."""
    copy = tmp_path / "hq.toml"
    shutil.copyfile(EXAMPLE, copy)
    config = load_config(copy)
    assert config == HQConfig()
    assert load_hq_collections(config.hq) is None
    section = config.hq
    assert section.listen == "127.0.0.1:8443"
    assert section.max_batch_bytes == 8 * 1024 * 1024
    assert section.max_raw_bytes == 32 * 1024 * 1024
    assert (section.max_clock_ahead_s, section.feed_page_size) == (300, 1000)
    assert (section.token_ttl_hours, section.log_level) == (72, "info")
    assert section.tls_cert is None
    assert not section.tls


def test_example_collections_file_line_works_when_uncommented(tmp_path: Path) -> None:
    """The commented collections_file line names the example collections file beside it."""
    text = EXAMPLE.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("# collections_file = "))
    path = write(tmp_path, f"[hq]\n{line.removeprefix('# ')}\n")
    shutil.copyfile(EXAMPLE.parent / "collections.example.toml", tmp_path / "collections.toml")
    for table in EXAMPLE.parent.glob("*.csv"):  # the reference tables it names
        shutil.copyfile(table, tmp_path / table.name)
    collections = load_hq_collections(load_config(path).hq)
    assert collections is not None and "beneficiaries" in collections


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key, doc in documented_keys(HQConfig).items():
        name = key.split(".")[-1]
        assert f"\n{name} = " in text or f"\n# {name} = " in text, key
        assert doc, key


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[hq]\nlisten = "127.0.0.1:1"\nmax_batch_byte = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "hq.max_batch_byte" in str(info.value)
    assert "unknown" in str(info.value)


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[hq]\nmax_batch_bytes = "8M"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "hq.max_batch_bytes" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[hq]\nlisten = "localhost"\n', "hq.listen"),
        ('[hq]\nlisten = "127.0.0.1:70000"\n', "hq.listen"),
        ("[hq]\nmax_raw_bytes = 100000000\n", "hq.max_raw_bytes"),
        ("[hq]\nfeed_page_size = 0\n", "hq.feed_page_size"),
        ('[hq]\nlog_level = "loud"\n', "hq.log_level"),
        ('[hq]\ntls_cert = "cert.pem"\n', "hq.tls_key"),
        ('[hq]\ntls_key = "key.pem"\n', "hq.tls_cert"),
        ("[routes]\n", "routes"),
        ("[hq\n", ""),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_port_zero_and_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[hq]\nlisten = "[::1]:0"\ndata_dir = "state"\ntls_cert = "c.pem"\ntls_key = "/k.pem"\n',
    )
    section = load_config(path).hq
    assert section.host_port() == ("::1", 0)
    assert section.data_dir == tmp_path.resolve() / "state"
    assert section.db_path == tmp_path.resolve() / "state" / "hq.db"
    assert section.tls_cert == tmp_path.resolve() / "c.pem"
    assert section.tls_key == Path("/k.pem")
    assert section.tls
