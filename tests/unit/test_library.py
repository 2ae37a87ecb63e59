"""The KB library: selection and creation by fingerprint, recording (dedup, cap and rotation),
two recorders at once and a recorder killed mid-commit. No ComfyUI."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kb_tools.library import Library, Recorder, Recording, fits, item_digest, k_center, kb_name, library_steps
from kb_tools.storage.commit_log import read_state
from kb_tools.storage.disk_format import Entry
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.validate import validate_kb
from tests.unit.kb_fixtures import SHAPE, fingerprint

ROOT = Path(__file__).resolve().parents[2]


def run_fp(**over):
    base = dict(steps=20, stored_steps=(4, 10), seed_mode="range", seed=0, negative_cond="77x8:0.1000,0.2000;0.5000")
    base.update(over)
    return fingerprint(**base)


def rows(n: int, seed: int, stored=None):
    stored = stored or library_steps(20)
    rng = np.random.default_rng(seed)
    x = {s: rng.normal(size=(n, *SHAPE)).astype(np.float32) for s in stored}
    d = {s: rng.normal(size=(n, *SHAPE)).astype(np.float32) for s in stored}
    return x, d


def test_library_steps_cover_key_and_value_fractions():
    assert library_steps(20) == (2, 3, 4, 6, 8, 10, 12, 14, 16)
    assert all(1 <= s < 8 for s in library_steps(8))


def test_find_or_create_is_deterministic_and_selects_by_fingerprint(tmp_path):
    lib = Library(tmp_path / "lib")
    a = lib.find_or_create(run_fp())
    assert a.count == 0 and a.name == kb_name(run_fp()) and len(a.name) <= 64
    assert a.name.startswith("test-euler-normal-20s-cfg5-3x3-")
    assert lib.find_or_create(run_fp(seed=99, stored_steps=(3,))).path == a.path  # any seed, the library's own steps
    # a different cfg, sampler, model or negative prompt gets its own KB
    others = [run_fp(cfg=7.0), run_fp(sampler="heun"), run_fp(model_hash="m2"), run_fp(negative_cond="77x8:0.9000,0.2000;0.5000")]
    names = {lib.find_or_create(fp).name for fp in others}
    assert len(names) == 4 and a.name not in names
    assert len(lib.list()) == 5
    # the negative prompt's signature is compared with the encoder's float tolerance
    assert fits(a.fingerprint, run_fp(negative_cond="77x8:0.1005,0.2000;0.5000"))
    assert not fits(a.fingerprint, run_fp(latent_shape=(2, 3, 4)))


def test_append_dedups_and_keeps_whole_trajectories(tmp_path):
    lib = Library(tmp_path / "lib")
    kb = lib.find_or_create(run_fp())
    x, d = rows(3, 0)
    entries = [Entry(f"cond:{i}", 5) for i in range(3)]
    digests = [item_digest(f"sig{i}", 5, i) for i in range(3)]
    kb, added = lib.append(kb, x, d, entries, digests)
    assert added == 3
    kb, added = lib.append(kb, x, d, entries, digests)  # the same items again
    assert added == 0
    x2, d2 = rows(2, 1)
    kb, added = lib.append(kb, x2, d2, [Entry("cond:a", 6), Entry("cond:b", 6)], [digests[0], item_digest("new", 6, 0)])
    assert added == 1
    opened = lib.open(kb)
    assert len(opened) == 4
    np.testing.assert_allclose(opened.values("denoised", 10, [3]), d2[10][1:2], atol=1e-2)  # float16 storage
    assert validate_kb(kb.path) == 4


def test_append_batch_locked_commits_under_the_callers_lock(tmp_path):
    """The writer's public commit for a caller holding the lock (the library's dedup-then-commit);
    the library uses no private name of the writer."""
    import ast

    from kb_tools.storage.disk_format import read_header
    from kb_tools.storage.writer import append_batch_locked, create_kb, kb_lock

    path = tmp_path / "kb"
    create_kb(path, run_fp(stored_steps=library_steps(20)))
    x, d = rows(2, 3)
    with kb_lock(path):
        header = read_header(path)
        assert append_batch_locked(path, header, x, d, []).count == 0  # nothing to commit: no log line
        state = append_batch_locked(path, header, x, d, [Entry("cond:a", 1), Entry("cond:b", 2)], unit="rec:u1")
    assert state.count == 2 and "rec:u1" in state.units and validate_kb(path) == 2
    tree = ast.parse((ROOT / "kb_tools" / "library.py").read_text())
    private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("writer")
               for a in n.names if a.name.startswith("_")]
    assert private == []


def test_cap_rotates_to_a_generation_that_keeps_coverage(tmp_path):
    lib = Library(tmp_path / "lib", cap=40)
    kb = lib.find_or_create(run_fp())
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, *SHAPE)).astype(np.float32) * 4
    n = 0
    for batch in range(10):  # clusters of very unequal sizes: half of the items in cluster 0
        which = np.array([0 if rng.random() < 0.6 else rng.integers(1, 8) for _ in range(5)])
        x, d = rows(5, 10 + batch)
        key_step = kb.fingerprint.stored_steps[len(kb.fingerprint.stored_steps) // 4]
        d[key_step] = centers[which] + 0.05 * rng.normal(size=(5, *SHAPE)).astype(np.float32)
        kb, _ = lib.append(kb, x, d, [Entry(f"c{w}", n + j) for j, w in enumerate(which)], [item_digest("s", n + j, 0) for j in range(5)])
        n += 5
    names = sorted(k.name for k in lib.list())
    assert len(names) == 2 and names[1].endswith("-g2"), names
    new = lib.open(kb)
    assert len(new) <= 40 and kb.generation == 2
    assert len(new) == 20 + (50 - 40)  # half the cap kept, then the batches that arrived after the rotation
    kept_clusters = {e.prompt for e in new.entries}
    old = KnowledgeBase(lib.list()[0].path, read_state(lib.list()[0].path))
    assert kept_clusters == {e.prompt for e in old.entries}  # every cluster the old KB covered is still covered
    # dedup survives the rotation for the kept items
    kept = new.entries[0]
    x, d = rows(1, 99)
    _, added = lib.append(kb, x, d, [kept], [item_digest("s", kept.seed, 0)])
    assert added == 0
    assert lib.prune(dry_run=True) == [names[0]]
    assert lib.prune() == [names[0]] and len(lib.list()) == 1


def test_k_center_covers_better_than_the_newest_half():
    rng = np.random.default_rng(1)
    keys = np.concatenate([rng.normal(size=(90, 6)) * 0.1, rng.normal(size=(10, 6)) * 0.1 + 5])
    chosen = k_center(keys, 20)

    def worst(idx):
        return max(np.min(np.linalg.norm(keys[idx] - k, axis=1)) for k in keys)

    assert worst(chosen) < 0.6 < worst(np.arange(80, 100)) or worst(chosen) < worst(np.arange(20))


def test_background_recorder_returns_at_once_and_writes(tmp_path):
    lib = Library(tmp_path / "lib")
    kb = lib.find_or_create(run_fp())
    x, d = rows(2, 3)
    rec = Recorder()
    r = rec.submit(Recording(lib, kb, x, d, [Entry("a", 1), Entry("b", 1)], ["a" * 12, "b" * 12]))
    assert rec.flush(timeout=30) and r.done.is_set() and r.added == 2 and not r.error


def _record_many(root: str, start: int, n: int) -> None:
    lib = Library(Path(root))
    kb = lib.find_or_create(run_fp())
    for i in range(start, start + n):
        x, d = rows(1, i)
        kb, _ = lib.append(kb, x, d, [Entry(f"p{i % 7}", i)], [item_digest(f"p{i % 7}", i, 0)])


def test_two_recorders_at_once_lose_and_duplicate_nothing(tmp_path):
    root = str(tmp_path / "lib")
    Library(Path(root)).find_or_create(run_fp())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(root, start, 12)) for start in (0, 6)]  # items 6..11 overlap
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    kb = Library(Path(root)).list()[0]
    opened = KnowledgeBase.open(kb.path)
    seeds = sorted(e.seed for e in opened.entries)
    assert seeds == list(range(18)), seeds  # 0 lost, 0 duplicated
    assert validate_kb(kb.path) == 18


KILL_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from tests.unit.test_library import _record_many
_record_many({lib!r}, 0, 100000)
"""


