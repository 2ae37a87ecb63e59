"""The shipped checkpoint, loaded by the stock CheckpointLoaderSimple and sampled by the
stock KSampler through the server, scored by the evaluator."""

import numpy as np
import pytest
from PIL import Image

from redi_demo import dataset, evaluator, workflows

pytestmark = pytest.mark.integration
N = 40


@pytest.fixture(scope="module")
def scores(server):
    samples = dataset.random_samples(N, 4242)
    images = []
    for i, s in enumerate(samples):
        entry = server.run(workflows.demo_txt2img(s.prompt(), seed=100 + i))
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        images.append(np.asarray(Image.open(server.images(entry)[0]).convert("RGB")))
    return evaluator.accuracy(evaluator.load(), np.stack(images), samples)


def test_measured_floor(scores):
    # Measured on 1000 images (scripts/eval_demo_model.py): background 89.8%, size 80.3%.
    # Chance is 25% and 50%: a broken loader, tokenizer or autoencoder falls far below this.
    assert scores["background"] >= 0.75 and scores["size"] >= 0.65, scores


@pytest.mark.xfail(strict=True, reason="the shipped demo model is below the issue's quality bar (shape/colour 90%, position/style 80%); the issue stays open")
def test_quality_bar(scores):
    assert scores["shape"] >= 0.9 and scores["colour"] >= 0.9, scores
    assert scores["position"] >= 0.8 and scores["style"] >= 0.8, scores


def test_prompt_outside_vocabulary_still_generates(server):
    entry = server.run(workflows.demo_txt2img("a majestic dragon over Paris, ünïcödé ✨", seed=3))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
