"""A KB library: a folder of knowledge bases that picks, creates and fills itself.

    models/redi_kb/LIBRARY/
      sd15-euler-normal-20s-cfg6-64x64-3f2a9c/        one KB per sampling setting
      sd15-euler-normal-20s-cfg6-64x64-3f2a9c-g2/     its next generation (after a rotation)

For each run the library finds the KB whose fingerprint fits the run's (`kb_tools.storage.compat`
`incompatible`, minus the fields a library KB does not fix: it serves any seed through denoised
keys and stores its own steps), or creates an empty one with a deterministic, readable name.

Learning from use: `Recorder` appends finished full trajectories in a background thread under
the KB's writer lock (`kb_tools.storage.writer`), one commit per finished run, so a kill -9
leaves either the whole commit or nothing. Each commit carries a unit id "rec:" + the 12-hex
digests of its items (conditioning signature, seed, batch row): an item whose digest the KB
already holds is skipped (dedup under the lock, so two recorders at once never duplicate).

Size cap: the format is append-only (entries cannot be deleted), so at the cap the library
ROTATES: it writes a new generation KB holding a coverage-keeping subset of the old one
(greedy k-center on the denoised keys: the entries that lie farthest from those already
kept), then the new items; the old generation stays until `prune` removes it (a reader that
opened it keeps working).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import KBError
from .storage.commit_log import read_state, read_tail_state
from .storage.compat import incompatible
from .storage.disk_format import LOG, MANIFEST, Entry, Fingerprint, read_header
from .storage.knowledge_base import KnowledgeBase
from .storage.writer import append_batch_locked, create_kb, kb_lock

try:  # inside the pack, as ComfyUI imports it
    from ..redi_core.retrieval import signatures_match
except ImportError:  # the repository root on sys.path (CLI, scripts, tests)
    from redi_core.retrieval import signatures_match

# fields a library KB does not fix: any seed (denoised keys), its own stored steps; the negative
# prompt is compared by its conditioning signature with the encoder's float tolerance
FREE_FIELDS = ("stored_steps", "seed_mode", "seed", "negative_hash", "negative_cond")
STEP_FRACTIONS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_CAP = 5000
UNIT_PREFIX = "rec:"
DIGEST_HEX = 12
MAX_ITEMS_PER_UNIT = 19  # a unit id holds at most 256 characters: "rec:" + 19 x 13
NAME_MAX = 64
GEN_RE = re.compile(r"-g([0-9]{1,4})$")


def library_steps(steps: int) -> tuple[int, ...]:
    """The steps a library KB stores: key steps near 10-20% of the schedule, value steps 30-80%."""
    return tuple(sorted({min(max(1, round(f * steps)), steps - 1) for f in STEP_FRACTIONS}))


def library_fingerprint(fp: Fingerprint) -> Fingerprint:
    """The run's fingerprint as a library KB records it (any seed, the library's stored steps)."""
    return replace(fp, stored_steps=library_steps(fp.steps), seed_mode="range", seed=0, negative_hash="")


def fits(kb_fp: Fingerprint, run_fp: Fingerprint) -> bool:
    """Whether a KB with fingerprint `kb_fp` serves (and may record) a run with `run_fp`."""
    if [f for f in incompatible(kb_fp, run_fp) if f not in FREE_FIELDS]:
        return False
    return signatures_match(kb_fp.negative_cond, run_fp.negative_cond)


def _slug(text: str, n: int) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (s or "model")[:n].strip("-") or "model"


def kb_name(fp: Fingerprint, generation: int = 1) -> str:
    """Deterministic, readable: model-sampler-scheduler-steps-cfg-latent size-digest[-gN]."""
    core = {f: getattr(fp, f) for f in ("model_hash", "latent_shape", "sampler", "scheduler", "steps", "cfg", "sampling", "negative_cond")}
    digest = hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:6]
    c, h, w = fp.latent_shape
    head = f"{_slug(fp.model_name, 12)}-{_slug(fp.sampler, 12)}-{_slug(fp.scheduler, 10)}-{fp.steps}s-cfg{fp.cfg:g}-{w}x{h}"
    tail = f"-{digest}" + (f"-g{generation}" if generation > 1 else "")
    return head[: NAME_MAX - len(tail)].rstrip("-.") + tail


@dataclass
class LibraryKB:
    path: Path
    fingerprint: Fingerprint
    count: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def generation(self) -> int:
        m = GEN_RE.search(self.name)
        return int(m.group(1)) if m else 1

    @property
    def family(self) -> str:
        return GEN_RE.sub("", self.name)


class Library:
    """The KBs of one library folder."""

    def __init__(self, root: Path, cap: int = DEFAULT_CAP) -> None:
        self.root = Path(root)
        if cap < 2:
            raise KBError(f"a library's size cap must be at least 2 trajectories, not {cap}")
        self.cap = int(cap)

    def list(self) -> list[LibraryKB]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.is_symlink() and (d / MANIFEST).is_file():
                try:
                    header = read_header(d)
                    out.append(LibraryKB(d, header.fingerprint, read_tail_state(d, header).count))
                except KBError:
                    continue  # not ours to use (damaged or foreign): `kb_tools validate` names the problem
        return out

    def find(self, run_fp: Fingerprint) -> LibraryKB | None:
        """The newest generation of the KB that fits the run (ties: the fuller one)."""
        found = [kb for kb in self.list() if fits(kb.fingerprint, run_fp)]
        return max(found, key=lambda kb: (kb.generation, kb.count, kb.name)) if found else None

    def find_or_create(self, run_fp: Fingerprint, dtype: str = "float16") -> LibraryKB:
        kb = self.find(run_fp)
        if kb is not None:
            return kb
        path = self.root / kb_name(run_fp)
        create_kb(path, library_fingerprint(run_fp), dtype=dtype)  # under the KB's lock: a racing creator gets the same KB
        return LibraryKB(path, read_header(path).fingerprint, 0)

    def open(self, kb: LibraryKB) -> KnowledgeBase | None:
        """The KB for retrieval, or None while it is empty."""
        state = read_state(kb.path)
        return KnowledgeBase(kb.path, state) if state.count else None

    # ---- recording ------------------------------------------------------------------------
    def append(self, kb: LibraryKB, x: dict[int, np.ndarray], d: dict[int, np.ndarray], entries: list[Entry],
               digests: list[str]) -> tuple[LibraryKB, int]:
        """Append finished trajectories (skipping digests already held) to `kb`, rotating to a new
        generation at the cap. Returns (the KB written to, entries added)."""
        if not (len(entries) == len(digests) and all(len(v) == len(entries) for v in (*x.values(), *d.values()))):
            raise KBError("append needs one digest and one row per entry")
        with kb_lock(kb.path):
            held = unit_digests(kb.path)
            keep = [i for i, g in enumerate(digests) if g not in held and g not in digests[:i]]
            if not keep:
                return kb, 0
            state = read_tail_state(kb.path, read_header(kb.path))
            if len(keep) > self.cap // 2:
                raise KBError(f"a batch of {len(keep)} trajectories is more than half the library cap {self.cap}; raise max_trajectories")
            if state.count + len(keep) <= self.cap:
                _commit_items(kb.path, x, d, entries, digests, keep)
                return LibraryKB(kb.path, kb.fingerprint, state.count + len(keep)), len(keep)
        new = self.rotate(kb)
        return self.append(new, x, d, entries, digests)

    def rotate(self, kb: LibraryKB) -> LibraryKB:
        """Start the next generation with a coverage-keeping half of `kb` (greedy k-center)."""
        nxt = self.root / kb_name(kb.fingerprint, kb.generation + 1)
        header = read_header(kb.path)
        create_kb(nxt, header.fingerprint, dtype=header.dtype)
        with kb_lock(nxt):
            if read_tail_state(nxt, header).count:
                return LibraryKB(nxt, header.fingerprint, read_tail_state(nxt, header).count)  # another recorder rotated first
            src = KnowledgeBase(kb.path, read_state(kb.path))
            fp = src.fingerprint
            step = fp.stored_steps[len(fp.stored_steps) // 4]
            keep = sorted(k_center(src.keys("denoised", step), self.cap // 2).tolist())
            rows = unit_digests_by_row(kb.path)
            x = {s: src.values("latent", s, keep) for s in fp.stored_steps}
            dd = {s: src.values("denoised", s, keep) for s in fp.stored_steps}
            entries = [src.entries[i] for i in keep]
            digests = [rows.get(i, f"{i:0{DIGEST_HEX}x}") for i in keep]
            src.close()
            _commit_items(nxt, x, dd, entries, digests, list(range(len(keep))))
        return LibraryKB(nxt, header.fingerprint, len(keep))

    def prune(self, keep_generations: int = 1, dry_run: bool = False, empty: bool = False) -> list[str]:
        """Remove all but the newest `keep_generations` generations of each KB (and, with `empty`,
        KBs holding no trajectory). Returns the names removed (or that would be)."""
        families: dict[str, list[LibraryKB]] = {}
        for kb in self.list():
            families.setdefault(kb.family, []).append(kb)
        gone = []
        for kbs in families.values():
            kbs.sort(key=lambda kb: kb.generation, reverse=True)
            for i, kb in enumerate(kbs):
                if i >= max(1, keep_generations) or (empty and kb.count == 0):
                    gone.append(kb.name)
                    if not dry_run:
                        with kb_lock(kb.path):
                            shutil.rmtree(kb.path)
        return gone


def _commit_items(path: Path, x, d, entries, digests, keep: list[int]) -> None:
    """Commit the rows `keep` in units of at most MAX_ITEMS_PER_UNIT (call under the lock)."""
    header = read_header(path)
    for a in range(0, len(keep), MAX_ITEMS_PER_UNIT):
        part = keep[a : a + MAX_ITEMS_PER_UNIT]
        unit = UNIT_PREFIX + ",".join(digests[i] for i in part)
        if len(unit) > 256 or any(not re.fullmatch(f"[0-9a-f]{{{DIGEST_HEX}}}", digests[i]) for i in part):
            raise KBError(f"recording digests must be {DIGEST_HEX} hex characters each (item_digest)")
        append_batch_locked(path, header, {s: np.asarray(v[part]) for s, v in x.items()}, {s: np.asarray(v[part]) for s, v in d.items()},
                            [entries[i] for i in part], unit)


def _log_units(path: Path) -> list[tuple[int, str]]:
    """(first row, unit) of each committed line (read_state validated the log's lines)."""
    st = read_state(path)
    out = []
    with open(path / LOG, "rb") as f:
        data = f.read(st.log_bytes)
    for raw in data.splitlines():
        obj = json.loads(raw)
        unit, shards = obj.get("unit"), obj.get("shards") or []
        if isinstance(unit, str) and unit.startswith(UNIT_PREFIX) and shards:
            out.append((int(shards[0]["first"]), unit))
    return out


def unit_digests_by_row(path: Path) -> dict[int, str]:
    rows = {}
    for first, unit in _log_units(path):
        for j, g in enumerate(unit[len(UNIT_PREFIX):].split(",")):
            rows[first + j] = g
    return rows


def unit_digests(path: Path) -> set[str]:
    if not (Path(path) / LOG).exists():
        return set()
    return set(unit_digests_by_row(Path(path)).values())


def item_digest(cond_signature: str, seed: int, row: int) -> str:
    """The dedup key of one recorded item: same conditioning, seed and batch row = same trajectory."""
    return hashlib.sha256(f"{cond_signature}|{int(seed)}|{int(row)}".encode()).hexdigest()[:DIGEST_HEX]


def k_center(keys: np.ndarray, n: int, first: int = 0) -> np.ndarray:
    """Greedy k-center (Gonzalez): `n` rows such that every row lies close to a chosen one; the
    subset that keeps the KB's coverage of the key space (the farthest row is added each time)."""
    keys = np.asarray(keys, dtype=np.float32).reshape(len(keys), -1)
    n = min(int(n), len(keys))
    chosen = [int(first)]
    dist = np.linalg.norm(keys - keys[first], axis=1)
    while len(chosen) < n:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(keys - keys[i], axis=1))
    return np.array(chosen, dtype=np.int64)


