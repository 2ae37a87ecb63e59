"""Two real ComfyUI servers (two processes on two 127.0.0.1 ports) recording into one library KB at
once: both run stock KSamplers behind ReDi Record on the same KB folder, their queues overlapping in
time and in content (three prompt x seed pairs run on both). Afterwards the KB holds every distinct
trajectory exactly once (0 lost, 0 duplicated), validates file by file (0 half entries), and each
entry is the trajectory its run computed."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from kb_tools.library import Library
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.validate import validate_kb
from redi_demo import workflows
from redi_demo.comfy_server import ComfyServer

pytestmark = pytest.mark.integration

LIB = "shared_library"
STEPS = 8  # a short schedule keeps the module quick; the library stores steps 1..6 of it
PROMPTS = ["a small green cross at the top left on a pink background", "a large purple square at the bottom right on a black background"]
SEEDS = {0: list(range(100, 106)), 1: list(range(103, 109))}  # 103..105 run on both servers


def _graph(seed: int) -> dict:
    g = workflows.redi_record(PROMPTS[seed % 2], seed=seed, library=LIB)
    g["5"]["inputs"]["steps"] = STEPS
    return g


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared_models") / "redi_kb"
    servers = [ComfyServer(tmp_path_factory.mktemp(f"server{i}"), sys.executable, kb_dir=shared) for i in range(2)]
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready()
        assert servers[0].port != servers[1].port
        yield servers, shared
    finally:
        for s in servers:
            s.stop()


def _count(shared) -> int:
    return sum(kb.count for kb in Library(shared / LIB).list())


def test_two_servers_record_into_one_kb_at_once(two_servers):
    servers, shared = two_servers
    results: dict[int, list] = {0: [], 1: []}

    def drive(i: int) -> None:
        srv = servers[i]
        ids = []
        for seed in SEEDS[i]:  # the whole queue at once: the two servers sample and record concurrently
            status, body = srv.queue(_graph(seed))
            assert status == 200, body
            ids.append(body["prompt_id"])
        deadline = time.time() + 600
        for pid in ids:
            while time.time() < deadline:
                hist = srv.get(f"/history/{pid}")
                if pid in hist and hist[pid].get("status", {}).get("status_str") in ("success", "error"):
                    results[i].append(hist[pid])
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=drive, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(700)
    for i in (0, 1):
        assert len(results[i]) == len(SEEDS[i]), f"server {i} finished {len(results[i])} of {len(SEEDS[i])}"
        for entry in results[i]:
            assert entry["status"]["status_str"] == "success", servers[i].error_of(entry)

    distinct = sorted(set(SEEDS[0]) | set(SEEDS[1]))
    deadline = time.time() + 120
    while time.time() < deadline and _count(shared) < len(distinct):
        time.sleep(0.2)  # the recorders write in the background, after the outputs
    time.sleep(1.0)  # a late duplicate would land now
    kbs = Library(shared / LIB).list()
    assert len(kbs) == 1, [kb.name for kb in kbs]  # both servers chose (and the first created) the same KB
    kb = kbs[0]
    assert validate_kb(kb.path) == len(distinct)  # every file and checksum: no half entry
    opened = KnowledgeBase.open(kb.path)
    seeds = [e.seed for e in opened.entries]
    assert sorted(seeds) == distinct, seeds  # 0 lost, 0 duplicated
    # the same seed recorded by both servers is one trajectory; the two prompts' entries differ
    by_seed = {e.seed: e.prompt for e in opened.entries}
    assert len({by_seed[s] for s in distinct}) == 2
    assert all(by_seed[s] == by_seed[distinct[0] + (s - distinct[0]) % 2] for s in distinct)
    last = kb.fingerprint.stored_steps[-1]
    vals = opened.values("denoised", last, list(range(len(seeds))))
    assert np.isfinite(vals).all() and len({v.tobytes() for v in vals}) == len(distinct)
