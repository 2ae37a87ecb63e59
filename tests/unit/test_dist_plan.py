"""Unit planning, scheduling state and verification rules of the distributed build (pure)."""

import threading

import pytest

from kb_tools.distributed.plan import check_held, parse_unit_kb_name, plan_units, probe_kb_name, unit_kb_name
from kb_tools.distributed.schedule import Scheduler, format_table
from kb_tools.distributed.verify import build_fingerprint, differences, unit_problems
from kb_tools.errors import KBError
from kb_tools.storage.disk_format import Entry

from .kb_fixtures import fingerprint

PROMPTS = [f"prompt {i}" for i in range(10)]


def test_units_cover_every_prompt_once_with_global_seeds():
    units = plan_units(PROMPTS, 4, "range", 100)
    assert [(u.uid, u.start, u.count, u.seed) for u in units] == [(0, 0, 4, 100), (1, 4, 4, 104), (2, 8, 2, 108)]
    assert [p for u in units for p in u.prompts] == PROMPTS
    assert [s for u in units for s in u.seeds("range")] == list(range(100, 110))  # seed + global index
    fixed = plan_units(PROMPTS, 3, "fixed", 7)
    assert {s for u in fixed for s in u.seeds("fixed")} == {7}
    with pytest.raises(KBError, match="unit size"):
        plan_units(PROMPTS, 0, "range", 1)


def test_unit_names_round_trip_and_stay_in_their_namespace():
    name = unit_kb_name("0123456789ab", "a1b2c3", 17, 3)
    assert parse_unit_kb_name(name) == ("0123456789ab", "a1b2c3", 17, 3)
    assert parse_unit_kb_name(probe_kb_name("0123456789ab", "a1b2c3")) == ("0123456789ab", "a1b2c3", -1, 0)
    for other in ("my_kb", "rd-0123456789ab-a1b2c3-u00017", "rd-0123456789ab-a1b2c3-u00017-a3/..", "../rd-0123456789ab-a1b2c3-probe"):
        assert parse_unit_kb_name(other) is None


def test_resume_refuses_units_of_another_plan():
    units = plan_units(PROMPTS, 4, "range", 100)
    held = {u.uid: u.record() for u in units[:2]}
    assert check_held(units, held) == []
    other = plan_units(PROMPTS[::-1], 4, "range", 100)
    assert check_held(other, held)
    assert check_held(plan_units(PROMPTS, 5, "range", 100), held)
    assert "not part of this plan" in check_held(units[:1], held)[0]


def test_scheduler_requeues_failed_units_on_another_worker_and_never_twice():
    units = plan_units(PROMPTS, 2, "range", 0)  # 5 units
    s = Scheduler(units, {1}, ["a", "b"], max_attempts=3)
    u, att = s.next_unit("a")
    assert (u.uid, att) == (0, 1)
    s.unit_failed(0, "a", "boom")
    nxt, _ = s.next_unit("a")
    assert nxt.uid == 2  # unit 0 waits for b, which has not failed it
    u0, att0 = s.next_unit("b")
    assert (u0.uid, att0) == (0, 2)
    assert s.unit_done(0, "b", 2.0)
    assert not s.unit_done(0, "a", 1.0)  # a late second copy is not counted
    assert s.stats["b"].units == 1 and s.stats["a"].failures == 1
    s.unit_done(2, "a", 1.0)
    for w in ("a", "b"):
        job = s.next_unit(w)
        s.unit_done(job[0].uid, w, 1.0)
    assert s.finished() and s.fatal is None
    assert sorted(uid for uid, _ in s.dispatched) == [0, 0, 2, 3, 4]  # unit 1 was held already


def test_scheduler_fails_after_max_attempts_or_without_workers():
    units = plan_units(PROMPTS[:2], 2, "fixed", 0)
    s = Scheduler(units, set(), ["a"], max_attempts=2)
    for _ in range(2):
        u, _att = s.next_unit("a")  # a failed unit comes back to the only worker
        s.unit_failed(u.uid, "a", "execution error")
    assert s.finished()
    with pytest.raises(KBError, match="unit 0 failed 2 times"):
        s.check()
    s2 = Scheduler(units, set(), ["a", "b"])
    s2.set_state("a", "retired", "refused: model_hash differs")
    assert not s2.finished()
    s2.set_state("b", "retired", "does not answer")
    with pytest.raises(KBError, match=r"no worker left(.|\n)*a: refused: model_hash differs"):
        s2.check()


def test_scheduler_hands_each_unit_to_one_worker_under_threads():
    units = plan_units([str(i) for i in range(200)], 1, "range", 0)
    s = Scheduler(units, set(), [f"w{i}" for i in range(4)])
    got: list[int] = []

    def work(w):
        while (job := s.next_unit(w)) is not None:
            got.append(job[0].uid)
            s.unit_done(job[0].uid, w, 0.01)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(200)) and s.finished()
    table = format_table(s.stats, 10.0)
    assert table.splitlines()[0].split()[:4] == ["worker", "units", "trajectories", "traj/min"]
    assert table.splitlines()[-1].split()[:4] == ["all", "200", "200", "1200.0"]


def test_verification_rules():
    ref = fingerprint(seed_mode="range", seed=100)
    unit = plan_units(PROMPTS, 4, "range", 100)[1]  # prompts 4..7, seeds 104..107
    good = [Entry(p, s) for p, s in zip(unit.prompts, unit.seeds("range"))]
    unit_fp = build_fingerprint(ref, unit.seed)
    assert unit_problems(ref, unit, unit_fp, good) == []
    assert "model_hash: build has 'm1', worker has 'm2'" in unit_problems(ref, unit, build_fingerprint(fingerprint(model_hash="m2", seed_mode="range"), 104), good)
    assert "seed: unit 1 must be built with seed 104" in unit_problems(ref, unit, build_fingerprint(ref, 100), good)[0]
    assert "must hold 4 entries" in unit_problems(ref, unit, unit_fp, good[:3])[0]
    swapped = [good[1], good[0], *good[2:]]
    assert "entry 4 is ('prompt 5', seed 105), expected ('prompt 4', seed 104)" in unit_problems(ref, unit, unit_fp, swapped)[0]
    assert differences(ref, fingerprint(seed_mode="range", seed=100, cfg=7.0)) == ["cfg: build has 5.0, worker has 7.0"]
