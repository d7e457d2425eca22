"""agent.forwarder.Forwarder and agent.hqclient.HQClient against a fake HQ on 127.0.0.1 (HTTP/HTTPS).

The fake HQ (tests/agent_fixtures.py) verifies every batch with the agent's key, deduplicates by
batch sequence and counts each change id it applies, so "delivered exactly once" is checked from
HQ's side while the agent meets 503s, lost answers, forged or truncated acks, gaps, and TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import (
    COLLECTION,
    KEY_FIELD,
    FakeHQ,
    base_url,
    beneficiary,
    open_store,
    serve,
    upsert,
)
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.backoff import Backoff
from agent.batcher import Batcher
from agent.enrolment import Enrolment
from agent.forwarder import PROBE_EVERY, Forwarder
from agent.hqclient import Gap, HQClient, RejectedError, TransientError, enroll
from agent.store import AgentStore
from protocol.change import Change
from protocol.hlc import pack, system_ms
from protocol.identity import NodeIdentity, node_id_for
from protocol.transport import ENROLL_PATH, b64, unb64


@dataclass
class Rig:
    hq: FakeHQ
    store: AgentStore
    client: HQClient
    batcher: Batcher
    forwarder: Forwarder

    def delivered(self) -> list[int]:
        """Origin sequences HQ applied from this agent, sorted."""
        return sorted(seq for origin, seq in self.hq.applied if origin == self.hq.agent.node_id)


@asynccontextmanager
async def rig(
    tmp_path: Path, *, max_changes: int = 10, window: int = 3, **hq_faults: Any
) -> AsyncIterator[Rig]:
    identity = NodeIdentity.generate()
    hq = FakeHQ(agent=identity, **hq_faults)
    async with (
        serve(hq.app()) as server,
        open_store(tmp_path / "agent.db", identity.node_id) as store,
        HQClient(hq.enrolment(base_url(server)), identity, timeout_s=5) as client,
    ):
        batcher = Batcher(
            store, identity, max_changes=max_changes, max_bytes=1 << 20, window=window, zstd_level=3
        )
        forwarder = Forwarder(
            store,
            client,
            batcher,
            backoff=Backoff(0.01, 0.05),
            pull_interval_s=0.05,
            feed_page_size=100,
        )
        yield Rig(hq, store, client, batcher, forwarder)


@asynccontextmanager
async def running(r: Rig) -> AsyncIterator[None]:
    """The batcher and forwarder loops, run as the service runs them, stopped on exit."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(r.batcher.run(stop))
        tasks.create_task(r.forwarder.run(stop))
        try:
            yield
        finally:
            stop.set()


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(10):
        while not await condition():
            await asyncio.sleep(0.01)


async def synced(r: Rig) -> bool:
    """Everything acked, and the success recorded (last error cleared, last contact set)."""
    meta = await r.store.meta()
    backlog = await r.store.backlog()
    return backlog["changes"] == 0 and not meta["last_error"] and int(meta["last_contact_ms"]) > 0


async def run_until_synced(r: Rig) -> None:
    async with running(r):
        await eventually(lambda: synced(r))


async def write_records(store: AgentStore, count: int) -> None:
    await store.write([upsert(beneficiary(i)) for i in range(count)])


# ---- push ---------------------------------------------------------------------------------------


async def test_push_all_delivers_everything_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await write_records(r.store, 45)
        assert await r.batcher.seal_next() is not None
        assert await r.forwarder.push_all() == 45
        assert r.delivered() == list(range(1, 46))
        assert r.hq.duplicates == [] and r.hq.batch_counts == [10, 10, 10, 10, 5]
        assert await r.store.backlog() == {"changes": 0, "bytes": 0, "batches": 0, "batch_bytes": 0}
        meta = await r.store.meta()
        assert int(meta["acked_batch"]) == 5 and int(meta["acked_changes"]) == 45
        assert r.forwarder.counters.batches_sent == 5
        assert r.forwarder.counters.changes_acked == 45
        assert r.client.clock_offset_ms is not None and abs(r.client.clock_offset_ms) < 5000
        # What HQ holds is exactly what was written.
        for i in (0, 17, 44):
            record = beneficiary(i)
            change = r.hq.applied[(r.hq.agent.node_id, i + 1)]
            assert (change.collection, change.key, change.fields) == (
                COLLECTION,
                record[KEY_FIELD],
                record,
            )
        assert await r.forwarder.push_all() == 0  # nothing left: a no-op