@dataclass
class Recording:
    """One finished run's full trajectories, ready to append."""

    library: Library
    kb: LibraryKB
    x: dict[int, np.ndarray]
    d: dict[int, np.ndarray]
    entries: list[Entry]
    digests: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    added: int = 0
    error: str = ""


class Recorder:
    """Appends recordings in one background thread, so the queue never waits on the disk.
    Several recorders (threads or processes) may write into one KB: the writer's lock orders them."""

    def __init__(self, log: Callable[[str], None] = lambda msg: None) -> None:
        self._q: queue.Queue[Recording | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.log = log
        self.seconds = 0.0  # time spent appending (in the background)

    def submit(self, rec: Recording) -> Recording:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="redi-recorder", daemon=True)
                self._thread.start()
        self._q.put(rec)
        return rec

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            if rec is None:
                return
            t0 = time.perf_counter()
            try:
                kb, rec.added = rec.library.append(rec.kb, rec.x, rec.d, rec.entries, rec.digests)
                self.log(f"recorded {rec.added} of {len(rec.entries)} trajectories into KB {kb.name}")
            except (KBError, OSError, ValueError) as e:
                rec.error = str(e)
                self.log(f"recording failed: {e}")
            finally:
                self.seconds += time.perf_counter() - t0
                rec.done.set()
                self._q.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted recording is written (tests, benchmarks, shutdown)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._q.unfinished_tasks:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True


RECORDER = Recorder()


def library_root(base: Path, name: str) -> Path:
    """LIBRARY under the KB folder; the name is one plain folder name."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name or ""):
        raise KBError(f"library name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return Path(base) / name


def describe(kbs: list[LibraryKB]) -> list[dict]:
    return [{"name": kb.name, "trajectories": kb.count, "generation": kb.generation, "sampler": kb.fingerprint.sampler,
             "scheduler": kb.fingerprint.scheduler, "steps": kb.fingerprint.steps, "cfg": kb.fingerprint.cfg,
             "latent": list(kb.fingerprint.latent_shape), "bytes": sum(f.stat().st_size for f in kb.path.iterdir() if f.is_file()),
             "modified": os.path.getmtime(kb.path / MANIFEST)} for kb in kbs]
