"""The shipped checkpoint, loaded by the stock CheckpointLoaderSimple and sampled by the
stock KSampler through the server, meets the quality bar (issue: demo model)."""

import numpy as np
import pytest
from PIL import Image

from redi_demo import dataset, evaluator, workflows

pytestmark = pytest.mark.integration
N = 40


def test_stock_workflow_meets_quality_bar(server):
    samples = dataset.random_samples(N, 4242)
    images = []
    for i, s in enumerate(samples):
        entry = server.run(workflows.demo_txt2img(s.prompt(), seed=100 + i))
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        img = next(im for out in entry["outputs"].values() for im in out.get("images", []))
        images.append(np.asarray(Image.open(server.output_dir / img["subfolder"] / img["filename"]).convert("RGB")))
    acc = evaluator.accuracy(evaluator.load(), np.stack(images), samples)
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9, acc
    assert acc["position"] >= 0.8 and acc["style"] >= 0.8, acc


def test_prompt_outside_vocabulary_still_generates(server):
    entry = server.run(workflows.demo_txt2img("a majestic dragon over Paris, ünïcödé ✨", seed=3))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
