"""Small synthetic KBs for the unit tests (no ComfyUI, no model)."""

from __future__ import annotations

import json

import numpy as np

from kb_tools.storage.commit_log import encode_line
from kb_tools.storage.disk_format import Fingerprint

SHAPE = (2, 3, 3)


def fingerprint(**over) -> Fingerprint:
    base = dict(
        model_hash="m1", model_name="Test", latent_shape=SHAPE, sampler="euler", scheduler="normal", steps=10,
        cfg=5.0, stored_steps=(2, 4, 6), seed_mode="fixed", seed=1024,
    )
    base.update(over)
    return Fingerprint(**base)


def fake_run_batch(calls: list | None = None):
    """Deterministic 'trajectories': entry values depend on prompt text and step."""

    def run(prompts, seeds):
        if calls is not None:
            calls.append(list(prompts))
        x, d = {}, {}
        for s in (2, 4, 6):
            rows = []
            for p in prompts:
                rng = np.random.default_rng(abs(hash((p, s))) % (2**32))
                rows.append(rng.normal(size=SHAPE).astype(np.float32))
            x[s] = np.stack(rows)
            d[s] = x[s] * 0.5
        return x, d

    return run


def rewrite_log(kb_dir, mutate):
    """Apply mutate(i, obj) to every log line and re-chain the checksums like an attacker would."""
    lines = [json.loads(x) for x in (kb_dir / "log.jsonl").read_text().splitlines()]
    out, prev = b"", ""
    for i, obj in enumerate(lines):
        mutate(i, obj)
        obj["prev"] = prev
        obj.pop("sha")
        raw = encode_line(obj)
        prev = json.loads(raw)["sha"]
        out += raw
    (kb_dir / "log.jsonl").write_bytes(out)
