"""scripts/sampler_support.py's verdict file: a DiT run writes its pairs to the "flow" section and leaves
the SD1.x (epsilon) verdicts alone; a re-measured pair replaces its old verdict."""

import json

import pytest

from . import script_module


@pytest.fixture(scope="module")
def support():
    return script_module.load("sampler_support")


def _row(sampler: str, scheduler: str, acc_redi: float) -> dict:
    m = {"psnr": 30.0, "acc_full": 0.97, "acc_redi": acc_redi, "below15": 0, "n": 24}
    return {"sampler": sampler, "scheduler": scheduler, "same": dict(m), "new": dict(m), "verdict": "measured"}


def test_flow_rows_go_to_the_flow_section(support, tmp_path):
    path = tmp_path / "sampler_verdicts.json"
    eps = {"fails": {"lcm": {"normal": "eps"}}, "works": {"beta": ["euler"], "normal": ["euler"]}}
    path.write_text(json.dumps({**eps, "made_by": "sd1 run", "flow": {"fails": {"heun": {"simple": "old"}}, "works": {}}}))
    rows = [_row("euler", "beta", 0.91), _row("euler", "normal", 0.97), _row("heun", "simple", 0.97)]
    support.write_verdicts(rows, path, "flow", "dit run")
    data = json.loads(path.read_text())
    assert {k: data[k] for k in ("fails", "works", "made_by")} == {**eps, "made_by": "sd1 run"}  # untouched
    flow = data["flow"]
    assert flow["fails"] == {"euler": {"beta": "accuracy 91% vs 97% for the full run at the KB's seed"}}
    assert flow["works"] == {"normal": ["euler"], "simple": ["heun"]}  # heun/simple re-measured: it works now
    assert flow["made_by"] == "dit run"


def test_a_failed_image_fails_the_pair(support):
    row = _row("euler", "simple", 0.97)
    assert support.verdict(row) == "works"
    row["new"]["below15"] = 1  # 1 of 24 images under 15 dB: over the 1% the per-image criterion allows
    assert support.verdict(row) == "FAILS" and "1 of 24 images under 15 dB" in support.why(row)


def test_verified_pairs_are_added_and_a_failing_one_is_not_verified(support, tmp_path):
    path = tmp_path / "sampler_verdicts.json"
    path.write_text(json.dumps({"fails": {"dpmpp_2m": {"normal": "old", "beta": "old"}, "lms": {"*": "no"}},
                                "works": {"normal": ["euler", "heun"]}, "verified": {"karras": ["euler"]}}))
    support.write_verified([("euler", "normal"), ("dpmpp_2m", "normal"), ("lms", "normal")], path, "eps", "docs/x.md")
    data = json.loads(path.read_text())
    # the bar's measurement supersedes an older per-pair failure; a sampler refused outright stays refused
    assert data["verified"] == {"karras": ["euler"], "normal": ["dpmpp_2m", "euler"]}
    assert data["fails"] == {"dpmpp_2m": {"beta": "old"}, "lms": {"*": "no"}}
    assert "dpmpp_2m" in data["works"]["normal"]
    assert "at most 1% under 15 dB" in data["verified_by"] and "KB 1000" in data["verified_by"]


def test_a_failure_found_by_the_bar_names_the_kb_size(support):
    row = {**_row("euler", "normal", 0.97), "kb_size": 1000}
    row["same"]["below15"] = 1
    assert support.why(row) == "1 of 24 images under 15 dB to their full run at the KB's seed with a 1,000-entry KB"


def test_the_shipped_file_verifies_only_pairs_that_work():
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parents[2] / "comfy_adapter" / "sampler_verdicts.json").read_text())
    for table in (data, data["flow"]):
        assert table["verified"], "no verified pair: ReDi would sample every image in full"
        for scheduler, samplers in table["verified"].items():
            for s in samplers:
                assert scheduler not in table["fails"].get(s, {}) and "*" not in table["fails"].get(s, {}), (s, scheduler)
        assert "--verify" in table["verified_by"]


def test_every_template_uses_a_verified_pair():
    """The example workflows must skip steps as they open (a pair ReDi serves), on the model they load."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = json.loads((root / "comfy_adapter" / "sampler_verdicts.json").read_text())
    redi = {"ReDiKSampler", "ReDiKBBuilder", "ReDiSampler", "KSampler", "BasicScheduler"}
    checked = 0
    for path in sorted((root / "example_workflows").glob("*.json")):
        graph = json.loads(path.read_text())
        table = data["flow"] if "DiT" in path.name else data
        names = [w for n in graph["nodes"] if n["type"] in redi for w in n.get("widgets_values") or [] if isinstance(w, str)]
        samplers = {w for w in names if w in {s for per in table["works"].values() for s in per}}
        schedulers = {w for w in names if w in table["works"]}
        if not any(n["type"].startswith("ReDi") and "Sampler" in n["type"] for n in graph["nodes"]):
            continue
        for s in samplers:
            for k in schedulers:
                assert s in table["verified"].get(k, []), f"{path.name}: {s}/{k} is not verified per image"
                checked += 1
    assert checked >= 5
