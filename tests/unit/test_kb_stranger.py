"""Issue 23: a KB from a stranger cannot crash the server or destroy data. One regression
test (or more) per finding; each fails without its fix."""

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage import commit_log as kb_log
from kb_tools.storage import index as kb_index
from kb_tools.storage import shard as kb_shard
from kb_tools.storage import writer as kb_writer
from kb_tools.storage.commit_log import encode_line
from kb_tools.storage.disk_format import Entry
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.paths import kb_folder
from kb_tools.storage.validate import validate_kb

from .kb_fixtures import SHAPE, fake_run_batch, fingerprint, rewrite_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def kb_dir(tmp_path):
    d = tmp_path / "kb"
    builder.build(d, fingerprint(), [f"p{i}" for i in range(6)], 3, fake_run_batch())
    return d


def tree_hashes(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.iterdir()):
        if p.is_symlink():
            out[p.name] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[p.name] = "dir"
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ivf_kb(tmp_path, monkeypatch, n=400, name="kb"):
    monkeypatch.setattr(kb_index, "FLAT_MAX_FLOATS", 100 * 18)
    d = tmp_path / name
    rng = np.random.default_rng(7)
    kb_writer.create_kb(d, fingerprint(stored_steps=(2, 4)))
    x = {s: rng.normal(size=(n, *SHAPE)).astype(np.float32) for s in (2, 4)}
    kb_writer.append_batch(d, x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"{name}{j}", 1, j) for j in range(n)])
    return d


def query(kb_dir, step=2):
    kb = KnowledgeBase.open(kb_dir)
    return kb.search("latent", step, np.zeros((1, 18), np.float32), 1)


# ---- 1: every size that reaches faiss is checked against the KB first ------------------------

def test_ivf_record_whose_rows_disagree_with_the_kb_is_refused(tmp_path, monkeypatch):
    """The issue's crash: an IVF record of fewer rows than entries, file, sha and lists consistent."""
    d = ivf_kb(tmp_path, monkeypatch)
    centroids, lists = kb_index.load_ivf(d / "ivf_latent_2_400.safetensors", 400, 18)
    save_file({"centroids": centroids, "lists": lists[:150]}, str(d / "ivf_latent_2_150.safetensors"))
    sha = hashlib.sha256((d / "ivf_latent_2_150.safetensors").read_bytes()).hexdigest()
    rewrite_log(d, lambda i, o: o["indexes"].update(latent_2={"file": "ivf_latent_2_150.safetensors", "rows": 150, "sha256": sha}))
    for run in (query, validate_kb, kb_log.read_state):
        with pytest.raises(KBError, match="covers 150 rows, but the line holds 400 entries"):
            run(d)


def test_faiss_never_sees_lists_shorter_than_the_keys():
    idx = kb_index.ivf_index(np.zeros((4, 18), np.float32))
    with pytest.raises(KBError, match="cannot take keys"):
        kb_index.add_preassigned(idx, np.zeros((10, 18), np.float32), np.zeros(3, np.int32))
    with pytest.raises(KBError, match="cannot take keys"):
        kb_index.add_preassigned(idx, np.zeros((3, 18), np.float32), np.array([0, 1, 9], np.int32))
    with pytest.raises(KBError, match="do not fit an index"):
        kb_index.search(kb_index.flat_index(np.zeros((3, 18), np.float32)), np.zeros((1, 5), np.float32), 1)


def test_a_float_where_the_log_needs_an_integer_is_refused(kb_dir):
    """Found by the fuzzer: a re-signed shard record with "first": 3.0 (== 3 in Python) reached
    os.pread as a float offset (TypeError)."""
    rewrite_log(kb_dir, lambda i, o: o["shards"][0].update(first=float(o["shards"][0]["first"])) if i == 1 else None)
    for run in (query, validate_kb, kb_log.read_state):
        with pytest.raises(KBError, match="starts at row 3.0, expected 3"):
            run(kb_dir)


# ---- 2: validate reads every stored step's tensors -----------------------------------------

@pytest.mark.parametrize("value, needle", [(np.inf, "NaN or infinite"), (np.nan, "NaN or infinite"), (3e38, "beyond")])
@pytest.mark.parametrize("tensor", ["x", "d"])
def test_validate_checks_the_last_stored_step(tmp_path, monkeypatch, tensor, value, needle):
    d = tmp_path / "kb"
    kb_writer.create_kb(d, fingerprint(), dtype="float32")
    x = {s: np.ones((3, *SHAPE), np.float32) * s for s in (2, 4, 6)}
    dd = {s: v * 0.5 for s, v in x.items()}
    (x if tensor == "x" else dd)[6][1, 0, 0, 0] = value
    monkeypatch.setattr(kb_shard, "check_values", lambda *a: None)  # written as a hostile author would
    kb_writer.append_batch(d, x, dd, [Entry(f"p{j}", 1, j) for j in range(3)])
    monkeypatch.undo()
    with pytest.raises(KBError, match=needle):
        validate_kb(d)


