"""The coordinator of `python -m kb_tools build --workers URL,URL,...`.

Each worker is a ComfyUI server with this pack. One driver thread per worker:
probe it (a one-prompt Builder graph: its fingerprint carries the worker's model hash), then
take units from the scheduler while there are any: queue a CheckpointLoaderSimple + ReDiKBBuilder
graph, poll /history until it ends (or the unit times out, or the worker stops answering),
download the unit KB through the pack's read-only file route, verify it, add it to the build's KB,
and ask the worker to delete its copy. A failed unit goes back to the queue for another worker.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import KBError
from ..storage.disk_format import DEFAULT_STORED_STEPS, Fingerprint
from ..version import PACK_VERSION
from . import store as dist_store
from .client import ComfyClient, WorkerDown, WorkerRefused, execution_error
from .plan import Unit, build_id, check_held, parse_unit_kb_name, plan_units, probe_kb_name, unit_kb_name
from .schedule import Scheduler, format_table
from .verify import build_fingerprint, differences, unit_problems

MAX_UNIT_BYTES = 8 << 30  # refuse a download larger than this per file


@dataclass(frozen=True)
class Settings:
    """The Builder node's inputs, as `kb_tools build` takes them."""

    ckpt: str
    negative: str = ""
    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 6.0
    width: int = 64
    height: int = 64
    batch_size: int = 32
    seed_mode: str = "fixed"
    seed: int = 1024
    stored_steps: str = DEFAULT_STORED_STEPS


@dataclass(frozen=True)
class Limits:
    unit_size: int = 64
    unit_timeout: float = 1800.0  # seconds from queueing a unit to its /history entry
    probe_timeout: float = 600.0  # first model load included
    down_grace: float = 10.0  # seconds a worker may not answer before its unit is requeued
    poll: float = 0.5
    max_attempts: int = 4  # per unit, over all workers
    max_worker_failures: int = 3  # in a row, then the worker is retired
    backoff: float = 2.0  # seconds before retrying a worker that did not answer (doubles each time)


class UnitRejected(RuntimeError):
    """A finished unit failed verification; it is rebuilt elsewhere."""


def builder_graph(s: Settings, prompts: list[str] | tuple[str, ...], seed: int, kb_name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": s.ckpt}},
        "2": {"class_type": "ReDiKBBuilder", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompts": "\n".join(prompts), "negative": s.negative,
            "sampler_name": s.sampler, "scheduler": s.scheduler, "steps": s.steps, "cfg": s.cfg,
            "width": s.width, "height": s.height, "batch_size": s.batch_size, "seed_mode": s.seed_mode,
            "seed": seed, "stored_steps": s.stored_steps, "kb_name": kb_name, "prompts_file": ""}},
    }


