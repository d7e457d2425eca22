"""File permissions on the agent and HQ (issue 9, defect 4), with real files and os.stat.

Data folders are 0700 and the files in them 0600 (agent.db and its -wal/-shm, node.key, api-token,
hq.json; hq.db and hq.key), whatever the umask of the process that creates them; folders and
databases made before this (an upgrade) are tightened and logged; a private key or token that
group or others can read stops the process with the file and the `chmod` that fixes it.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fixtures import COLLECTION, beneficiary, make_config, upsert

from agent.service import open_agent
from hq_server.keys import HQKeyError, load_or_create_identity
from protocol.files import InsecureFile, check_private_file, make_private_dir, tighten
from protocol.identity import NodeIdentity

BIN = Path(sys.executable).parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask most shells have (022): what must not decide our files' modes."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_init_makes_a_private_folder_and_files(tmp_path: Path) -> None:
    """The real CLI in a child process with the usual umask 022."""
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ndata_dir = "data"\n\n[collections.beneficiaries]\nkey = "id"\n')
    done = subprocess.run(
        [str(BIN / "fieldsync-agent"), "init", "--config", str(config)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data = tmp_path / "data"  # relative to the config file, not to the working folder
    assert mode(data) == 0o700
    files = {p.name: mode(p) for p in data.iterdir()}
    assert {"agent.db", "node.key", "api-token"} <= set(files)
    assert files == dict.fromkeys(files, 0o600), files


async def test_the_database_and_its_wal_and_shm_are_private(
    tmp_path: Path, loose_umask: None
) -> None:
    config = make_config(tmp_path)
    make_private_dir(config.agent.data_dir)
    NodeIdentity.generate().save(config.key_path)
    async with open_agent(config) as agent:
        await agent.store.write([upsert(beneficiary(1))])
        db = config.db_path
        held = {
            p.name: mode(p)
            for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
        }
        assert held == {"agent.db": 0o600, "agent.db-wal": 0o600, "agent.db-shm": 0o600}
        assert await agent.store.count(COLLECTION) == 1
    assert mode(config.agent.data_dir) == 0o700


async def test_an_upgraded_data_folder_is_tightened_and_logged(
    tmp_path: Path, loose_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A data folder and database made by an earlier version, 0755 and 0644."""
    config = make_config(tmp_path)
    data = config.agent.data_dir
    NodeIdentity.generate().save(config.key_path)
    async with open_agent(config) as agent:
        await agent.store.write([upsert(beneficiary(1))])
    data.chmod(0o755)
    config.db_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "fieldsync.agent"):
        async with open_agent(config) as agent:
            assert await agent.store.count(COLLECTION) == 1
    assert mode(data) == 0o700 and mode(config.db_path) == 0o600
    assert f"{data}" in caplog.text and f"{config.db_path}" in caplog.text


def test_check_private_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x")
    path.chmod(0o600)
    check_private_file(path)
    for loose in (0o640, 0o604, 0o620, 0o660):
        path.chmod(loose)
        with pytest.raises(InsecureFile) as caught:
            check_private_file(path, "API token")
        assert str(caught.value) == (
            f"{path}: API token is readable by others (mode {loose:o}); run: chmod 600 {path}"
        )


def test_tighten_and_make_private_dir(tmp_path: Path, loose_umask: None) -> None:
    assert not tighten(tmp_path / "missing")
    made = tmp_path / "a" / "b"
    assert not make_private_dir(made)  # created, not tightened
    assert mode(made) == 0o700
    made.chmod(0o755)
    assert make_private_dir(made) and mode(made) == 0o700
    assert not make_private_dir(made)
    f = made / "db"
    f.write_text("x")
    assert mode(f) == 0o644
    assert tighten(f) and mode(f) == 0o600 and not tighten(f)


def test_a_node_key_saved_in_a_new_folder_gets_a_private_folder(
    tmp_path: Path, loose_umask: None
) -> None:
    path = tmp_path / "new" / "node.key"
    NodeIdentity.generate().save(path)
    assert mode(path.parent) == 0o700 and mode(path) == 0o600


def test_hq_key_folder_is_private_and_an_old_one_is_tightened(
    tmp_path: Path, loose_umask: None
) -> None:
    data = tmp_path / "hq"
    identity = load_or_create_identity(data / "hq.key")
    assert mode(data) == 0o700 and mode(data / "hq.key") == 0o600
    data.chmod(0o755)
    (data / "hq.db").write_bytes(b"")
    (data / "hq.db").chmod(0o644)
    assert load_or_create_identity(data / "hq.key").node_id == identity.node_id
    assert mode(data) == 0o700 and mode(data / "hq.db") == 0o600
    (data / "hq.key").chmod(0o640)
    with pytest.raises(HQKeyError, match=f"chmod 600 {data / 'hq.key'}"):
        load_or_create_identity(data / "hq.key")


def test_hq_serve_leaves_nothing_readable_by_others(tmp_path: Path) -> None:
    """The real HQ process (umask 022): its data folder and every file in it are private."""
    config = tmp_path / "hq.toml"
    config.write_text('[hq]\ndata_dir = "hq"\nlisten = "127.0.0.1:0"\nlog_level = "error"\n')
    proc = subprocess.Popen(
        [str(BIN / "fieldsync-hq"), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        data = tmp_path / "hq"
        assert mode(data) == 0o700
        files = {p.name: mode(p) for p in data.iterdir()}
        assert {"hq.db", "hq.key"} <= set(files)
        assert all(m & 0o077 == 0 for m in files.values()), files
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