def test_validate_checks_the_crc_of_the_last_stored_step(kb_dir):
    from kb_tools.storage.shard import ShardFile

    st = kb_log.read_state(kb_dir)
    rec = st.shards[0]
    sf = ShardFile(kb_dir / rec.file, rec, st.header)
    off = sf.offsets["d.6"] + sf.row_bytes + 3  # row 1 of the last stored step's d
    sf.close()
    data = bytearray((kb_dir / rec.file).read_bytes())
    data[off] ^= 0x10
    (kb_dir / rec.file).write_bytes(bytes(data))
    sha = hashlib.sha256(bytes(data)).hexdigest()
    rewrite_log(kb_dir, lambda i, o: o["shards"][0].update(sha256=sha) if i == 0 else None)  # only the row crc can tell
    with pytest.raises(KBError, match=r"rows \[1\] of d.6 do not match their checksums"):
        validate_kb(kb_dir)


# ---- 3: validate raises KBError only ---------------------------------------------------------

@pytest.mark.parametrize("key", ["latent2", "latent_x", "latent_99", "", "denoised_"])
def test_hostile_index_keys_are_kb_errors(tmp_path, monkeypatch, key):
    d = ivf_kb(tmp_path, monkeypatch)
    rewrite_log(d, lambda i, o: o["indexes"].update({key: o["indexes"]["latent_2"]}))
    with pytest.raises(KBError, match="names no reduced key of this KB"):
        validate_kb(d)


# ---- 4: the log is read with bounds -------------------------------------------------------------

def test_a_sparse_2_gib_log_tail_is_refused_without_reading_it(kb_dir):
    with open(kb_dir / "log.jsonl", "r+b") as f:
        f.truncate(2 << 30)
    t0 = time.perf_counter()
    for run in (kb_log.read_state, validate_kb, KnowledgeBase.open):
        with pytest.raises(KBError, match="more than the .* a log may have"):
            run(kb_dir)
    with pytest.raises(KBError, match="more than the .* a log may have"):
        kb_writer.append_batch(kb_dir, *fake_run_batch()(["q"], [1]), [Entry("q", 1, 6)])
    assert time.perf_counter() - t0 < 2


def test_a_long_log_line_and_too_many_lines_are_refused(kb_dir, monkeypatch):
    with open(kb_dir / "log.jsonl", "ab") as f:
        f.write(b"x" * (kb_log.MAX_LOG_LINE_BYTES + 10) + b"\n")
    with pytest.raises(KBError, match="longer than"):
        kb_log.read_state(kb_dir)
    monkeypatch.setattr(kb_log, "MAX_LOG_LINES", 1)
    kb2 = kb_dir.parent / "kb2"
    builder.build(kb2, fingerprint(), ["a"], 1, fake_run_batch())  # one line: allowed
    with pytest.raises(KBError, match="more than 1 lines .* kb_tools merge"):
        builder.build(kb2, fingerprint(), ["a", "b"], 1, fake_run_batch())


# ---- 5 and 6: appending to a damaged KB: one KBError, not a byte changed --------------------------

def _damage_lock_link(d):
    (d / ".lock").unlink(missing_ok=True)
    os.symlink("/etc/passwd", d / ".lock")


def _damage_lock_dir(d):
    (d / ".lock").unlink(missing_ok=True)
    (d / ".lock").mkdir()


def _append_to_log(data: bytes):
    def damage(d):
        with open(d / "log.jsonl", "ab") as f:
            f.write(data)
    return damage


def _resigned_zero(d):
    """The issue's data loss: a self-signed last line claiming 0 entries."""
    lines = (d / "log.jsonl").read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    obj = {k: v for k, v in last.items() if k != "sha"}
    obj.update(count=0, nshards=0, shards=[], keys={}, indexes={})
    (d / "log.jsonl").write_bytes(b"".join(lines[:-1]) + encode_line(obj))


def _temp_dir(d):
    (d / f".shard_000002.safetensors.{os.getpid()}.tmp").mkdir()


def _missing_shard(d):
    (d / "shard_000000.safetensors").unlink()


def _short_rkeys(d):
    with open(d / "rkeys_latent_2.f32", "r+b") as f:
        f.truncate(18 * 4)


def _manifest(**change):
    def damage(d):
        m = json.loads((d / "manifest.json").read_text())
        for k, v in change.items():
            (m["fingerprint"] if k == "latent_shape" else m)[k] = v
        (d / "manifest.json").write_text(json.dumps(m))
    return damage


