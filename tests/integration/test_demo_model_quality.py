"""The shipped checkpoints (the SD1.x UNet and the Flux DiT), loaded by the stock
CheckpointLoaderSimple and sampled by the stock KSampler through the server at each model's
default settings, scored by the evaluator."""

import numpy as np
import pytest
from PIL import Image

from redi_demo import dataset, evaluator, workflows

pytestmark = pytest.mark.integration
N = 40
TXT2IMG = {"sd1": workflows.demo_txt2img, "dit": workflows.dit_txt2img}


@pytest.fixture(scope="module", params=list(TXT2IMG))
def scores(server, request):
    samples = dataset.random_samples(N, 4242)
    images = []
    for i, s in enumerate(samples):
        entry = server.run(TXT2IMG[request.param](s.prompt(), seed=100 + i))
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        images.append(np.asarray(Image.open(server.images(entry)[0]).convert("RGB")))
    return evaluator.accuracy(evaluator.load(), np.stack(images), samples)


def test_measured_floor(scores):
    # The two attributes outside the bar (chance is 25% and 50%). Measured (scripts/eval_demo_model.py):
    # SD1.x on 1000 images: background 99.9%, size 97.4%; the DiT's figures are in docs/demo_model.md.
    assert scores["background"] >= 0.9 and scores["size"] >= 0.85, scores


def test_quality_bar(scores):
    # The bar at each model's default settings (SD1.x: euler, normal, 20 steps, cfg 6; DiT: euler,
    # simple, 20 steps, its cfg in demo_models.py).
    assert scores["shape"] >= 0.9 and scores["colour"] >= 0.9, scores
    assert scores["position"] >= 0.8 and scores["style"] >= 0.8, scores


@pytest.mark.parametrize("make", list(TXT2IMG.values()), ids=list(TXT2IMG))
def test_prompt_outside_vocabulary_still_generates(server, make):
    entry = server.run(make("a majestic dragon over Paris, ünïcödé ✨", seed=3))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