async def test_run_recovers_from_503s_delivering_exactly_once(tmp_path: Path) -> None:
    async with rig(tmp_path, fail_503=3) as r:
        errors_seen: list[str] = []

        async def before_each_post() -> None:
            errors_seen.append(str((await r.store.meta())["last_error"]))

        r.hq.on_post = before_each_post
        await write_records(r.store, 35)
        await run_until_synced(r)

        assert r.delivered() == list(range(1, 36))
        assert r.hq.duplicates == [] and r.hq.duplicate_batches == 0
        # The failures were recorded for the operator (status shows them) ...
        assert errors_seen[0] == ""
        assert all("503" in e and "restarting" in e for e in errors_seen[1:4]), errors_seen
        # ... and cleared once HQ answered again.
        meta = await r.store.meta()
        assert meta["last_error"] == "" and int(meta["last_contact_ms"]) > 0
        assert int(meta["last_error_ms"]) > 0
        assert r.forwarder.backoff.failures == 0


async def test_failures_never_grow_batches_past_batch_max_changes(tmp_path: Path) -> None:
    async with rig(tmp_path, max_changes=10, window=3, fail_503=10**6) as r:
        await write_records(r.store, 10)

        async def hq_refused_twice() -> bool:
            return r.hq.posts >= 2

        async def window_full() -> bool:
            return len(await r.store.unacked_batches(3)) == 3

        async with running(r):
            # HQ is down: the forwarder fails and shrinks the batches sealed next.
            await eventually(hq_refused_twice)
            await r.store.write([upsert(beneficiary(i)) for i in range(10, 60)])
            await eventually(window_full)
            r.hq.fail_503 = 0
            await eventually(lambda: synced(r))
        assert r.delivered() == list(range(1, 61))
        assert max(r.hq.batch_counts) <= 10, r.hq.batch_counts


async def test_the_forwarder_outlives_days_of_hq_being_down(tmp_path: Path) -> None:
    async with rig(tmp_path, fail_503=10**6) as r:
        await write_records(r.store, 3)
        assert await r.batcher.seal_next() is not None
        r.forwarder.backoff = Backoff(0.001, 0.002)
        r.forwarder.backoff.failures = 1100  # as after ~3 days offline with the defaults
        stop = asyncio.Event()
        loop = asyncio.create_task(r.forwarder.run(stop))

        async def retried_or_died() -> bool:
            return r.hq.posts >= 3 or loop.done()

        await eventually(retried_or_died)
        stop.set()
        await loop
        assert r.hq.posts >= 3
        assert "503" in (await r.store.meta())["last_error"]


async def test_a_lost_ack_means_a_resend_that_hq_deduplicates(tmp_path: Path) -> None:
    async with rig(tmp_path, drop_after_commit=2) as r:
        await write_records(r.store, 25)
        await run_until_synced(r)
        assert r.delivered() == list(range(1, 26))
        assert r.hq.duplicates == []
        assert r.hq.duplicate_batches == 2  # both lost answers were resent and deduplicated
        assert r.hq.posts == len(r.hq.batch_counts) + 2


async def test_a_dropped_answer_is_a_transient_error_and_deletes_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path, drop_after_commit=1) as r:
        await write_records(r.store, 5)
        batch = await r.batcher.seal_next()
        assert batch is not None
        with pytest.raises(TransientError, match="POST /v1/batches"):
            await r.forwarder.push_all()
        assert r.hq.acked_through == 1  # HQ stored it ...
        assert (await r.store.unacked_batches(5))[0] == batch  # ... the agent still holds it
        assert await r.forwarder.push_all() == 5
        assert r.hq.duplicate_batches == 1 and r.delivered() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"ack_signer": NodeIdentity.generate()}, "did not verify"),
        ({"mangle_ack": lambda ack: ack[:-7]}, "did not verify"),
        ({"mangle_ack": lambda ack: ack[:-1] + bytes([ack[-1] ^ 1])}, "did not verify"),
        ({"mangle_ack": lambda ack: b"<html>proxy login</html>"}, "did not verify"),
        ({"ack_node": "nsomeoneelse"}, "not this node"),
    ],
    ids=["forged", "truncated", "flipped-signature", "captive-portal", "other-node"],
)
async def test_an_ack_that_does_not_verify_releases_nothing(
    tmp_path: Path, fault: dict[str, Any], message: str
) -> None:
    async with rig(tmp_path, **fault) as r:
        await write_records(r.store, 8)
        batch = await r.batcher.seal_next()
        assert batch is not None
        with pytest.raises(TransientError, match=message):
            await r.forwarder.push_all()
        assert await r.store.unacked_batches(5) == [batch]
        assert (await r.store.backlog())["changes"] == 8
        assert int((await r.store.meta())["acked_batch"]) == 0
        # Once the answers are sound again the resend is deduplicated: delivered once.
        r.hq.ack_signer = r.hq.ack_node = r.hq.mangle_ack = None
        assert await r.forwarder.push_all() == 8
        assert r.delivered() == list(range(1, 9)) and r.hq.duplicates == []


