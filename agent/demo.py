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
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent import fieldgen

DEMO_DIR = Path(".demo")
BULK_LINES = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class Demo:
    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.count = count
        self.hq_port = _free_port()
        self.api_port = _free_port()
        self.hq_config = root / "hq.toml"
        self.agent_config = root / "agent.toml"
        self.procs: list[subprocess.Popen[str]] = []

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def write_configs(self) -> None:
        self.root.mkdir(parents=True)
        self.hq_config.write_text(
            f'[hq]\ndata_dir = "{(self.root / "hq").resolve()}"\n'
            f'listen = "127.0.0.1:{self.hq_port}"\nlog_level = "warning"\n'
        )
        self.agent_config.write_text(
            f'[agent]\ndata_dir = "{(self.root / "agent").resolve()}"\nname = "demo-field-office"\n'
            f'listen = "127.0.0.1:{self.api_port}"\nlog_level = "error"\n\n'
            "[sync]\nbackoff_initial_s = 0.5\nbackoff_max_s = 2.0\npull_interval_s = 1.0\n\n"
            '[collections.beneficiaries]\nkey = "beneficiary_id"\n\n'
            '[collections.distributions]\nkey = "distribution_id"\n'
        )

    def run_cli(self, *args: str) -> str:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self, args: list[str], ready: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=None, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args[0]} exited before it was ready")
            if ready in line:
                return proc
        raise RuntimeError(f"{args[0]} did not become ready in 30 s")

    def start_hq(self) -> subprocess.Popen[str]:
        return self.start(
            [_bin("fieldsync-hq"), "serve", "--config", str(self.hq_config)], "listening on"
        )

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def api(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=body, method=method
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

    def capture(self) -> tuple[int, int, float]:
        """Post generated records to the agent's local API; returns (records, JSON+gzip bytes, s)."""
        half = self.count // 2
        plan = [("beneficiaries", half), ("distributions", self.count - half)]
        total = gzip_bytes = 0
        started = time.monotonic()
        for collection, count in plan:
            for start in range(0, count, BULK_LINES):
                records = list(
                    fieldgen.records(collection, min(BULK_LINES, count - start), start=start)
                )
                body = b"\n".join(json.dumps(r).encode() for r in records)
                self.api("POST", f"/v1/collections/{collection}/bulk", body)
                gzip_bytes += len(gzip.compress(json.dumps(records).encode(), compresslevel=6))
                total += len(records)
        return total, gzip_bytes, time.monotonic() - started

    def run(self) -> None:
        self.say(f"fresh demo folder {self.root}/ (HQ on port {self.hq_port})")
        self.write_configs()
        hq = self.start_hq()
        token = self.run_cli(
            _bin("fieldsync-hq"),
            "token",
            "create",
            "--config",
            str(self.hq_config),
            "--node",
            "demo-field-office",
        )
        agent_cli = [_bin("fieldsync-agent")]
        self.say(self.run_cli(*agent_cli, "init", "--config", str(self.agent_config)))
        self.say(
            self.run_cli(
                *agent_cli,
                "enroll",
                "--config",
                str(self.agent_config),
                f"http://127.0.0.1:{self.hq_port}",
                token,
            )
        )
        self.stop(hq)
        self.say("HQ is now unreachable: the field office works offline")
        self.start([*agent_cli, "run", "--config", str(self.agent_config)], "listening on")
        records, gzip_bytes, capture_s = self.capture()
        queued = self.status()
        self.say(
            f"captured {records:,} records in {capture_s:.1f} s through the local API; "
            f"{queued['backlog_changes']:,} changes queued ({queued['backlog_bytes'] / 1e6:.1f} MB), "
            f"last error: {queued['last_error']}"
        )
        self.say("HQ is back: syncing")
        self.start_hq()
        started = time.monotonic()
        while (state := self.status())["backlog_changes"] > 0:
            if time.monotonic() - started > 600:
                raise RuntimeError(f"backlog did not drain in 10 minutes: {state}")
            time.sleep(0.2)
        sync_s = time.monotonic() - started
        at_hq = {c: self.hq_count(c) for c in ("beneficiaries", "distributions")}
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
        ok = sum(at_hq.values()) == records
        print(f"  result                     {'all records at HQ, once' if ok else 'MISMATCH'}")
        print(f"\nData stays in {self.root}/ (HQ: hq/hq.db, agent: agent/agent.db).")
        if not ok:
            raise RuntimeError("HQ does not hold every record")

    def shutdown(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


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
        demo.shutdown()


if __name__ == "__main__":
    sys.exit(main())
