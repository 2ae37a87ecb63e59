"""`python -m kb_tools build --workers ...` against real ComfyUI servers on 127.0.0.1.

Four servers start once for the module (three with the demo checkpoint, one whose
checkpoint of the same name holds perturbed weights); the worker-kill test, last, kills one.
A small KB (2 steps, both stored, 64x64) keeps the module to a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kb_tools.distributed import build as dist_build
from kb_tools.distributed import store as dist_store
from kb_tools.storage.knowledge_base import KnowledgeBase
from redi_demo import workflows
from redi_demo.comfy_server import ROOT, ComfyServer, free_port

pytestmark = pytest.mark.integration

CKPT = workflows.CKPT
SETTINGS = dist_build.Settings(ckpt=CKPT, steps=2, stored_steps="1,2", batch_size=8, seed_mode="range", seed=100, width=64, height=64)
PROMPTS = workflows.kb_prompts(96, seed=11).splitlines()
LIMITS = dist_build.Limits(unit_size=8, unit_timeout=240, probe_timeout=240, down_grace=3.0, poll=0.25)


def _perturbed_checkpoint(dest: Path) -> None:
    """The demo checkpoint with every UNet weight scaled by 1.01: same architecture, another model hash."""
    sd = load_file(str(ROOT / "models" / CKPT))
    out = {k: (v * np.float32(1.01)).astype(v.dtype) if k.startswith("model.") and v.dtype.kind == "f" else v for k, v in sd.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    good = [ComfyServer(tmp_path_factory.mktemp(f"worker{i}"), sys.executable) for i in range(3)]
    other_dir = tmp_path_factory.mktemp("other_model")
    _perturbed_checkpoint(other_dir / "models" / "checkpoints" / CKPT)
    other = ComfyServer(other_dir, sys.executable, extra_paths={"checkpoints": "checkpoints"})
    every = [*good, other]
    try:
        for s in every:
            s.launch()
        for s in every:
            s.wait_ready()
        yield good, other
    finally:
        for s in every:
            s.stop()


@pytest.fixture(scope="module")
def reference(servers, tmp_path_factory):
    """The single-process build of the same prompts: one ReDiKBBuilder graph on one server."""
    srv = servers[0][0]
    graph = dist_build.builder_graph(SETTINGS, PROMPTS, SETTINGS.seed, "single_process")
    entry = srv.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", srv.error_of(entry)
    return KnowledgeBase.load(srv.kb_dir / "single_process")


def _by_pos(kb: KnowledgeBase, n: int | None = None) -> tuple[list[tuple], np.ndarray]:
    """(prompt, seed, pos) sorted by global position (v2 keeps commit order), and their row ids."""
    rows = sorted((((e.prompt, e.seed, e.pos), i) for i, e in enumerate(kb.entries)), key=lambda r: r[0][2])
    rows = rows[:n] if n is not None else rows
    return [r[0] for r in rows], np.array([r[1] for r in rows])


def _assert_equal(kb: KnowledgeBase, ref: KnowledgeBase, n: int | None = None) -> None:
    """Same entries at the same global positions, same values within fp16 storage tolerance."""
    got, ids = _by_pos(kb)
    want, ref_ids = _by_pos(ref, n)
    assert got == want
    assert [p for _, _, p in got] == list(range(len(got)))  # every prompt exactly once
    assert kb.fingerprint == ref.fingerprint
    for s in ref.fingerprint.stored_steps:
        for space in ("latent", "denoised"):
            np.testing.assert_allclose(kb.values(space, s, ids), ref.values(space, s, ref_ids), rtol=2e-3, atol=2e-3)


def _build(workers, out: Path, prompts=PROMPTS, limits=LIMITS) -> tuple[dist_build.Coordinator, list[str]]:
    lines: list[str] = []
    coord = dist_build.Coordinator(workers, SETTINGS, prompts, out, limits, log=lines.append)
    coord.run_build()
    return coord, lines


def test_three_workers_equal_the_single_process_build(servers, reference, tmp_path):
    good, _ = servers
    out = tmp_path / "kb3"
    coord, lines = _build([s.base for s in good], out)
    kb = KnowledgeBase.load(out, check_hash=True)
    _assert_equal(kb, reference)
    assert all(s.units >= 1 for s in coord.sched.stats.values()), lines  # every worker took part
    assert sum(s.units for s in coord.sched.stats.values()) == len(coord.units) == 12
    assert len(coord.sched.dispatched) == 12, lines  # nothing built twice
    for s in good:  # the workers' unit KBs were deleted once collected
        assert not [d.name for d in s.kb_dir.iterdir() if d.name.startswith("rd-")]


def test_worker_with_another_checkpoint_is_refused(servers, reference, tmp_path):
    good, other = servers
    out = tmp_path / "kb_refused"
    coord, lines = _build([good[0].base, good[1].base, other.base], out, prompts=PROMPTS[:16])
    refused = [ln for ln in lines if ln.startswith("refused worker")]
    assert len(refused) == 1 and other.base in refused[0] and "model_hash: build has" in refused[0], lines
    assert coord.sched.stats[other.base].state == "retired" and coord.sched.stats[other.base].units == 0
    kb = KnowledgeBase.load(out, check_hash=True)
    _assert_equal_prefix(kb, reference, 16)


class _CorruptingProxy:
    """A test double of a worker: forwards to a real server, but flips one byte in the middle
    of every unit shard it serves through the file route."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.corrupted = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, body: bytes | None) -> None:
                req = urllib.request.Request(proxy.target + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                if re.match(r"^/redi/kb/rd-[0-9a-f-]+-u\d+-a\d+/shard_", self.path) and status == 200:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0xFF
                    data = bytes(data)
                    proxy.corrupted += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_corrupt_unit_file_is_rebuilt_elsewhere(servers, reference, tmp_path):
    good, _ = servers
    proxy = _CorruptingProxy(good[2].base)
    try:
        out = tmp_path / "kb_corrupt"
        coord, lines = _build([proxy.base, good[0].base], out, prompts=PROMPTS[:16])
    finally:
        proxy.close()
    assert proxy.corrupted >= 1, lines
    rejected = [ln for ln in lines if "failed verification" in ln and proxy.base in ln]
    assert rejected and all("requeued" in ln for ln in rejected), lines
    assert coord.sched.stats[proxy.base].units == 0 and coord.sched.stats[proxy.base].failures >= 1
    kb = KnowledgeBase.load(out, check_hash=True)
    _assert_equal_prefix(kb, reference, 16)


def _assert_equal_prefix(kb: KnowledgeBase, ref: KnowledgeBase, n: int) -> None:
    _assert_equal(kb, ref, n)


def _cli(workers: list[str], out: Path, prompts_file: Path) -> list[str]:
    return [sys.executable, "-m", "kb_tools", "build", "--workers", ",".join(workers), "--ckpt", CKPT,
            "--prompts-file", str(prompts_file), "--out", str(out), "--steps", str(SETTINGS.steps),
            "--stored-steps", SETTINGS.stored_steps, "--batch-size", str(SETTINGS.batch_size), "--seed-mode", SETTINGS.seed_mode,
            "--seed", str(SETTINGS.seed), "--width", "64", "--height", "64", "--unit-size", "8", "--unit-timeout", "240"]


def test_coordinator_killed_and_restarted_resumes(servers, reference, tmp_path):
    good, _ = servers
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:48]) + "\n")
    out = tmp_path / "kb_resume"
    cmd = _cli([s.base for s in good], out, prompts_file)
    log1 = tmp_path / "run1.log"
    with open(log1, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "manifest.json").is_file() and len(dist_store.units_held(out)) >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    text1 = log1.read_text()
    assert proc.returncode == -signal.SIGKILL, text1
    held_at_kill = set(dist_store.units_held(out))
    started1 = {int(u) for u in re.findall(r"^unit (\d+) \(", text1, re.MULTILINE)}
    assert 2 <= len(held_at_kill) < 6, text1

    run2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, run2.stdout + run2.stderr
    text2 = run2.stdout + run2.stderr
    assert f"resuming {out}: {len(held_at_kill)} of 6 units already held" in text2, text2
    started2 = [int(u) for u in re.findall(r"^unit (\d+) \(", text2, re.MULTILINE)]
    assert not set(started2) & held_at_kill, text2  # finished units are kept, never rebuilt
    assert sorted(started2) == sorted(set(range(6)) - held_at_kill), text2  # each missing unit once
    redone = (started1 - held_at_kill) & set(started2)
    print(f"\ncoordinator kill: {len(held_at_kill)} units held at the kill, {len(started1)} started in run 1, "
          f"{len(redone)} units redone after the restart: {sorted(redone)}")
    kb = KnowledgeBase.load(out, check_hash=True)
    _assert_equal_prefix(kb, reference, 48)


def test_worker_killed_mid_build(servers, reference, tmp_path):
    """Last in the module: it kills the third worker for good."""
    good, _ = servers
    victim = good[2]
    killed = threading.Event()

    def kill_when_busy():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                q = victim.get("/queue")
            except OSError:
                return
            running = [it for it in q["queue_running"] if re.search(r"-u\d{5}-a", json.dumps(it[2]))]
            if running:
                time.sleep(0.5)  # mid-unit
                os.killpg(victim.proc.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    try:
        out = tmp_path / "kb_kill"
        coord, lines = _build([victim.base, good[1].base], out, prompts=PROMPTS[:24])
    finally:
        killer.join(timeout=5)
    assert killed.is_set(), lines
    assert any(victim.base in ln and "requeued" in ln for ln in lines), lines
    # the build may finish on the other worker before the dead one has failed often enough to be retired
    assert coord.sched.stats[victim.base].failures >= 1, coord.sched.stats[victim.base]
    kb = KnowledgeBase.load(out, check_hash=True)
    _assert_equal_prefix(kb, reference, 24)