async def test_a_gap_is_rejected_and_deletes_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path, gap_expected=7) as r:
        await write_records(r.store, 4)
        batch = await r.batcher.seal_next()
        assert batch is not None
        assert await r.client.push(batch.sealed) == Gap(7)
        with pytest.raises(RejectedError, match="expects batch 7"):
            await r.forwarder.push_all()
        assert await r.store.unacked_batches(5) == [batch]
        assert (await r.store.backlog())["changes"] == 4


async def test_a_5xx_is_transient_and_a_4xx_is_rejected(tmp_path: Path) -> None:
    async with rig(tmp_path, fail_503=1) as r:
        await write_records(r.store, 2)
        batch = await r.batcher.seal_next()
        assert batch is not None
        with pytest.raises(TransientError, match="HQ answered 503: restarting"):
            await r.client.push(batch.sealed)
        r.hq.refuse_status = 403
        with pytest.raises(RejectedError, match="HQ refused with 403: node is revoked"):
            await r.forwarder.push_all()
        assert await r.store.unacked_batches(5) == [batch]
        assert (await r.store.backlog())["changes"] == 2


async def test_unreachable_hq_is_transient(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    hq = FakeHQ(agent=identity)
    async with serve(hq.app()) as server:
        url = base_url(server)
    async with HQClient(hq.enrolment(url), identity, timeout_s=2) as client:
        with pytest.raises(TransientError, match="POST /v1/batches"):
            await client.push(b"anything")


# ---- pull ---------------------------------------------------------------------------------------


def remote(key: str, seq: int, origin: str = "nremote", **fields: Any) -> Change:
    return Change(
        COLLECTION, key, "upsert", {KEY_FIELD: key, **fields}, pack(system_ms()), 0, origin, seq
    )


async def test_pull_applies_feed_pages_and_advances_the_cursor(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        own = r.hq.agent.node_id
        r.hq.feed = [
            [remote("h1", 1, name="From HQ"), remote("h2", 2, name="Also")],
            [remote("h3", 3, name="Third"), remote("mine", 9, origin=own, name="Echo")],
        ]
        assert await r.forwarder.pull_all() == 3
        assert r.hq.pulls == [0, 1]
        assert await r.store.get(COLLECTION, "h1") == {KEY_FIELD: "h1", "name": "From HQ"}
        assert await r.store.get(COLLECTION, "h3") == {KEY_FIELD: "h3", "name": "Third"}
        assert await r.store.get(COLLECTION, "mine") is None  # own echo skipped
        assert int((await r.store.meta())["feed_cursor"]) == 2
        assert r.forwarder.counters.changes_pulled == 4
        assert (await r.store.backlog())["changes"] == 0  # nothing pulled is pushed back

        assert await r.forwarder.pull_all() == 0
        assert r.hq.pulls == [0, 1, 2]


async def test_a_refused_push_does_not_cut_the_office_off_from_hqs_data(tmp_path: Path) -> None:
    async with rig(tmp_path, gap_expected=7) as r:
        await write_records(r.store, 2)
        r.hq.feed = [[remote("h1", 1)]]
        with pytest.raises(RejectedError, match="expects batch 7"):
            await r.forwarder.sync_once()
        assert await r.store.get(COLLECTION, "h1") is not None  # pulled all the same
        assert (await r.store.backlog())["changes"] == 2  # and nothing of ours deleted


async def test_a_feed_page_not_signed_by_hq_is_refused(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.hq.feed = [[remote("h1", 1)]]
        r.hq.identity = NodeIdentity.generate()  # HQ's key no longer matches the pinned one
        with pytest.raises(TransientError, match="did not verify"):
            await r.forwarder.pull_all()
        assert await r.store.get(COLLECTION, "h1") is None
        assert int((await r.store.meta())["feed_cursor"]) == 0


# ---- TLS ----------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_file: Path
    server: ssl.SSLContext


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(tmp_path: Path, server_ip: str = "127.0.0.1") -> Pki:
    """A throwaway CA and a server certificate for `server_ip` (IP SAN), both valid for a day."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fieldsync test CA"))
        .issuer_name(_name("fieldsync test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_ip))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = tmp_path / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return Pki(ca_file, server)


async def test_https_with_the_ca_bundle_delivers(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    identity = NodeIdentity.generate()
    hq = FakeHQ(agent=identity)
    async with (
        serve(hq.app(), ssl=pki.server) as server,
        open_store(tmp_path / "agent.db", identity.node_id) as store,
    ):
        url = base_url(server)
        assert url.startswith("https://127.0.0.1:")
        await write_records(store, 12)
        batcher = Batcher(store, identity, max_changes=5, max_bytes=1 << 20, window=2, zstd_level=3)
        await batcher.seal_next()
        async with HQClient(
            hq.enrolment(url), identity, ca_bundle=pki.ca_file, timeout_s=5
        ) as client:
            forwarder = Forwarder(
                store,
                client,
                batcher,
                backoff=Backoff(0.01, 0.05),
                pull_interval_s=1,
                feed_page_size=10,
            )
            assert await forwarder.push_all() == 12
            assert await forwarder.pull_all() == 0
        assert sorted(s for _, s in hq.applied) == list(range(1, 13))


@pytest.mark.parametrize("trust", ["system store", "another CA", "wrong host"])
async def test_https_without_a_trusted_certificate_is_refused(tmp_path: Path, trust: str) -> None:
    pki = make_pki(tmp_path / "hq", server_ip="127.0.0.2" if trust == "wrong host" else "127.0.0.1")
    ca_bundle = {
        "system store": None,
        "another CA": make_pki(tmp_path / "other").ca_file,
        "wrong host": pki.ca_file,
    }[trust]
    identity = NodeIdentity.generate()
    hq = FakeHQ(agent=identity)
    async with serve(hq.app(), ssl=pki.server) as server:
        async with HQClient(
            hq.enrolment(base_url(server)), identity, ca_bundle=ca_bundle, timeout_s=5
        ) as client:
            with pytest.raises(TransientError) as caught:
                await client.push(b"sealed")
        assert "certificate verify failed" in str(caught.value).lower()
        assert hq.posts == 0


# ---- enrolment ----------------------------------------------------------------------------------


def enroll_app(
    hq: NodeIdentity, answer_node: str | None = None, *, name: str | None = None
) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body["token"] != "good-token":
            return web.json_response({"error": "bad_token", "message": "token expired"}, status=403)
        public_key = unb64(body["public_key"], "public_key")
        return web.json_response(
            {
                "node_id": answer_node or node_id_for(public_key),
                "hq_node_id": hq.node_id,
                "hq_public_key": b64(hq.public_key),
                "hq_time": system_ms(),
                **({"name": name} if name is not None else {}),
            }
        )

    app = web.Application()
    app.router.add_post(ENROLL_PATH, handler)
    return app


async def test_enroll_pins_hq_and_round_trips_through_hq_json(tmp_path: Path) -> None:
    identity, hq = NodeIdentity.generate(), NodeIdentity.generate()
    async with serve(enroll_app(hq)) as server:
        url = base_url(server)
        enrolment = await enroll(url + "/", "good-token", identity, "field-1")
    assert enrolment == Enrolment(url, identity.node_id, hq.node_id, hq.public_key)
    assert_saves_atomically(enrolment, tmp_path)


async def test_enroll_keeps_the_name_hq_gave_not_the_one_sent(tmp_path: Path) -> None:
    """HQ names a node after its enrolment token (issue 9, defect 5); the agent says that name."""
    identity, hq = NodeIdentity.generate(), NodeIdentity.generate()
    async with serve(enroll_app(hq, name="kakuma-office")) as server:
        enrolment = await enroll(base_url(server), "good-token", identity, "laptop-7")
    assert enrolment.name == "kakuma-office"
    assert_saves_atomically(enrolment, tmp_path)


def assert_saves_atomically(enrolment: Enrolment, folder: Path) -> None:
    path = folder / "hq.json"
    enrolment.save(path)
    assert Enrolment.load(path) == enrolment
    assert [p.name for p in folder.iterdir()] == ["hq.json"]  # no temp file left


@pytest.mark.parametrize(
    ("token", "answer_node", "error", "message"),
    [
        ("old-token", None, RejectedError, "403: token expired"),
        ("good-token", "nimpostor", RejectedError, "registered node nimpostor"),
    ],
)
async def test_enroll_refusals_are_rejected_errors(
    token: str, answer_node: str | None, error: type[Exception], message: str
) -> None:
    identity, hq = NodeIdentity.generate(), NodeIdentity.generate()
    async with serve(enroll_app(hq, answer_node)) as server:
        with pytest.raises(error, match=message):
            await enroll(base_url(server), token, identity, "field-1")


async def test_after_a_failure_a_refused_pull_does_not_stop_the_push(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await write_records(r.store, 2)
        r.forwarder.backoff.failures = 1  # the last sync failed: the pull probes the link first
        r.hq.feed_status = 403
        with pytest.raises(RejectedError):
            await r.forwarder.sync_once()
        assert len(r.hq.applied) == 2  # pushed all the same


async def test_a_feed_that_keeps_failing_does_not_stop_uploads_for_good(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await write_records(r.store, 2)
        r.hq.feed_status = 503  # looks like the link being down
        r.forwarder.backoff.failures = 1
        with pytest.raises(TransientError):
            await r.forwarder.sync_once()
        assert r.hq.posts == 0  # probed, link "down": nothing sealed or sent
        r.forwarder.backoff.failures = PROBE_EVERY
        with pytest.raises(TransientError):
            await r.forwarder.sync_once()
        assert len(r.hq.applied) == 2  # every PROBE_EVERY-th attempt pushes regardless
