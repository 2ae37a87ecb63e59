"""The coordinator's fault handling against in-process fake workers (no ComfyUI, no HTTP):
execution errors, hangs, another model, resume. The real-server cases are in
tests/integration/test_distributed_build.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kb_tools import builder
from kb_tools.distributed import serve as kb_serve
from kb_tools.distributed import store as dist_store
from kb_tools.distributed.build import Coordinator, Limits, Settings
from kb_tools.distributed.client import WorkerDown, WorkerRefused
from kb_tools.errors import KBError
from kb_tools.storage.disk_format import Fingerprint, text_hash
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.version import PACK_VERSION

from .kb_fixtures import SHAPE, fake_run_batch

SETTINGS = Settings(ckpt="fake.safetensors", steps=10, stored_steps="2,4,6", batch_size=2, seed_mode="range", seed=100)
PROMPTS = [f"prompt {i}" for i in range(12)]
FAST = Limits(unit_size=3, unit_timeout=0.5, probe_timeout=5, down_grace=0.05, poll=0.01, backoff=0.01)


class FakeWorker:
    """Stands in for a ComfyUI server with the pack: runs the Builder's build loop on fake
    trajectories. `errors`/`hangs`: how many of its first units end in an execution error / never end;
    `dead_after`: units it finishes before it stops answering."""

    def __init__(self, root: Path, base: str, model_hash: str = "m1", errors: int = 0, hangs: int = 0, dead_after: int | None = None):
        self.root, self.base, self.model_hash = root / "redi_kb", base, model_hash
        self.errors, self.hangs, self.dead_after = errors, hangs, dead_after
        self.history_: dict[str, dict | None] = {}
        self.cancelled: list[str] = []
        self.units_run = 0

    def _alive(self) -> None:
        if self.dead_after is not None and self.units_run > self.dead_after:
            raise WorkerDown(f"{self.base} does not answer")

    def info(self) -> dict:
        self._alive()
        return {"pack_version": PACK_VERSION}

    def get_json(self, path: str) -> dict:
        self._alive()
        return {"queue_running": [], "queue_pending": []}

    def queue_prompt(self, graph: dict) -> str:
        self._alive()
        inp = graph["2"]["inputs"]
        pid = f"p{len(self.history_)}"
        unit = "probe" not in inp["kb_name"]
        if unit:
            self.units_run += 1
        if unit and self.hangs > 0:
            self.hangs -= 1
            self.history_[pid] = None
            return pid
        if unit and self.errors > 0:
            self.errors -= 1
            self.history_[pid] = {"status": {"status_str": "error", "messages": [["execution_error", {"node_type": "ReDiKBBuilder", "exception_message": "CUDA out of memory"}]]}}
            return pid
        fp = Fingerprint(model_hash=self.model_hash, model_name="Test", latent_shape=SHAPE, sampler=inp["sampler_name"],
                         scheduler=inp["scheduler"], steps=inp["steps"], cfg=float(inp["cfg"]),
                         stored_steps=tuple(int(v) for v in inp["stored_steps"].split(",")), seed_mode=inp["seed_mode"],
                         seed=inp["seed"], negative_hash=text_hash(inp["negative"]))
        builder.build(self.root / inp["kb_name"], fp, inp["prompts"].splitlines(), inp["batch_size"], fake_run_batch())
        self.history_[pid] = {"status": {"status_str": "success", "messages": []}}
        return pid

    def history(self, pid: str) -> dict | None:
        self._alive()
        return self.history_.get(pid)

    def in_queue(self, pid: str) -> bool:
        return self.history_.get(pid) is None

    def cancel(self, pid: str) -> None:
        self.cancelled.append(pid)

    def fetch(self, kb: str, name: str, dest: Path, max_bytes: int) -> None:
        self._alive()
        try:
            shutil.copyfile(kb_serve.resolve_kb_file([str(self.root)], kb, name), dest)
        except kb_serve.Refused as e:
            raise WorkerRefused(str(e)) from e

    def release(self, names: list[str] | None = None, build: str | None = None) -> None:
        kb_serve.release_units([str(self.root)], names or [], build or "")


def _coord(tmp_path: Path, workers: list[FakeWorker], out: Path, limits: Limits = FAST) -> tuple[Coordinator, list[str]]:
    by_url = {w.base: w for w in workers}
    lines: list[str] = []
    return Coordinator(list(by_url), SETTINGS, PROMPTS, out, limits, log=lines.append, client=by_url.__getitem__), lines


def _check_kb(out: Path) -> None:
    kb = KnowledgeBase.load(out, check_hash=True)
    assert sorted((e.pos, e.prompt, e.seed) for e in kb.entries) == [(i, p, 100 + i) for i, p in enumerate(PROMPTS)]
    ref = fake_run_batch()(PROMPTS, [])[0][4]
    order = np.argsort([e.pos for e in kb.entries])
    np.testing.assert_allclose(kb.values("latent", 4, order), ref, rtol=1e-3, atol=1e-3)  # fp16 storage


def test_execution_error_and_hang_are_rebuilt_elsewhere(tmp_path):
    a = FakeWorker(tmp_path / "a", "http://a", errors=1)
    b = FakeWorker(tmp_path / "b", "http://b", hangs=1)
    coord, lines = _coord(tmp_path, [a, b], tmp_path / "kb")
    sched = coord.run_build()
    _check_kb(tmp_path / "kb")
    assert any("failed on http://a: the unit failed on the worker: ReDiKBBuilder: CUDA out of memory; requeued" in ln for ln in lines), lines
    assert any("failed on http://b: unit timed out" in ln for ln in lines), lines
    assert b.cancelled  # the hung prompt was cancelled on its worker
    assert sched.stats["http://a"].failures == 1 and sched.stats["http://b"].failures == 1
    assert sum(s.units for s in sched.stats.values()) == 4 and len(sched.done) == 4
    assert not any(p.name.startswith("rd-") for w in (a, b) for p in w.root.iterdir())  # workers cleaned up


def test_worker_with_another_model_is_refused_by_the_majority(tmp_path):
    ws = [FakeWorker(tmp_path / n, f"http://{n}", model_hash=h) for n, h in (("a", "m1"), ("odd", "m2"), ("c", "m1"))]
    coord, lines = _coord(tmp_path, ws, tmp_path / "kb")
    sched = coord.run_build()
    _check_kb(tmp_path / "kb")
    refused = [ln for ln in lines if ln.startswith("refused worker")]
    assert refused == ["refused worker http://odd: it serves another model or settings than the build (model_hash: build has 'm1', worker has 'm2')"]
    assert sched.stats["http://odd"].units == 0 and sched.stats["http://odd"].state == "retired"


def test_resume_keeps_finished_units_and_builds_the_rest_once(tmp_path):
    out = tmp_path / "kb"
    dying = FakeWorker(tmp_path / "a", "http://a", dead_after=2)
    coord, lines = _coord(tmp_path, [dying], out)
    with pytest.raises(KBError, match="no worker left"):
        coord.run_build()
    held = set(dist_store.units_held(out))
    assert held == {0, 1}, lines
    good = FakeWorker(tmp_path / "b", "http://b")
    coord2, lines2 = _coord(tmp_path, [good], out)
    sched = coord2.run_build()
    assert "resuming" in lines2[0] and "2 of 4 units already held" in lines2[0]
    assert sorted(u for u, _ in sched.dispatched) == [2, 3]
    _check_kb(out)


def test_settings_the_workers_cannot_build_stop_the_build(tmp_path):
    class Broken(FakeWorker):
        def queue_prompt(self, graph):
            raise WorkerRefused(f"{self.base} refused the unit graph (HTTP 400): ReDiKBBuilder: steps to store [25] are outside 1..10")

    coord, _ = _coord(tmp_path, [Broken(tmp_path / "a", "http://a")], tmp_path / "kb")
    with pytest.raises(KBError, match=r"no worker(.|\n)*outside 1..10"):
        coord.run_build()


def test_worker_without_the_pack_or_with_another_version_is_refused(tmp_path):
    class NoPack(FakeWorker):
        def info(self):
            raise WorkerRefused(f"{self.base}/redi/info answered HTTP 404")

    class OldPack(FakeWorker):
        def info(self):
            return {"pack_version": "0.0.1"}

    ws = [FakeWorker(tmp_path / "a", "http://a"), NoPack(tmp_path / "b", "http://b"), OldPack(tmp_path / "c", "http://c")]
    coord, lines = _coord(tmp_path, ws, tmp_path / "kb")
    sched = coord.run_build()
    _check_kb(tmp_path / "kb")
    refused = sorted(ln for ln in lines if ln.startswith("refused worker"))
    assert "http://b: it does not run this pack's routes" in refused[0] and "install ComfyUI-ReDi-Accelerate" in refused[0]
    assert f"http://c: pack version: build has {PACK_VERSION!r}, worker has '0.0.1'" in refused[1]
    assert sched.stats["http://a"].units == 4