DAMAGES = {
    "manifest latent shape": (_manifest(latent_shape=[2, 1, 9]), "expected dtype F16 shape|other settings"),  # found by the fuzzer
    "manifest dtype": (_manifest(dtype="float32"), "expected dtype F32"),
    "lock symlink": (_damage_lock_link, "writer lock"),
    "lock folder": (_damage_lock_dir, "writer lock"),
    "garbage last line": (_append_to_log(b"\x00garbage{{\n"), "not JSON"),
    "non-UTF-8 last line": (_append_to_log(b'{"seq": "\xff\xfe"}\n'), "not JSON"),
    "schema-less last line": (_append_to_log(b'{"sha": "0"}\n'), "must be a non-negative integer"),
    "huge integer": (_append_to_log(b'{"seq": ' + b"9" * 5000 + b"}\n"), "not JSON"),
    "resigned zero line": (_resigned_zero, "claims 0 entries"),
    "temp-named folder": (_temp_dir, "is a folder"),
    "missing shard": (_missing_shard, "shard_000000.safetensors listed by KB kb but missing"),
    "short rkeys": (_short_rkeys, "shorter than the 6 committed keys"),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_append_to_a_damaged_kb_is_one_kb_error_and_changes_nothing(kb_dir, name):
    damage, needle = DAMAGES[name]
    damage(kb_dir)
    before = tree_hashes(kb_dir)
    for attempt in (
        lambda: kb_writer.append_batch(kb_dir, *fake_run_batch()(["q"], [1]), [Entry("q", 1, 6)]),
        lambda: builder.build(kb_dir, fingerprint(), ["q", "r"], 2, fake_run_batch()),
    ):
        with pytest.raises(KBError, match=needle):
            attempt()
        assert tree_hashes(kb_dir) == before
    if "lock" not in name:  # the lock is the writer's, not part of the KB
        with pytest.raises(KBError, match=needle):
            validate_kb(kb_dir)  # validate refuses the same KB for the same reason


def test_an_append_that_retrains_the_ivf_reads_the_damaged_keys_before_writing(tmp_path, monkeypatch):
    """Found by the fuzzer: damage in an earlier chunk of the reduced keys was met by the k-means
    retraining after the new shard and keys were written."""
    d = ivf_kb(tmp_path, monkeypatch)
    rng = np.random.default_rng(2)
    x = {s: rng.normal(size=(4, *SHAPE)).astype(np.float32) for s in (2, 4)}
    kb_writer.append_batch(d, x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"n{j}", 1, 0) for j in range(4)])
    data = bytearray((d / "rkeys_latent_2.f32").read_bytes())
    data[40] ^= 4  # row 0: the first commit's chunk
    (d / "rkeys_latent_2.f32").write_bytes(bytes(data))
    before = tree_hashes(d)
    with pytest.raises(KBError, match=r"rkeys_latent_2.f32 rows 0..399 do not match their checksum"):
        kb_writer.append_batch(d, x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"m{j}", 1, 0) for j in range(4)])
    assert tree_hashes(d) == before


def test_append_kb_refuses_a_damaged_target(kb_dir, tmp_path):
    src = tmp_path / "src"
    builder.build(src, fingerprint(), ["s1", "s2"], 2, fake_run_batch())
    _resigned_zero(kb_dir)
    before = tree_hashes(kb_dir)
    with pytest.raises(KBError, match="claims 0 entries"):
        kb_writer.append_kb(kb_dir, src, unit="u1")
    assert tree_hashes(kb_dir) == before


# ---- 7: readers never fail during fast appends ----------------------------------------------------

def test_a_reader_whose_ivf_generation_was_removed_uses_the_newest(tmp_path, monkeypatch):
    d = ivf_kb(tmp_path, monkeypatch)
    kb = KnowledgeBase.open(d)
    rng = np.random.default_rng(3)
    for i in range(kb_writer.KEEP_IVF_GENERATIONS + 2):
        x = {s: rng.normal(size=(4, *SHAPE)).astype(np.float32) for s in (2, 4)}
        kb_writer.append_batch(d, x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"n{i}{j}", 1, 0) for j in range(4)])
    assert not (d / "ivf_latent_2_400.safetensors").exists()
    q = kb.full_keys("latent", 2, [5, 123])
    dist, ids = kb.search("latent", 2, q, 1)
    assert ids[:, 0].tolist() == [5, 123] and np.allclose(dist[:, 0], 0)


READER = """
import sys, time, numpy as np
from kb_tools.storage import index as kb_index
from kb_tools.storage import shard as kb_shard
kb_index.FLAT_MAX_FLOATS = 100 * 18
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.errors import KBError
kb_dir, seconds, delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
end = time.time() + seconds
while time.time() < end:
    try:
        kb = KnowledgeBase.open(kb_dir)
        time.sleep(delay)  # a sampler's key phase between the open and the first search
        kb.search("latent", 2, kb.full_keys("latent", 2, [len(kb) - 1]), 2)
        kb.close()
        ok += 1
    except KBError as e:
        failed += 1
        print("FAILED", str(e)[:200], file=sys.stderr)
print(ok, failed)
"""


