import json

import numpy as np
import pytest

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage import commit_log as kb_log
from kb_tools.storage import writer as kb_writer
from kb_tools.storage.knowledge_base import KnowledgeBase

from .kb_fixtures import SHAPE, fake_run_batch, fingerprint

PROMPTS = [f"prompt {i}" for i in range(7)]


def make_kb(tmp_path, prompts=PROMPTS, **fp):
    kb_dir = tmp_path / "kb"
    builder.build(kb_dir, fingerprint(**fp), prompts, 3, fake_run_batch())
    return kb_dir


def test_round_trip(tmp_path):
    kb_dir = make_kb(tmp_path)
    kb = KnowledgeBase.load(kb_dir)
    assert len(kb) == 7
    assert [e.prompt for e in kb.entries] == PROMPTS
    assert all(e.seed == 1024 for e in kb.entries)
    x, _ = fake_run_batch()(PROMPTS, [0] * 7)
    ids = np.arange(7)
    np.testing.assert_allclose(kb.values("latent", 4, ids), x[4], atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(kb.values("denoised", 4, ids), x[4] * 0.5, atol=2e-3)
    assert kb.keys("latent", 2).shape == (7, int(np.prod(SHAPE)))
    for space in ("latent", "denoised"):
        for s in (2, 4):  # the last stored step is never a key step
            assert (kb_dir / f"rkeys_{space}_{s}.f32").is_file()
        assert not (kb_dir / f"rkeys_{space}_6.f32").exists()
    dist, ids = kb.search("latent", 4, kb.keys("latent", 4)[[5]], 2)
    assert ids[0, 0] == 5 and dist[0, 0] == pytest.approx(0, abs=1e-4)
    manifest = json.loads((kb_dir / "manifest.json").read_text())
    assert manifest["format"] == "redi-kb" and manifest["format_version"] == 2 and manifest["dtype"] == "float16"
    assert kb_log.read_state(kb_dir).count == 7


def test_range_seeds(tmp_path):
    kb = KnowledgeBase.load(make_kb(tmp_path, seed_mode="range", seed=100))
    assert [e.seed for e in kb.entries] == list(range(100, 107))


def test_mismatched_fingerprint_refused(tmp_path):
    kb_dir = make_kb(tmp_path)
    with pytest.raises(KBError, match=r"steps: KB has 10, request has 12"):
        builder.build(kb_dir, fingerprint(steps=12), PROMPTS, 3, fake_run_batch())
    with pytest.raises(KBError, match="model_hash"):
        builder.build(kb_dir, fingerprint(model_hash="other"), PROMPTS, 3, fake_run_batch())


def test_truncated_shard_refused(tmp_path):
    kb_dir = make_kb(tmp_path)
    shard = kb_dir / "shard_000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(KBError, match="shard_000001.*checksum"):
        KnowledgeBase.load(kb_dir, check_hash=True)
    kb = KnowledgeBase.open(kb_dir)  # opening reads no shard
    with pytest.raises(KBError, match="shard_000001.*corrupt"):
        kb.values("latent", 4, [4])


def test_corrupt_manifest_and_missing_kb(tmp_path):
    with pytest.raises(KBError, match="no knowledge base"):
        KnowledgeBase.load(tmp_path / "nope")
    kb_dir = make_kb(tmp_path)
    (kb_dir / "manifest.json").write_text("{not json")
    with pytest.raises(KBError, match="not valid JSON"):
        KnowledgeBase.load(kb_dir)
    (kb_dir / "manifest.json").write_text(json.dumps({"format": "redi-kb", "format_version": 99}))
    with pytest.raises(KBError, match="format_version 99"):
        KnowledgeBase.load(kb_dir)


def test_empty_kb_refused(tmp_path):
    kb_dir = tmp_path / "kb"
    kb_writer.create_kb(kb_dir, fingerprint())
    with pytest.raises(KBError, match="empty"):
        KnowledgeBase.load(kb_dir)


def test_no_prompts_refused(tmp_path):
    with pytest.raises(KBError, match="no prompts"):
        builder.build(tmp_path / "kb", fingerprint(), ["", "  ", "# comment"], 2, fake_run_batch())


def test_stored_steps_validated():
    with pytest.raises(KBError, match="must lie in 1..10"):
        fingerprint(stored_steps=(0, 4))
    with pytest.raises(KBError, match="must lie in 1..10"):
        fingerprint(stored_steps=(4, 11))


def test_killed_build_resumes_without_losing_batches(tmp_path):
    kb_dir = tmp_path / "kb"
    calls: list = []
    run = fake_run_batch(calls)

    def dying(prompts, seeds):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return run(prompts, seeds)

    with pytest.raises(KeyboardInterrupt):
        builder.build(kb_dir, fingerprint(), PROMPTS, 3, dying)
    assert kb_log.read_state(kb_dir).count == 6  # two finished batches survive
    # a shard a killed run wrote but never committed is dropped, its batch redone
    (kb_dir / "shard_000009.safetensors").write_bytes(b"partial")
    with open(kb_dir / "log.jsonl", "ab") as f:
        f.write(b'{"seq": 2, "half a line')  # a commit line a killed writer never finished
    calls.clear()
    builder.build(kb_dir, fingerprint(), PROMPTS, 3, run)
    assert calls == [["prompt 6"]]
    kb = KnowledgeBase.load(kb_dir)
    assert [e.prompt for e in kb.entries] == PROMPTS
    assert not (kb_dir / "shard_000009.safetensors").exists()
    assert [e.pos for e in kb.entries] == list(range(7))


def test_new_prompts_are_appended(tmp_path):
    kb_dir = make_kb(tmp_path)
    builder.build(kb_dir, fingerprint(), ["extra a", "extra b"], 3, fake_run_batch())
    kb = KnowledgeBase.load(kb_dir)
    assert [e.prompt for e in kb.entries][-2:] == ["extra a", "extra b"] and len(kb) == 9


def test_merge_and_incompatible_merge(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    builder.build(a, fingerprint(), PROMPTS[:3], 2, fake_run_batch())
    builder.build(b, fingerprint(), PROMPTS[3:], 2, fake_run_batch())
    merged = builder.merge(tmp_path / "m", [a, b])
    assert merged.count == 7
    assert [e.prompt for e in KnowledgeBase.load(tmp_path / "m").entries] == PROMPTS
    c = tmp_path / "c"
    builder.build(c, fingerprint(cfg=7.0), PROMPTS[:2], 2, fake_run_batch())
    with pytest.raises(KBError, match="differ in cfg"):
        builder.merge(tmp_path / "m2", [a, c])
    assert not (tmp_path / "m2").exists()


def test_no_pickle_in_kb_files(tmp_path):
    kb_dir = make_kb(tmp_path)
    for f in kb_dir.iterdir():
        assert f.suffix in (".json", ".jsonl", ".safetensors", ".f32") or f.name == ".lock", f
