"""Scheduling state of a distributed build: which units wait, run, are done; per-worker stats.

Thread-safe (one driver thread per worker calls it). Pure bookkeeping: no HTTP, no files.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from ..errors import KBError
from .plan import Unit


@dataclass
class WorkerStats:
    units: int = 0
    trajectories: int = 0
    busy_s: float = 0.0  # seconds from queueing a unit to having it verified, over finished units
    failures: int = 0
    state: str = "starting"  # starting, ready, retired
    note: str = ""  # why it was retired, or the last failure

    @property
    def per_minute(self) -> float:
        return 60.0 * self.trajectories / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class Scheduler:
    units: list[Unit]
    held: set[int]
    workers: list[str]
    max_attempts: int = 4
    pending: deque = field(init=False)
    running: dict[int, str] = field(init=False, default_factory=dict)
    done: set[int] = field(init=False)
    attempts: dict[int, int] = field(init=False, default_factory=dict)
    failed_on: dict[int, set[str]] = field(init=False, default_factory=dict)
    reasons: dict[int, list[str]] = field(init=False, default_factory=dict)
    stats: dict[str, WorkerStats] = field(init=False)
    fatal: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.pending = deque(u.uid for u in self.units if u.uid not in self.held)
        self.done = set(self.held)
        self.stats = {w: WorkerStats() for w in self.workers}
        self.by_id = {u.uid: u for u in self.units}
        self.cond = threading.Condition()
        self.dispatched: list[tuple[int, str]] = []  # (unit, worker), in order

    # --- queries ---------------------------------------------------------------------------
    def finished(self) -> bool:
        with self.cond:
            return self.fatal is not None or len(self.done) == len(self.units)

    def live_workers(self) -> list[str]:
        return [w for w, s in self.stats.items() if s.state != "retired"]

    def trajectories_done(self) -> int:
        with self.cond:
            return sum(self.by_id[u].count for u in self.done)

    # --- transitions -----------------------------------------------------------------------
    def next_unit(self, worker: str) -> tuple[Unit, int] | None:
        """The next unit for an idle worker, and its attempt number; None when there is nothing
        for it now. A unit that failed on this worker goes elsewhere while another live worker
        has not failed it yet."""
        with self.cond:
            if self.fatal is not None:
                return None
            live = set(self.live_workers())
            for uid in self.pending:
                if worker in self.failed_on.get(uid, set()) and not live <= self.failed_on[uid]:
                    continue
                self.pending.remove(uid)
                self.running[uid] = worker
                self.attempts[uid] = self.attempts.get(uid, 0) + 1
                self.dispatched.append((uid, worker))
                return self.by_id[uid], self.attempts[uid]
            return None

    def unit_done(self, uid: int, worker: str, seconds: float) -> bool:
        """Record a unit verified and added to the KB. False if it was already done (a stale copy)."""
        with self.cond:
            self.running.pop(uid, None)
            if uid in self.done:
                return False
            self.done.add(uid)
            s = self.stats[worker]
            s.units += 1
            s.trajectories += self.by_id[uid].count
            s.busy_s += seconds
            s.note = ""
            self.cond.notify_all()
            return True

    def unit_failed(self, uid: int, worker: str, reason: str) -> None:
        """Requeue a unit (at the front); a unit failing `max_attempts` times stops the build."""
        with self.cond:
            self.running.pop(uid, None)
            self.stats[worker].failures += 1
            self.stats[worker].note = reason
            if uid in self.done:
                return
            self.failed_on.setdefault(uid, set()).add(worker)
            self.reasons.setdefault(uid, []).append(f"{worker}: {reason}")
            if self.attempts.get(uid, 0) >= self.max_attempts:
                self.fatal = f"unit {uid} failed {self.attempts[uid]} times:\n  " + "\n  ".join(self.reasons[uid])
            else:
                self.pending.appendleft(uid)
            self.cond.notify_all()

    def set_state(self, worker: str, state: str, note: str = "") -> None:
        with self.cond:
            self.stats[worker].state = state
            if note:
                self.stats[worker].note = note
            if state == "retired" and not self.live_workers() and len(self.done) < len(self.units):
                why = "\n  ".join(f"{w}: {s.note}" for w, s in self.stats.items())
                self.fatal = f"no worker left to build the remaining {len(self.units) - len(self.done)} units:\n  {why}"
            self.cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait(timeout)

    def check(self) -> None:
        if self.fatal is not None:
            raise KBError(self.fatal)


def format_table(stats: dict[str, WorkerStats], wall_s: float) -> str:
    """The per-worker table printed at the end of a build."""
    rows = [("worker", "units", "trajectories", "traj/min", "failures", "state / last problem")]
    for w, s in stats.items():
        rows.append((w, str(s.units), str(s.trajectories), f"{s.per_minute:.1f}", str(s.failures), f"{s.state} {s.note}".strip()))
    total = sum(s.trajectories for s in stats.values())
    rows.append(("all", str(sum(s.units for s in stats.values())), str(total), f"{60.0 * total / wall_s:.1f}" if wall_s > 0 else "0.0",
                 str(sum(s.failures for s in stats.values())), f"wall {wall_s:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)