WRITER = """
import sys, numpy as np
from pathlib import Path
from kb_tools.storage import index as kb_index, writer as kb_writer
from kb_tools.storage.disk_format import Entry
kb_index.FLAT_MAX_FLOATS = 100 * 18
rng = np.random.default_rng(11)
for i in range(100_000):  # as fast as the writer commits, until killed
    x = {s: rng.normal(size=(2, 2, 3, 3)).astype(np.float32) for s in (2, 4)}
    kb_writer.append_batch(Path(sys.argv[1]), x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"w{i}", 1, 0), Entry(f"w{i}b", 1, 0)])
"""


def test_readers_during_appends_at_the_highest_commit_rate_never_fail(tmp_path, monkeypatch):
    """Issue 23: at ~17 commits/s, 14 of 39 queries failed ("ivf_... missing"). Each reader here
    waits 0.4 s between its open and its first search while the writer commits flat out."""
    d = ivf_kb(tmp_path, monkeypatch, n=800)  # above 663 entries: appends extend the IVF lists (no k-means per commit)
    before = len(KnowledgeBase.open(d))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], cwd=ROOT)
    try:
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", READER, str(d), "8", "0.4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        rate = (len(KnowledgeBase.open(d)) - before) / 2 / (time.time() - t0)
    finally:
        writer.kill()
        writer.wait()
    ok, failed = map(int, out.stdout.split())
    print(f"readers during appends: {ok} queries ok, {failed} failed, writer at {rate:.1f} commits/s")
    assert failed == 0 and ok >= 5, out.stderr[-2000:]
    assert rate * 0.4 > 2  # more than the two generations the old writer kept were committed during a reader's wait


# ---- 9: the CLI prints one line for a KBError raised under the pack's package name ------------------

CLI = """
import importlib.util, sys
from kb_tools import cli
spec = importlib.util.spec_from_file_location("redi_accelerate.kb_tools.errors", "kb_tools/errors.py")
other = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = other
spec.loader.exec_module(other)
def refuse(args):
    raise other.KBError("the pack refused this")
cli.cmd_inspect = refuse
cli.main(["inspect", "somewhere"])
"""


def test_cli_prints_one_line_for_a_refusal_from_the_packs_package_name():
    out = subprocess.run([sys.executable, "-c", CLI], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == "error: the pack refused this", out.stderr


# ---- 10: smaller ones ------------------------------------------------------------------------------

def test_a_kb_folder_that_links_outside_the_kb_root_is_refused(tmp_path):
    root, outside = tmp_path / "redi_kb", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "linked")
    with pytest.raises(KBError, match="symbolic link"):
        kb_folder(str(root), "linked")
    (root / "real").mkdir()
    assert kb_folder(str(root), "real") == str(root / "real")
    assert kb_folder(str(root), "new") == str(root / "new")


def _builder(kb_dir, tag):
    builder.build(kb_dir, fingerprint(), [f"{tag} {i}" for i in range(8)], 1, fake_run_batch())


def test_concurrent_builders_never_write_duplicate_pos(tmp_path):
    d = tmp_path / "kb"
    builder.build(d, fingerprint(), ["first"], 1, fake_run_batch())
    procs = [mp.get_context("fork").Process(target=_builder, args=(d, t)) for t in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    kb = KnowledgeBase.open(d)
    assert sorted(e.pos for e in kb.entries) == list(range(len(kb))) and len(kb) == 25


def test_validate_lists_a_bad_shard_without_follow_on_rkeys_problems(tmp_path):
    d = tmp_path / "kb"
    builder.build(d, fingerprint(), [f"p{i}" for i in range(9)], 3, fake_run_batch())
    data = bytearray((d / "shard_000001.safetensors").read_bytes())
    data[-5] ^= 1
    (d / "shard_000001.safetensors").write_bytes(bytes(data))
    with pytest.raises(KBError) as e:
        validate_kb(d)
    assert "(1 problem(s))" in str(e.value) and "shard_000001.safetensors does not match" in str(e.value)


def test_a_query_of_another_latent_size_is_a_kb_error(kb_dir):
    """Found by the fuzzer: a manifest whose latent shape was changed made the query's reshape raise ValueError."""
    kb = KnowledgeBase.open(kb_dir)
    with pytest.raises(KBError, match="values per item"):
        kb.search("latent", 2, np.zeros((1, 20), np.float32), 1)
    with pytest.raises(KBError, match="values per item"):
        kb.exact_search("latent", 2, np.zeros((1, 20), np.float32), 1)
