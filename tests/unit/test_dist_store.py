"""The distributed build's storage contact (units into one KB, resume bookkeeping) and the
file route's rules (what a worker may serve or delete), on small synthetic KBs."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kb_tools import builder
from kb_tools.distributed import serve as kb_serve
from kb_tools.distributed import store as dist_store
from kb_tools.distributed.plan import check_held, plan_units, unit_kb_name
from kb_tools.errors import KBError
from kb_tools.storage.knowledge_base import KnowledgeBase

from .kb_fixtures import fake_run_batch, fingerprint

PROMPTS = [f"prompt {i}" for i in range(10)]
REF = fingerprint(seed_mode="range", seed=100)


def _unit_kb(root: Path, unit) -> Path:
    """What a worker's Builder node writes for a unit: a KB of its prompts, seeded at the unit's seed."""
    d = root / f"unit{unit.uid}"
    builder.build(d, replace(REF, seed=unit.seed), list(unit.prompts), 2, fake_run_batch())
    return d


def test_units_in_any_order_make_the_single_process_kb(tmp_path):
    units = plan_units(PROMPTS, 4, "range", 100)
    single = tmp_path / "single"
    builder.build(single, REF, PROMPTS, 4, fake_run_batch())
    out = tmp_path / "dist"
    dist_store.open_target(out, REF, "float16")
    for u in reversed(units):  # units finish out of order
        fp, entries, dtype = dist_store.read_unit(_unit_kb(tmp_path, u))
        assert dtype == "float16" and [e.seed for e in entries] == u.seeds("range")
        assert dist_store.add_unit(out, tmp_path / f"unit{u.uid}", u)
    assert not dist_store.add_unit(out, tmp_path / "unit0", units[0])  # a second copy is refused, nothing written
    assert set(dist_store.units_held(out)) == {0, 1, 2}
    assert check_held(units, dist_store.units_held(out)) == []
    assert dist_store.finalize(out) == 10
    a, b = KnowledgeBase.load(out, check_hash=True), KnowledgeBase.load(single, check_hash=True)
    order = np.argsort([e.pos for e in a.entries])
    assert [(a.entries[i].prompt, a.entries[i].seed, a.entries[i].pos) for i in order] == [(e.prompt, e.seed, e.pos) for e in b.entries]
    np.testing.assert_array_equal(a.values("latent", 4, order), b.values("latent", 4, np.arange(10)))


def test_reopen_checks_settings_and_origin(tmp_path):
    out = tmp_path / "dist"
    dist_store.open_target(out, REF, "float16")
    dist_store.open_target(out, REF, "float16")  # a resumed build reopens it
    with pytest.raises(KBError, match="cfg"):
        dist_store.open_target(out, replace(REF, cfg=7.0), "float16")
    with pytest.raises(KBError, match="seed"):
        dist_store.open_target(out, replace(REF, seed=5), "float16")
    plain = tmp_path / "plain"
    builder.build(plain, REF, PROMPTS[:3], 2, fake_run_batch())
    with pytest.raises(KBError, match="not built as units"):
        dist_store.open_target(plain, REF, "float16")


def test_corrupt_unit_is_refused(tmp_path):
    u = plan_units(PROMPTS, 4, "range", 100)[0]
    d = _unit_kb(tmp_path, u)
    shard = next(p for p in d.iterdir() if p.name.startswith("shard_"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(KBError):
        dist_store.read_unit(d)


def test_file_route_serves_only_listed_files_inside_the_kb_folder(tmp_path):
    root = tmp_path / "redi_kb"
    kb = root / "my_kb"
    builder.build(kb, REF, PROMPTS[:3], 2, fake_run_batch())
    roots = [str(root)]
    for name in dist_store.listed_files(kb):
        assert kb_serve.resolve_kb_file(roots, "my_kb", name) == kb / name
    (kb / "notes.txt").write_text("not part of the KB")
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", kb / "shard_999999.safetensors")
    os.symlink(kb, root / "linked_kb")
    for kb_name, file, status in [
        ("my_kb", "notes.txt", 404), ("my_kb", ".lock", 400), ("my_kb", "..", 400), ("my_kb", "../secret", 400),
        ("my_kb", "shard_999999.safetensors", 404), ("..", "manifest.json", 400), ("linked_kb", "manifest.json", 404),
        ("nope", "manifest.json", 404),
    ]:
        with pytest.raises(kb_serve.Refused) as e:
            kb_serve.resolve_kb_file(roots, kb_name, file)
        assert e.value.status == status, (kb_name, file, str(e.value))


def test_release_deletes_only_unit_kbs(tmp_path):
    root = tmp_path / "redi_kb"
    names = [unit_kb_name("0123456789ab", "a1b2c3", i, 1) for i in range(3)]
    other_build = unit_kb_name("ba9876543210", "a1b2c3", 0, 1)
    for n in [*names, other_build, "my_kb"]:
        (root / n).mkdir(parents=True)
        (root / n / "manifest.json").write_text("{}")
    assert kb_serve.release_units([str(root)], [names[0]]) == [names[0]]
    assert sorted(kb_serve.release_units([str(root)], [], build="0123456789ab")) == sorted(names[1:])
    with pytest.raises(kb_serve.Refused):
        kb_serve.release_units([str(root)], ["my_kb"])
    assert sorted(p.name for p in root.iterdir()) == sorted([other_build, "my_kb"])
    old = root / other_build / "manifest.json"
    os.utime(old, (1, 1))
    assert kb_serve.release_units([str(root)], []) == [other_build]  # idle for more than a day
    assert [p.name for p in root.iterdir()] == ["my_kb"]
