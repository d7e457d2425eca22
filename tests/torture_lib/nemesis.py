"""The faults: a seeded plan per cycle (`plan_cycle`, pure) and the code that applies and heals them.

Kinds, each chosen per cycle from the run's RNG:

    kill-agent    SIGKILL one agent at a random moment; restart it after a random downtime
    kill-hq       SIGKILL HQ (and with it the router); restart it after a random downtime
    proxy         one agent's link to HQ: reset, truncate (after N bytes, either way),
                  blackhole, delay or a rate cap, for part of the cycle
    disk-full     fill one agent's tmpfs data folder to the last byte for a while, then free it
    clock-jump    SIGKILL one agent and restart it under `faketime` a few minutes to hours ahead
                  of or behind the real clock (or back on it); it stays there until its next jump

At most one process fault (kill or clock jump) per process and one link fault per agent per
cycle, all healed by the end of the cycle. The plan depends only on the seed; when exactly the
processes are in their life cycle does not, so a failing seed reproduces the schedule, not
necessarily the exact interleaving.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

KIND_WEIGHTS = {
    "kill-agent": 3.0,
    "kill-hq": 2.0,
    "proxy": 4.0,
    "disk-full": 1.5,
    "clock-jump": 1.5,
}
PROXY_MODES = ("reset", "truncate", "blackhole", "delay", "rate")
CLOCK_OFFSETS = ("+5m", "+40m", "+2h", "+9h", "-5m", "-45m", "-3h", "-11h")
FAULTS_PER_CYCLE: tuple[tuple[int, float], ...] = ((0, 1.0), (1, 4.0), (2, 4.0), (3, 2.0))


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # an agent's name, or "hq"
    at: float  # seconds into the cycle
    duration: float  # downtime (kills) or how long the fault holds
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}({self.target}{',' + extra if extra else ''})@{self.at:.1f}+{self.duration:.1f}s"


def plan_cycle(
    rng: random.Random, cycle_s: float, agents: list[str], kinds: set[str]
) -> list[Fault]:
    """The faults of one cycle: a pure function of the RNG's state and the arguments."""
    counts = [n for n, _ in FAULTS_PER_CYCLE]
    wanted = rng.choices(counts, [weight for _, weight in FAULTS_PER_CYCLE])[0]
    usable = [k for k in KIND_WEIGHTS if k in kinds]
    faults: list[Fault] = []
    process_busy: set[str] = set()
    link_busy: set[str] = set()
    disk_busy: set[str] = set()
    for _ in range(wanted * 3):  # a few tries: some picks collide with a busy target
        if len(faults) >= wanted or not usable:
            break
        kind = rng.choices(usable, [KIND_WEIGHTS[k] for k in usable])[0]
        target = "hq" if kind == "kill-hq" else rng.choice(agents)
        busy = {"proxy": link_busy, "disk-full": disk_busy}.get(kind, process_busy)
        if target in busy:
            continue
        busy.add(target)
        at = rng.uniform(0, cycle_s * 0.6)
        left = cycle_s - at
        params: dict[str, Any] = {}
        if kind in ("kill-agent", "kill-hq"):
            duration = rng.choice((0.0, rng.uniform(0, 1.5)))
        elif kind == "clock-jump":
            duration = 0.0
            params["clock"] = rng.choice((*CLOCK_OFFSETS, ""))
        elif kind == "disk-full":
            duration = rng.uniform(0.5, max(0.6, left * 0.8))
        else:
            duration = rng.uniform(0.3, max(0.4, left * 0.8))
            mode = rng.choice(PROXY_MODES)
            params["mode"] = mode
            if mode == "truncate":
                params["after"] = rng.choice((0, 1, 40, 200, 1000, 5000, 20000))
                params["dir"] = rng.choice(("up", "down"))
            elif mode == "delay":
                params["ms"] = rng.choice((100, 300, 600, 1200))
            elif mode == "rate":
                params["bps"] = rng.choice((5_000, 10_000, 40_000))  # 40-320 kbit/s
        faults.append(Fault(kind, target, at, duration, params))
    return faults


async def sleep_until(start: float, offset: float) -> None:
    loop = asyncio.get_running_loop()
    delay = start + offset - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
