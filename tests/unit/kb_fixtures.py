"""Small synthetic KBs for the unit tests (no ComfyUI, no model)."""

from __future__ import annotations

import numpy as np

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
