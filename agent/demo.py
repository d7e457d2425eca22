"""`make run`: HQ on embedded SQLite plus one agent, syncing generated field data, on this machine.

The story a newcomer sees: the agent enrols with HQ, HQ goes away (a field office loses its link),
field staff keep registering beneficiaries and recording distributions, the agent queues them
durably, HQ comes back, the backlog drains, and HQ holds every record exactly once. Everything runs
as real processes (`fieldsync-hq serve`, `fieldsync-agent run`) in ./.demo; Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import fieldgen
from agent.capture.guard import client_headers
from protocol.collections import load_collections

DEMO_DIR = Path(".demo")
EXAMPLE_COLLECTIONS = Path(__file__).resolve().parent.parent / "config" / "collections.example.toml"
# Every N-th beneficiary is entered with a household size that does not match its members, as
# happens on paper-to-tablet entry: the agent's rules send those to the local error queue.
MISTAKE_EVERY = 997
# The environment packaging/*.service give the daemons, so the demo and the benchmarks measure what
# ships: two malloc arenas keep the agent's memory flat with its few threads.
DAEMON_ENV = {**os.environ, "MALLOC_ARENA_MAX": "2"}
BULK_LINES = 500
# Distributions happen in rounds: weekly distribution days, so HQ's daily totals per site are few.
DISTRIBUTION_ROUNDS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class LocalDeployment:
    """HQ and one agent as real processes on 127.0.0.1, in one folder: used by `make run`, the
    benchmarks and the end-to-end tests, so all three exercise exactly what an operator runs."""

    def __init__(
        self,
        root: Path,
        *,
        sync: dict[str, Any] | None = None,
        hq_settings: dict[str, Any] | None = None,
        agent_settings: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.hq_port = _free_port()
        self.api_port = _free_port()
        self.hq_config = root / "hq.toml"
        self.agent_config = root / "agent.toml"
        self.hq_proc: subprocess.Popen[str] | None = None
        self.agent_proc: subprocess.Popen[str] | None = None
        self.procs: list[subprocess.Popen[str]] = []
        self.hq_settings = hq_settings or {}
        self.agent_settings = agent_settings or {}
        self.sync = {
            "backoff_initial_s": 0.5,
            "backoff_max_s": 2.0,
            "pull_interval_s": 1.0,
            **(sync or {}),
        }
        self._write_configs()

    def _write_configs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.hq_settings.items())
        self.hq_config.write_text(
            f'[hq]\ndata_dir = "{(self.root / "hq").resolve()}"\n'
            f'listen = "127.0.0.1:{self.hq_port}"\nlog_level = "warning"\n{extra}'
        )
        sync = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.sync.items())
        agent = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.agent_settings.items())
        self.agent_config.write_text(
            f'[agent]\ndata_dir = "{self.agent_dir}"\nname = "field-office-1"\n'
            f'listen = "127.0.0.1:{self.api_port}"\nlog_level = "error"\n{agent}\n'
            f"[sync]\n{sync}\n"
            '[collections.beneficiaries]\nkey = "beneficiary_id"\n\n'
            '[collections.distributions]\nkey = "distribution_id"\n'
        )

    @property
    def hq_url(self) -> str:
        return f"http://127.0.0.1:{self.hq_port}"

    def run_cli(self, *args: str) -> str:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self, args: list[str], ready: str, timeout_s: float = 30) -> subprocess.Popen[str]:
        """Start a daemon and wait for the line on stdout that says it is serving."""
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=None, text=True, env=DAEMON_ENV
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([proc.stdout], [], [], left)[0]:
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(args[:2])} exited (status {proc.wait()})")
            if ready in line:
                return proc
        raise RuntimeError(f"{' '.join(args[:2])} did not become ready in {timeout_s:.0f} s")

    def start_hq(self) -> subprocess.Popen[str]:
        self.hq_proc = self.start(
            [_bin("fieldsync-hq"), "serve", "--config", str(self.hq_config)], "listening on"
        )
        return self.hq_proc

    def start_agent(self) -> subprocess.Popen[str]:
        self.agent_proc = self.start(
            [_bin("fieldsync-agent"), "run", "--config", str(self.agent_config)], "listening on"
        )
        return self.agent_proc

    def enroll(self) -> str:
        """Initialise the agent and enrol it with HQ (started for the purpose if it is down)."""
        started_here = self.hq_proc is None
        if started_here:
            self.start_hq()
        token = self.run_cli(
            _bin("fieldsync-hq"),
            "token",
            "create",
            "--config",
            str(self.hq_config),
            "--node",
            "field-office-1",
        )
        agent_cli = _bin("fieldsync-agent")
        lines = [
            self.run_cli(agent_cli, "init", "--config", str(self.agent_config)),
            self.run_cli(
                agent_cli, "enroll", "--config", str(self.agent_config), self.hq_url, token
            ),
        ]
        if started_here and self.hq_proc is not None:
            self.stop(self.hq_proc)
        return "\n".join(lines)

    def kill(self, proc: subprocess.Popen[str]) -> None:
        """SIGKILL: no cleanup, no flush; what a power cut or the OOM killer does."""
        proc.kill()
        proc.wait()
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[str]) -> None:
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)
        if proc is self.hq_proc:
            self.hq_proc = None
        if proc is self.agent_proc:
            self.agent_proc = None

    def peak_rss_mb(self, proc: subprocess.Popen[str]) -> float:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget(proc)

    @property
    def agent_dir(self) -> Path:
        """The agent's data folder (agent.db, node.key, api-token)."""
        return (self.root / "agent").resolve()

    def api_headers(self, path: str = "") -> dict[str, str]:
        """What an app sends the local API: the token from the data folder, the content type."""
        return client_headers(self.agent_dir, path)

    def api(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=body,
            method=method,
            headers=self.api_headers(path),
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def status(self) -> dict[str, Any]:
        return dict(self.api("GET", "/v1/status"))

    def hq_count(self, collection: str) -> int:
        out = self.run_cli(
            _bin("fieldsync-hq"), "records", "--config", str(self.hq_config), collection, "--count"
        )
        return int(out.split()[0])

    def wait_drained(self, timeout_s: float = 600) -> dict[str, Any]:
        """Poll the agent until its backlog is empty; returns the final status."""
        deadline = time.monotonic() + timeout_s
        while (state := self.status())["backlog_changes"] > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"backlog did not drain in {timeout_s:.0f} s: {state}")
            time.sleep(0.1)
        return state

    def shutdown(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Demo:
    """The `make run` story on top of a LocalDeployment."""

    def __init__(self, root: Path, count: int) -> None:
        self.exports = (root / "exports").resolve()
        self.exports.mkdir(parents=True)
        routes = root / "routes.toml"
        # HQ routes everything it receives onward: here to JSONL files, as it would to a finance
        # database, a CRM or a message bus (see config/routes.example.toml).
        routes.write_text(
            "[routes.archive]\n"
            'description = "every field record, as JSONL files"\n'
            'sources = ["beneficiaries", "distributions", "distribution_totals"]\n'
            "batch_size = 500\n\n"
            "[routes.archive.sink]\n"
            'type = "files"\n'
            f'directory = "{self.exports}"\n'
        )
        # The agent checks records against the example collections file (types and rules) when the
        # repository's config/ is at hand; refused records wait in its error queue. HQ applies the
        # same file's conflict policies.
        collections = (
            {"collections_file": str(EXAMPLE_COLLECTIONS)} if EXAMPLE_COLLECTIONS.exists() else {}
        )
        self.deployment = LocalDeployment(
            root,
            hq_settings={"routes_file": str(routes.resolve()), **collections},
            agent_settings=collections,
        )
        self.refused = 0
        self.root = root
        self.count = count
        # With the example collections file, distributions stay on the agent and HQ receives
        # per-site daily totals (forward = "summary"); these are the totals HQ must end up with.
        self.summarised = bool(collections) and _summarised()
        self.expected: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)

    def routed(self) -> int:
        """Lines in the route's export files (finished and in progress)."""
        return sum(
            sum(1 for _ in path.open(encoding="utf-8"))
            for path in self.exports.iterdir()
            if path.suffix in (".jsonl", ".part")
        )

    def wait_routed(self, expected: int, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while (done := self.routed()) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return done

    def capture(self) -> tuple[int, int, float]:
        """Post generated records to the agent's local API; returns (records, JSON+gzip bytes, s)."""
        half = self.count // 2
        plan = [("beneficiaries", half), ("distributions", self.count - half)]
        total = gzip_bytes = 0
        started = time.monotonic()
        for collection, count in plan:
            for start in range(0, count, BULK_LINES):
                size = min(BULK_LINES, count - start)
                if collection == "distributions":
                    records = list(
                        fieldgen.distributions(size, start=start, rounds=DISTRIBUTION_ROUNDS)
                    )
                    for r in records:
                        for line in r["items"]:
                            where = (r["site"], r["distribution_date"], line["unit"])
                            self.expected[where] += Decimal(str(line["quantity"]))
                else:
                    records = list(fieldgen.records(collection, size, start=start))
                if collection == "beneficiaries":
                    for i, record in enumerate(records, start=start):
                        if i % MISTAKE_EVERY == MISTAKE_EVERY - 1:
                            record["household_size"] = len(record["members"]) + 1
                body = b"\n".join(json.dumps(r).encode() for r in records)
                answer = self.deployment.api("POST", f"/v1/collections/{collection}/bulk", body)
                self.refused += int(answer.get("queued_errors", 0))
                gzip_bytes += len(gzip.compress(json.dumps(records).encode(), compresslevel=6))
                total += len(records)
        return total, gzip_bytes, time.monotonic() - started

    def run(self) -> None:
        d = self.deployment
        say(f"fresh demo folder {self.root}/; HQ will listen on {d.hq_url}")
        d.start_hq()
        for line in d.enroll().splitlines():
            say(line)
        assert d.hq_proc is not None
        d.stop(d.hq_proc)
        say("HQ is now unreachable: the field office works offline")
        d.start_agent()
        records, gzip_bytes, capture_s = self.capture()
        queued = d.status()
        say(
            f"captured {records:,} records in {capture_s:.1f} s through the local API; "
            f"{queued['backlog_changes']:,} changes queued ({queued['backlog_bytes'] / 1e6:.1f} MB)"
        )
        say(f"agent's last error: {queued['last_error']}")
        say("HQ is back: syncing")
        d.start_hq()
        started = time.monotonic()
        state = d.wait_drained()
        sync_s = time.monotonic() - started
        at_hq = {c: d.hq_count(c) for c in ("beneficiaries", "distributions")}
        totals = self.hq_totals() if self.summarised else {}
        wire = state["bytes_sent"]
        print()
        print("fieldsync demo summary")
        print(f"  records captured offline   {records:,}")
        print(f"  batches sent               {state['acked_batches']:,}")
        print(f"  bytes on the wire          {wire:,} ({wire / records:.0f} B/record)")
        print(
            f"  same data as JSON+gzip -6  {gzip_bytes:,} ({gzip_bytes / records:.0f} B/record): "
            f"fieldsync sends {wire / gzip_bytes:.2f}x"
        )
        print(f"  sync time after HQ return  {sync_s:.1f} s ({records / sync_s:,.0f} records/s)")
        for collection, n in at_hq.items():
            print(f"  records at HQ              {n:,} {collection}")
        stored = records - self.refused
        forwarded = stored
        totals_ok = True
        if self.summarised:
            kept = self.count - self.count // 2
            forwarded = stored - kept + len(totals)
            totals_ok = totals == dict(self.expected)
            print(
                f"  distributions summarised   {kept:,} kept on the agent; HQ holds "
                f"{len(totals):,} daily totals per site and unit, "
                f"{'equal to' if totals_ok else 'DIFFERENT FROM'} the totals of what was recorded"
            )
            for (site, day, unit), quantity in sorted(totals.items())[:3]:
                print(f"                             {day} {site}: {quantity} {unit}")
        routed = self.wait_routed(forwarded)
        print(f"  routed onward by HQ        {routed:,} records to {self.exports}/")
        if self.refused:
            print(
                f"  refused at the edge        {self.refused:,} records broke a rule and wait in the "
                "agent's error queue:\n"
                f"                             {_bin('fieldsync-agent')} errors list "
                f"--config {d.agent_config}"
            )
        ok = sum(at_hq.values()) == forwarded - len(totals) and routed == forwarded and totals_ok
        print(f"  result                     {'all records at HQ, once' if ok else 'MISMATCH'}")
        print(f"\nData stays in {self.root}/ (HQ: hq/hq.db, agent: agent/agent.db).")
        if not ok:
            raise RuntimeError("HQ does not hold every record")

    def hq_totals(self) -> dict[tuple[str, str, str], Decimal]:
        """HQ's distribution totals per (site, day, unit): summed over the nodes' summaries."""
        d = self.deployment
        out = d.run_cli(
            _bin("fieldsync-hq"), "records", "--config", str(d.hq_config), "distribution_totals"
        )
        totals: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
        for line in out.splitlines():
            data = json.loads(line)["data"]
            totals[(data["site"], data["window_start"], data["unit"])] += Decimal(data["quantity"])
        return dict(totals)


def _summarised() -> bool:
    """True if the example collections file forwards distributions as summaries."""
    return load_collections(EXAMPLE_COLLECTIONS)["distributions"].forward == "summary"


def main() -> int:
    count = int(os.environ.get("FIELDSYNC_DEMO_RECORDS", "20000"))
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    demo = Demo(DEMO_DIR, count)
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping HQ and agent", flush=True)
        return 130
    except (RuntimeError, OSError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        demo.deployment.shutdown()


if __name__ == "__main__":
    sys.exit(main())
