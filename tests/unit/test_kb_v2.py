"""KB format v2: on-demand reads, reduced-key search with re-rank, appends, units, upgrade, locking."""

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage import commit_log as kb_log
from kb_tools.storage import disk_format as kb_format
from kb_tools.storage import index as kb_index
from kb_tools.storage import shard as kb_shard
from kb_tools.storage import writer as kb_writer
from kb_tools.storage.disk_format import Entry
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.upgrade import upgrade
from kb_tools.storage.validate import validate_kb

from .kb_fixtures import SHAPE, fake_run_batch, fingerprint

BIG = (4, 4, 4)


def batch(rng, n, first, shape=SHAPE, steps=(2, 4, 6)):
    x = {s: rng.normal(size=(n, *shape)).astype(np.float32) for s in steps}
    return x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"p{first + j}", 1, first + j) for j in range(n)]


def flip_byte(path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_open_reads_no_shard(tmp_path):
    kb_dir = tmp_path / "kb"
    builder.build(kb_dir, fingerprint(), [f"p{i}" for i in range(6)], 2, fake_run_batch())
    for f in kb_dir.glob("shard_*"):
        f.write_bytes(b"garbage")  # opening must not touch them
    kb = KnowledgeBase.open(kb_dir)
    assert len(kb) == 6 and kb.fingerprint == fingerprint()


def test_flipped_byte_in_a_value_row_is_refused_when_read(tmp_path):
    kb_dir = tmp_path / "kb"
    builder.build(kb_dir, fingerprint(), [f"p{i}" for i in range(4)], 4, fake_run_batch())
    kb = KnowledgeBase.open(kb_dir)
    sf = kb._shards.get(kb.state.shards[0])
    off = sf.offsets["x.6"] + 2 * sf.row_bytes + 3  # a byte inside row 2 of x.6
    kb.close()
    flip_byte(kb_dir / "shard_000000.safetensors", off, 0x40)
    kb = KnowledgeBase.open(kb_dir)
    kb.values("latent", 6, [0, 1, 3])  # undamaged rows still read
    with pytest.raises(KBError, match=r"shard_000000.safetensors: row 2 of x.6 does not match its checksum.*re-copy shard_000000"):
        kb.values("latent", 6, [2])
    with pytest.raises(KBError, match="shard_000000.*checksum"):
        validate_kb(kb_dir)


def test_reduced_key_search_reranks_to_the_exact_neighbour(tmp_path, monkeypatch):
    """Pooled keys (4x4x4 -> 4x1x1) cannot tell these entries apart; the re-rank on full keys can."""
    monkeypatch.setattr(kb_index, "DEFAULT_KEY_DIMS", 4)
    rng = np.random.default_rng(0)
    fp = fingerprint(latent_shape=BIG, stored_steps=(2, 4))
    kb_writer.create_kb(tmp_path / "kb", fp, key_dims=4)
    x, d, e = batch(rng, 300, 0, BIG, (2, 4))
    x[2] -= x[2].mean(axis=(2, 3), keepdims=True)  # identical pooled keys: all information is in the detail
    kb_writer.append_batch(tmp_path / "kb", x, d, e)
    kb = KnowledgeBase.open(tmp_path / "kb")
    assert kb.header.pool == 4 and kb.header.key_dims == 4
    q = kb.full_keys("latent", 2, [17, 230]) + 0.01
    _, exact = kb.exact_search("latent", 2, q, 3)
    _, got = kb.search("latent", 2, q, 3, rerank=300)
    assert got[:, 0].tolist() == [17, 230] and (got == exact).all()
    _, shallow = kb.search("latent", 2, q, 1, rerank=1)  # without re-rank depth pooling alone fails
    assert shallow[:, 0].tolist() != [17, 230]


def test_ivf_index_appends_stay_consistent(tmp_path, monkeypatch):
    monkeypatch.setattr(kb_index, "FLAT_MAX_FLOATS", 600 * 18)
    monkeypatch.setattr(kb_writer, "KEEP_IVF_GENERATIONS", 1)
    rng = np.random.default_rng(1)
    kb_dir = tmp_path / "kb"
    kb_writer.create_kb(kb_dir, fingerprint(stored_steps=(2, 4)))
    for i in range(5):
        kb_writer.append_batch(kb_dir, *batch(rng, 300, 300 * i, steps=(2, 4)))
        st = kb_log.read_state(kb_dir)
        if st.count * 18 > 600 * 18:
            assert st.indexes["latent_2"].rows == st.count  # every append extends the IVF lists
    kb = KnowledgeBase.open(kb_dir)
    assert len(kb) == 1500 and "latent_2" in kb.state.indexes
    q = kb.full_keys("latent", 2, [3, 700, 1499]) + 0.001
    _, got = kb.search("latent", 2, q, 2)
    _, exact = kb.exact_search("latent", 2, q, 2)
    assert (got[:, 0] == exact[:, 0]).all() and got[:, 0].tolist() == [3, 700, 1499]
    assert validate_kb(kb_dir) == 1500
    ivf_files = sorted(p.name for p in kb_dir.glob("ivf_latent_2_*"))
    assert len(ivf_files) == 2  # the current generation and KEEP_IVF_GENERATIONS (1 here) before it
    assert kb.subset(200).search("latent", 2, q[:1], 1)[1][0, 0] == 3


def test_append_kb_units_are_atomic_idempotent_and_out_of_order(tmp_path):
    rng = np.random.default_rng(2)
    units = {}
    for u, first in (("u2", 10), ("u0", 0), ("u1", 5)):
        src = tmp_path / f"src_{u}"
        kb_writer.create_kb(src, fingerprint())
        kb_writer.append_batch(src, *batch(rng, 5, 0))
        units[u] = (src, first)
    target = tmp_path / "target"
    for u, (src, first) in units.items():
        assert kb_writer.append_kb(target, src, u, first_pos=first)
    assert not kb_writer.append_kb(target, units["u1"][0], "u1", first_pos=5)  # a resumed run never adds it twice
    kb = KnowledgeBase.open(target)
    assert len(kb) == 15 and kb.units == {"u0", "u1", "u2"} == kb_log.read_units(target)
    assert sorted(e.pos for e in kb.entries) == list(range(15))
    assert [e.pos for e in kb.entries][:5] == list(range(10, 15))  # commit order, global positions kept
    assert len(kb_log.read_state(target).shards) == 3
    assert validate_kb(target) == 15
    names = kb_log.listed_files(target)
    assert names[:2] == ["manifest.json", "log.jsonl"] and ".lock" not in names
    assert set(names) <= {p.name for p in target.iterdir()}
    other = tmp_path / "other"
    kb_writer.create_kb(other, fingerprint(cfg=9.0))
    kb_writer.append_batch(other, *batch(rng, 2, 0))
    with pytest.raises(KBError, match="cfg"):
        kb_writer.append_kb(target, other, "u9")
    assert len(KnowledgeBase.open(target)) == 15


def test_merge_writes_bounded_shards(tmp_path):
    rng = np.random.default_rng(3)
    a, b = tmp_path / "a", tmp_path / "b"
    kb_writer.create_kb(a, fingerprint(), shard_rows=7)
    kb_writer.append_batch(a, *batch(rng, 20, 0))
    kb_writer.create_kb(b, fingerprint())
    kb_writer.append_batch(b, *batch(rng, 9, 20))
    st = kb_writer.merge(tmp_path / "m", [a, b])
    assert st.count == 29
    rows = [s.count for s in kb_log.read_state(tmp_path / "m").shards]
    assert sum(rows) == 29 and max(rows) <= kb_format.read_header(tmp_path / "m").shard_rows
    assert [e.prompt for e in KnowledgeBase.open(tmp_path / "m").entries] == [f"p{i}" for i in range(29)]
    assert [s.count for s in kb_log.read_state(a).shards] == [7, 7, 6]


def _write_v1(kb_dir, fp, n):
    """A format-1 KB as the previous release wrote it (float32, whole-shard sha256)."""
    import hashlib

    kb_dir.mkdir(parents=True)
    x, _ = fake_run_batch()([f"old {i}" for i in range(n)], [0] * n)
    tensors = {}
    for s in fp.stored_steps:
        tensors[f"x.{s}"] = x[s]
        tensors[f"d.{s}"] = x[s] * 0.5
    meta = {"entries": json.dumps([{"prompt": f"old {i}", "seed": 1024} for i in range(n)])}
    save_file(tensors, str(kb_dir / "shard_00000.safetensors"), metadata=meta)
    sha = hashlib.sha256((kb_dir / "shard_00000.safetensors").read_bytes()).hexdigest()
    (kb_dir / "manifest.json").write_text(json.dumps({"format": "redi-kb", "format_version": 1, "fingerprint": fp.to_json(),
                                                      "shards": [{"file": "shard_00000.safetensors", "count": n, "sha256": sha}],
                                                      "entries": n, "planned": 0}))
    return x


def test_v1_kb_is_refused_with_the_upgrade_command_and_upgrades_losslessly(tmp_path):
    old = tmp_path / "old"
    x = _write_v1(old, fingerprint(), 5)
    with pytest.raises(KBError, match=r"format-1 .*python -m kb_tools upgrade"):
        KnowledgeBase.open(old)
    with pytest.raises(KBError, match=r"already exists with other settings \(format version 1.*kb_tools upgrade"):
        builder.build(old, fingerprint(), ["more"], 1, fake_run_batch())  # scripts/demo.py rebuilds on this message
    st = upgrade(old, tmp_path / "new")
    assert st.count == 5
    kb = KnowledgeBase.open(tmp_path / "new")
    assert kb.header.dtype == "float32"
    np.testing.assert_array_equal(kb.values("latent", 4, np.arange(5)), x[4])  # lossless
    assert [e.prompt for e in kb.entries] == [f"old {i}" for i in range(5)]
    assert validate_kb(tmp_path / "new") == 5


def _build_worker(kb_dir, tag):
    builder.build(kb_dir, fingerprint(), [f"{tag} {i}" for i in range(6)], 2, fake_run_batch())


def test_concurrent_appends_both_land_and_readers_see_whole_commits(tmp_path):
    kb_dir = tmp_path / "kb"
    builder.build(kb_dir, fingerprint(), ["seed 0", "seed 1"], 2, fake_run_batch())
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_worker, args=(kb_dir, tag)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        kb = KnowledgeBase.open(kb_dir)  # never a half-written commit: every listed row reads
        seen.add(len(kb))
        kb.values("latent", 4, [len(kb) - 1])
        kb.close()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    kb = KnowledgeBase.open(kb_dir)
    prompts = [e.prompt for e in kb.entries]
    assert len(kb) == 14 and sorted(prompts[2:]) == sorted([f"a {i}" for i in range(6)] + [f"b {i}" for i in range(6)])
    assert all(n % 2 == 0 for n in seen)
    assert validate_kb(kb_dir) == 14


def test_shard_cache_reopens_closed_shards_and_refuses_a_replaced_one(tmp_path):
    rng = np.random.default_rng(4)
    kb_dir = tmp_path / "kb"
    kb_writer.create_kb(kb_dir, fingerprint(), shard_rows=2)
    x, d, e = batch(rng, 10, 0)
    kb_writer.append_batch(kb_dir, x, d, e)
    kb = KnowledgeBase.open(kb_dir)
    kb._shards.size, kb._shards.entry_size = 2, 1  # 5 shards through 2 descriptors and 1 entry table
    ids = [0, 3, 5, 7, 9, 1]
    first = kb.values("latent", 2, ids)
    np.testing.assert_array_equal(kb.values("latent", 2, ids), first)
    assert [kb.entries[i].prompt for i in ids] == [f"p{i}" for i in ids]
    shard = kb_dir / "shard_000000.safetensors"
    (tmp_path / "copy").write_bytes(shard.read_bytes())
    kb.values("latent", 2, [9, 7])  # shard 0's descriptor is closed by now
    os.replace(tmp_path / "copy", shard)
    with pytest.raises(KBError, match="shard_000000.safetensors was replaced or changed"):
        kb.values("latent", 2, [0])


def test_an_entry_is_read_alone_and_a_damaged_one_is_refused_when_read(tmp_path):
    kb_dir = tmp_path / "kb"
    builder.build(kb_dir, fingerprint(), [f"prompt {i}" for i in range(5)], 5, fake_run_batch())
    kb = KnowledgeBase.open(kb_dir)
    sf = kb._shards.get(kb.state.shards[0])
    assert sf.entry_tensors and sf._entries is None
    assert kb.entries[3].prompt == "prompt 3" and sf._entries is None  # one entry read, the list never parsed
    off = sf.offsets[kb_shard.ENTRY_DATA] + int(sf.entry_offsets[2]) + 12  # a byte inside entry 2's prompt
    kb.close()
    flip_byte(kb_dir / "shard_000000.safetensors", off, 0x01)
    kb = KnowledgeBase.open(kb_dir)
    assert [kb.entries[i].prompt for i in (0, 1, 3, 4)] == ["prompt 0", "prompt 1", "prompt 3", "prompt 4"]
    with pytest.raises(KBError, match=r"shard_000000.safetensors: entry 2 does not match its checksum"):
        kb.entries[2]
    with pytest.raises(KBError, match="shard_000000.*checksum"):
        validate_kb(kb_dir)


def test_shards_with_entries_in_the_header_still_read(tmp_path):
    """Shards written before entries became tensors hold them as JSON in the header."""
    header = kb_format.Header(fingerprint(), "float16", 1, 64)
    tensors = {}
    for s in (2, 4, 6):
        for k in ("x", "d"):
            arr = np.full((3, *SHAPE), s, np.float16)
            tensors[f"{k}.{s}"], tensors[f"crc.{k}.{s}"] = arr, kb_shard.row_crcs(arr)
    path = tmp_path / "shard_000000.safetensors"
    meta = {"entries": json.dumps([{"prompt": f"old {i}", "seed": 7, "pos": i} for i in range(3)])}
    save_file(tensors, str(path), metadata=meta)
    sf = kb_shard.ShardFile(path, kb_format.ShardRec(path.name, 3, 0, "", ""), header, check_head=False)
    assert not sf.entry_tensors
    assert sf.entry(1) == kb_format.Entry("old 1", 7, 1) and [e.prompt for e in sf.entries] == ["old 0", "old 1", "old 2"]
    assert np.frombuffer(sf.raw_row("x.4", 2), np.float16).tolist() == np.full(int(np.prod(SHAPE)), 4.0).tolist()
    sf.close()
