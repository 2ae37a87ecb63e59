"""FeatureReuse through the real server: no state survives from one graph to the next
(a graph gives the same image on a busy server as on a fresh one), and the FeatureReuse +
EasyCache + ReDi composition is refused with a message instead of giving a broken image."""

import copy

import numpy as np
import pytest
from PIL import Image

from redi_demo import workflows

pytestmark = pytest.mark.integration


def _chain(interval: int, blocks: str, mixing: bool, parts: str = "input,middle,output", seed: int = 7, **extra) -> dict:
    g = workflows.feature_reuse(seed=seed)
    g["14"]["inputs"].update({"interval": interval, "blocks": blocks, "score_mixing": mixing, "parts": parts, **extra})
    return g


def _image(server, graph: dict) -> np.ndarray:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    return np.asarray(Image.open(server.images(entry)[0]))


def test_no_state_leaks_between_feature_reuse_graphs(server):
    _image(server, workflows.demo_txt2img(seed=7))  # the plain model loaded: no patch of an earlier test is applied
    a_first = _image(server, _chain(2, "all", True))
    # another chain on the same checkpoint, run while the first one's patches are still applied
    _image(server, _chain(3, "transformers", False, order=1))
    _image(server, _chain(3, "resblocks", False, schedule="ramp"))
    # the first chain again; the parts in another order make ComfyUI execute it anew (same blocks)
    a_again = _image(server, _chain(2, "all", True, parts="output,middle,input"))
    assert np.array_equal(a_first, a_again), f"max pixel difference {np.abs(a_first.astype(int) - a_again).max()}"


def _redi(seed: int = 1024) -> dict:
    g = workflows.redi_ksampler(seed=seed, prompts=workflows.kb_prompts(8, seed=5))  # a small KB: built in seconds
    g["6"]["inputs"].update({"kb_name": "kb_feature_reuse_compose", "batch_size": 8})
    return g


def _redi_with(model_nodes: dict, model_ref: list) -> dict:
    g = _redi()
    g.update(copy.deepcopy(model_nodes))
    g["7"]["inputs"]["model"] = model_ref
    return g


FR_NODE = {"class_type": "ReDiFeatureReuse", "inputs": {
    "model": ["1", 0], "interval": 2, "start_percent": 0.0, "end_percent": 1.0, "blocks": "all",
    "parts": "input,middle,output", "score_mixing": True, "mix_bias": 0.5}}


def _easycache(src: list) -> dict:
    return {"class_type": "EasyCache", "inputs": {"model": src, "reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}}


def test_feature_reuse_with_redi_and_easycache(server):
    plain = _image(server, _redi())
    with_fr = _image(server, _redi_with({"14": FR_NODE}, ["14", 0]))
    mse = np.mean((plain.astype(float) - with_fr) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25, "FeatureReuse under ReDi's phases drifted from plain ReDi"
    # FeatureReuse -> EasyCache -> ReDi KSampler (the "pink blob" graph): refused when sampling starts
    entry = server.run(_redi_with({"14": FR_NODE, "16": _easycache(["14", 0])}, ["16", 0]))
    assert entry["status"]["status_str"] == "error"
    msg = server.error_of(entry)["exception_message"]
    assert "FeatureReuse and EasyCache" in msg and "Keep one of them" in msg, msg
    # EasyCache -> FeatureReuse: refused on the FeatureReuse node itself
    fr_after = copy.deepcopy(FR_NODE)
    fr_after["inputs"]["model"] = ["16", 0]
    entry = server.run(_redi_with({"16": _easycache(["1", 0]), "14": fr_after}, ["14", 0]))
    err = server.error_of(entry)
    assert entry["status"]["status_str"] == "error" and err["node_type"] == "ReDiFeatureReuse", err
    assert "already has EasyCache" in err["exception_message"]
    assert server.get("/system_stats")
