"""Issue 23: the KB format fuzzed (short run; `python scripts/fuzz_kb.py --cases 20000` is the
long one). Seeded mutations of every file kind of three valid KBs (one with IVF files), then
validate, a query and an append per case in worker subprocesses: no crash, no raw exception,
validate and the runtime agree, a refused append changes no byte (docs/kb_fuzzing.md)."""

import pytest

from . import script_module


@pytest.fixture(scope="module")
def fuzz():
    return script_module.load("fuzz_kb")


@pytest.fixture(scope="module")
def work(tmp_path_factory, fuzz):
    w = tmp_path_factory.mktemp("kb_fuzz")
    fuzz.make_bases(w)
    return w


def test_short_fuzz_run_finds_no_crash_raw_exception_disagreement_or_touched_byte(fuzz, work):
    args = fuzz.argparse.Namespace(cases=240, first=0, seed=7, workers=2, work=str(work), case_timeout=120.0, keep_results=True,
                                   progress=False, inject_crash=-1)
    s = fuzz.drive(args)
    bad = {k: s[k] for k in ("crash", "hang", "worker_error", "raw", "disagree", "touched") if s[k]}
    assert not bad, (bad, s["findings"][:5])
    assert s["cases"] == 240
    # the mutations reach every outcome: the run can see a disagreement when there is one
    assert s["validate"]["ok"] >= 5 and s["validate"]["refused"] >= 100
    outcomes = s["outcomes"]
    assert any("query ok" in k for k in outcomes) and any("query refused" in k for k in outcomes)
    assert any("append ok" in k for k in outcomes) and any("append refused" in k for k in outcomes)
    kinds = set()
    for line in (work / "results.jsonl").read_text().splitlines():
        for m in fuzz.json.loads(line)["mutations"]:
            kinds.add(m.split(" ")[-1].split("_")[0].split(".")[0])  # "flip shard_000001.safetensors" -> "shard"
    # every file kind: log, manifest, shards, IVF files, reduced keys, the lock, a temp-named folder
    assert {"log", "manifest", "shard", "ivf", "rkeys", "replaced", "folder"} <= kinds, kinds


def test_a_worker_killed_by_a_signal_is_counted_as_that_cases_crash(fuzz, work):
    args = fuzz.argparse.Namespace(cases=6, first=1000, seed=7, workers=2, work=str(work), case_timeout=120.0, keep_results=False,
                                   progress=False, inject_crash=1003)
    s = fuzz.drive(args)
    assert s["crash"] == 1 and s["cases"] == 6 and s["findings"][0] == {"case": 1003, "crash": -11}