class Coordinator:
    def __init__(self, workers: list[str], settings: Settings, prompts: list[str], out: Path, limits: Limits = Limits(),
                 log=None, client=ComfyClient) -> None:
        if not workers:
            raise KBError("--workers needs at least one ComfyUI server URL")
        dupes = [w for w, n in Counter(workers).items() if n > 1]
        if dupes:
            raise KBError(f"worker listed twice: {dupes[0]}")
        if any("\n" in p for p in prompts):
            raise KBError("a prompt may not contain a line break")
        self.workers = [w.rstrip("/") for w in workers]
        self.s, self.limits, self.out = settings, limits, Path(out)
        self.prompts = prompts
        self.units = plan_units(prompts, limits.unit_size, settings.seed_mode, settings.seed)
        self.bid = build_id(asdict(settings), prompts, limits.unit_size)
        self.run = secrets.token_hex(3)
        self.incoming = self.out.parent / f".{self.out.name}.incoming-{self.run}"
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.ref: Fingerprint | None = None
        self.probes: dict[str, Fingerprint | str] = {}
        self.dtype = "float16"  # what the workers' Builder stores (read from the probes)
        self.ref_ready = threading.Event()
        self.sched: Scheduler | None = None
        self.redispatched = 0
        self.client = client  # (url) -> a ComfyClient; unit tests pass a fake worker

    # --- the build ----------------------------------------------------------------------------
    def run_build(self, progress=None) -> Scheduler:
        held = {}
        if (self.out / "manifest.json").is_file():
            held = dist_store.units_held(self.out)
            bad = check_held(self.units, held)
            if bad:
                raise KBError(f"{self.out} holds units of another build ({bad[0]}); use the same prompts and --unit-size, or another --out")
            self.ref = dist_store.read_fingerprint(self.out)
            self.log(f"resuming {self.out}: {len(held)} of {len(self.units)} units already held")
        self.sched = Scheduler(self.units, set(held), self.workers, self.limits.max_attempts)
        self.incoming.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._drive, args=(w,), daemon=True, name=f"worker {w}") for w in self.workers]
        try:
            for t in threads:
                t.start()
            self._decide_reference()
            while not self.sched.finished():
                if progress:
                    progress(self.sched)
                self.sched.wait(self.limits.poll)
            if progress:
                progress(self.sched)
            self.sched.check()
        finally:
            self.sched.fatal = self.sched.fatal or ("stopped" if not self.sched.finished() else None)
            for t in threads:
                t.join(timeout=self.limits.down_grace + 35)
            shutil.rmtree(self.incoming, ignore_errors=True)
        n = dist_store.finalize(self.out)
        for w in self.workers:
            self.client(w).release(build=self.bid)
        self.wall_s = time.monotonic() - t0
        self.log(f"KB {self.out}: {n} entries from {len(self.units)} units")
        return self.sched

    def _decide_reference(self) -> None:
        """Reference model: the KB's when resuming, else the fingerprint most probes agree on
        (ties: the earliest worker in --workers). Workers that differ are refused."""
        deadline = time.monotonic() + self.limits.probe_timeout
        while self.ref is None and time.monotonic() < deadline and not self.sched.finished():
            if all(w in self.probes for w in self.workers):
                break
            time.sleep(self.limits.poll)
        if self.ref is None:
            good = [fp for w in self.workers if isinstance(fp := self.probes.get(w), Fingerprint)]
            if not good:
                why = "\n  ".join(f"{w}: {self.probes.get(w, 'no answer to the probe')}" for w in self.workers)
                self.sched.fatal = f"no worker could build a probe unit:\n  {why}"
                self.ref_ready.set()
                return
            counts = Counter(good)
            top = max(counts.values())
            self.ref = next(fp for fp in good if counts[fp] == top)
            if len(counts) > 1:
                self.log(f"workers disagree on the model; the build follows the majority (model_hash {self.ref.model_hash})")
        dist_store.open_target(self.out, self.ref, self.dtype, negative_prompt=self.s.negative)
        self.ref_ready.set()

    # --- one worker ---------------------------------------------------------------------------
    def _drive(self, worker: str) -> None:
        client = self.client(worker)
        sched = self.sched
        in_row = 0
        probed = False
        while not sched.finished():
            if not probed:
                try:
                    self._probe(client)
                    probed = True
                    in_row = 0
                    sched.set_state(worker, "ready")
                except WorkerRefused as e:
                    self.probes.setdefault(worker, f"refused: {e}")
                    self.log(f"refused worker {worker}: {e}")
                    sched.set_state(worker, "retired", f"refused: {e}")
                    return
                except (WorkerDown, KBError, UnitRejected) as e:
                    self.probes.setdefault(worker, str(e))
                    in_row += 1
                    if in_row >= self.limits.max_worker_failures:
                        self.log(f"gave up on worker {worker}: {e}")
                        sched.set_state(worker, "retired", str(e))
                        return
                    time.sleep(min(30.0, self.limits.backoff * 2.0 ** (in_row - 1)))
                continue
            job = sched.next_unit(worker)
            if job is None:
                sched.wait(self.limits.poll)
                continue
            unit, attempt = job
            name = unit_kb_name(self.bid, self.run, unit.uid, attempt)
            if attempt > 1:
                self.redispatched += 1
            self.log(f"unit {unit.uid} ({unit.count} prompts from #{unit.start}) -> {worker} (attempt {attempt})")
            t0 = time.monotonic()
            try:
                unit_dir, _fp, _dtype = self._run_unit(client, unit, name)
                added = dist_store.add_unit(self.out, unit_dir, unit)
                shutil.rmtree(unit_dir, ignore_errors=True)
                if sched.unit_done(unit.uid, worker, time.monotonic() - t0) and added:
                    self.log(f"unit {unit.uid} done on {worker} in {time.monotonic() - t0:.1f} s")
                in_row = 0
            except (WorkerDown, WorkerRefused, UnitRejected, KBError, OSError) as e:
                self.log(f"unit {unit.uid} failed on {worker}: {e}; requeued")
                sched.unit_failed(unit.uid, worker, str(e))
                in_row += 1
                if isinstance(e, WorkerDown):
                    probed = False  # it may come back restarted, with another model: probe again
                if in_row >= self.limits.max_worker_failures:
                    self.log(f"gave up on worker {worker} after {in_row} failures in a row")
                    sched.set_state(worker, "retired", str(e))
                    return
                time.sleep(min(30.0, self.limits.backoff * 2.0 ** (in_row - 1)) if isinstance(e, WorkerDown) else 0.0)
            finally:
                client.release([name])

    def _probe(self, client: ComfyClient) -> None:
        try:
            info = client.info()
        except WorkerRefused as e:
            raise WorkerRefused(f"it does not run this pack's routes ({e}); install ComfyUI-ReDi-Accelerate {PACK_VERSION} there") from e
        if info.get("pack_version") != PACK_VERSION:
            raise WorkerRefused(f"pack version: build has {PACK_VERSION!r}, worker has {info.get('pack_version')!r}; install the same pack version on every worker")
        self._cancel_orphans(client)
        name = probe_kb_name(self.bid, self.run)
        try:
            unit = Unit(-1, 0, self.units[0].prompts[:1], self.units[0].seed)
            unit_dir, fp, self.dtype = self._run_unit(client, unit, name, self.limits.probe_timeout, verify=False)
            shutil.rmtree(unit_dir, ignore_errors=True)
        finally:
            client.release([name])
        self.probes[client.base] = fp
        if not self.ref_ready.wait(self.limits.probe_timeout + 60):
            raise WorkerDown("no reference model was decided")
        if self.ref is None:
            raise WorkerDown("no reference model")
        diffs = differences(self.ref, build_fingerprint(fp, self.ref.seed))
        if diffs:
            raise WorkerRefused("it serves another model or settings than the build (" + "; ".join(diffs) + ")")

    def _cancel_orphans(self, client: ComfyClient) -> None:
        """Drop this build's units that a killed coordinator left queued or running on the worker."""
        q = client.get_json("/queue")
        for key in ("queue_running", "queue_pending"):
            for item in q.get(key, []):
                graph = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
                for node in graph.values():
                    parsed = parse_unit_kb_name(str(node.get("inputs", {}).get("kb_name", ""))) if isinstance(node, dict) else None
                    if parsed and parsed[0] == self.bid and parsed[1] != self.run:
                        self.log(f"cancelled unit {parsed[2]} of an earlier run on {client.base}")
                        client.cancel(item[1])

    def _run_unit(self, client: ComfyClient, unit: Unit, name: str, timeout: float | None = None,
                  verify: bool = True) -> tuple[Path, Fingerprint, str]:
        """Queue the unit, wait for it, download and verify it: (folder, fingerprint, dtype)."""
        pid = client.queue_prompt(builder_graph(self.s, unit.prompts, unit.seed, name))
        deadline = time.monotonic() + (timeout or self.limits.unit_timeout)
        down_since = None
        last_queue_check = time.monotonic()
        while True:
            if self.sched.fatal is not None:
                client.cancel(pid)
                raise WorkerDown("the build stopped")
            try:
                entry = client.history(pid)
                down_since = None
                if entry is None and time.monotonic() - last_queue_check > 5.0:
                    last_queue_check = time.monotonic()
                    if not client.in_queue(pid) and client.history(pid) is None:
                        raise WorkerDown(f"{client.base} lost the unit (it was restarted?)")
            except WorkerDown:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.limits.down_grace:
                    raise
                entry = None
            if entry is not None:
                break
            if time.monotonic() > deadline:
                client.cancel(pid)
                raise WorkerDown(f"unit timed out after {timeout or self.limits.unit_timeout:.0f} s on {client.base}")
            time.sleep(self.limits.poll)
        if entry["status"]["status_str"] != "success":
            raise WorkerRefused(f"the unit failed on the worker: {execution_error(entry)}")
        unit_dir = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.incoming))  # per download: probes share a name
        try:
            for f in dist_store.first_files():
                client.fetch(name, f, unit_dir / f, 16 << 20)
            for f in dist_store.rest_files(unit_dir):
                client.fetch(name, f, unit_dir / f, MAX_UNIT_BYTES)
            fp, entries, dtype = dist_store.read_unit(unit_dir)
            if verify and (problems := unit_problems(self.ref, unit, fp, entries)):
                raise UnitRejected("the unit does not match the build: " + "; ".join(problems))
        except KBError as e:
            shutil.rmtree(unit_dir, ignore_errors=True)
            raise UnitRejected(f"the unit's files failed verification: {e}") from e
        except BaseException:
            shutil.rmtree(unit_dir, ignore_errors=True)
            raise
        return unit_dir, fp, dtype


def progress_bar(stream=sys.stdout):
    """A whole-build bar: trajectories verified in the KB, units running, workers ready."""
    tty = stream.isatty()
    last = {"done": -1}

    def show(sched: Scheduler) -> None:
        total = sum(u.count for u in sched.units)
        done = sched.trajectories_done()
        if not tty and done == last["done"]:
            return
        last["done"] = done
        width = 30
        fill = int(width * done / max(total, 1))
        ready = sum(1 for s in sched.stats.values() if s.state == "ready")
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} trajectories, {len(sched.done)}/{len(sched.units)} units, "
                f"{len(sched.running)} running, {ready} workers ready")
        stream.write(("\r" + line) if tty else line + "\n")
        stream.flush()

    return show


def run(workers: list[str], settings: Settings, prompts: list[str], out: Path, limits: Limits = Limits()) -> Coordinator:
    """The CLI's entry: build, print the per-worker table, return the coordinator."""
    coord = Coordinator(workers, settings, prompts, out, limits)
    sched = coord.run_build(progress_bar())
    print()
    print(format_table(sched.stats, coord.wall_s))
    print(f"units dispatched: {len(sched.dispatched)} for {len(coord.units) - len(sched.held)} to build "
          f"({coord.redispatched} retries)")
    return coord