def test_kill_9_mid_recording_leaves_no_half_entry(tmp_path):
    root = tmp_path / "lib"
    Library(root).find_or_create(run_fp())
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), lib=str(root))], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            kbs = Library(root).list()
            if kbs and kbs[0].count >= 5:
                break
            time.sleep(0.05)
        time.sleep(0.013)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kb = Library(root).list()[0]
    n = validate_kb(kb.path)  # every committed row and checksum whole
    assert n >= 5
    seeds = [e.seed for e in KnowledgeBase.open(kb.path).entries]
    assert seeds == list(range(n))
    # the next recorder continues cleanly after the killed one (a half-written log line or shard is ignored)
    x, d = rows(1, 1)
    lib = Library(root)
    _, added = lib.append(lib.find_or_create(run_fp()), x, d, [Entry("after", n)], [item_digest("after", n, 0)])
    assert added == 1 and validate_kb(kb.path) == n + 1


def test_cap_must_leave_room():
    with pytest.raises(Exception, match="at least 2"):
        Library(Path("/nonexistent"), cap=1)
    assert replace(run_fp(), cfg=5.0) == run_fp()


def test_cli_lists_and_prunes(tmp_path, capsys):
    from kb_tools.cli import main

    lib = Library(tmp_path / "lib")
    kb = lib.find_or_create(run_fp())
    lib.find_or_create(run_fp(cfg=9.0))
    x, d = rows(1, 0)
    lib.append(kb, x, d, [Entry("a", 1)], [item_digest("a", 1, 0)])
    main(["library", "list", str(tmp_path / "lib")])
    out = capsys.readouterr().out
    assert kb.name in out and "2 KBs, 1 trajectories" in out
    main(["library", "prune", str(tmp_path / "lib"), "--empty", "--dry-run"])
    assert "would remove 1 KBs" in capsys.readouterr().out and len(lib.list()) == 2
    main(["library", "prune", str(tmp_path / "lib"), "--empty"])
    assert [k.name for k in lib.list()] == [kb.name]
    with pytest.raises(SystemExit):
        main(["library", "list", str(tmp_path / "nope")])
