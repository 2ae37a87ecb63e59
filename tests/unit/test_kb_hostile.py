"""A KB folder is untrusted input: hand-damaged and hostile copies of a valid KB.

The hostile edits keep the log's own checksums consistent (a hostile author can recompute
them); the loader must still refuse, with a message, and never read outside the folder."""

import json
import os
import struct

import numpy as np
import pytest

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage import disk_format as kb_format
from kb_tools.storage import index as kb_index
from kb_tools.storage import shard as kb_shard
from kb_tools.storage import writer as kb_writer
from kb_tools.storage.disk_format import Entry
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.paths import confined_file
from kb_tools.storage.validate import validate_kb

from .kb_fixtures import fake_run_batch, fingerprint, rewrite_log


@pytest.fixture()
def kb_dir(tmp_path):
    d = tmp_path / "kb"
    builder.build(d, fingerprint(), [f"p{i}" for i in range(6)], 3, fake_run_batch())
    return d


def first_query(kb_dir):
    kb = KnowledgeBase.open(kb_dir)
    q = np.zeros((1, 2 * 3 * 3), np.float32)
    return kb.search("latent", 2, q, 1)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/shard_000000.safetensors", "shard_0.safetensors", 7])
def test_shard_names_outside_the_folder_are_refused_before_any_read(kb_dir, name):
    rewrite_log(kb_dir, lambda i, o: o["shards"][0].update(file=name) if i == 0 else None)
    with pytest.raises(KBError, match="not a plain shard name"):
        KnowledgeBase.open(kb_dir)


def test_symlinked_shard_and_manifest_are_refused(kb_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shard = kb_dir / "shard_000001.safetensors"
    os.replace(shard, outside)
    shard.symlink_to(outside)  # a valid shard, reached through a link
    kb = KnowledgeBase.open(kb_dir)
    with pytest.raises(KBError, match="shard_000001.safetensors .*symbolic link"):
        kb.values("latent", 2, [4])
    with pytest.raises(KBError, match="symbolic link"):
        validate_kb(kb_dir)
    man = tmp_path / "manifest.json"
    os.replace(kb_dir / "manifest.json", man)
    (kb_dir / "manifest.json").symlink_to(man)
    with pytest.raises(KBError, match="manifest.json .*symbolic link"):
        KnowledgeBase.open(kb_dir)


def test_reduced_keys_of_another_kb_are_refused(kb_dir, tmp_path):
    other = tmp_path / "other"
    builder.build(other, fingerprint(), [f"q{i}" for i in range(6)], 3, fake_run_batch())
    (kb_dir / "rkeys_latent_2.f32").write_bytes((other / "rkeys_latent_2.f32").read_bytes())  # same shape
    with pytest.raises(KBError, match=r"rkeys_latent_2.f32 rows 0..2 do not match their checksum"):
        first_query(kb_dir)
    with pytest.raises(KBError, match="rkeys_latent_2.f32 rows 0..2 are not the reduced keys of shard_000000"):
        validate_kb(kb_dir)


def _ivf_kb(tmp_path, monkeypatch, name="kb"):
    monkeypatch.setattr(kb_index, "FLAT_MAX_FLOATS", 100 * 18)
    d = tmp_path / name
    rng = np.random.default_rng(len(name))
    kb_writer.create_kb(d, fingerprint(stored_steps=(2, 4)))
    x = {s: rng.normal(size=(400, 2, 3, 3)).astype(np.float32) for s in (2, 4)}
    kb_writer.append_batch(d, x, {s: v * 0.5 for s, v in x.items()}, [Entry(f"{name}{j}", 1, j) for j in range(400)])
    return d


def test_index_files_are_covered_by_checksums(tmp_path, monkeypatch):
    kb_dir = _ivf_kb(tmp_path, monkeypatch)
    other = _ivf_kb(tmp_path, monkeypatch, "other")
    ivf = kb_dir / "ivf_latent_2_400.safetensors"
    ivf.write_bytes((other / "ivf_latent_2_400.safetensors").read_bytes())  # another KB's index of the same shape
    with pytest.raises(KBError, match="ivf_latent_2_400.safetensors does not match its checksum"):
        first_query(kb_dir)
    ivf.write_bytes(b"garbage")
    with pytest.raises(KBError, match="ivf_latent_2_400.safetensors does not match its checksum"):
        validate_kb(kb_dir)


def test_index_claiming_huge_sizes_is_refused_before_allocating(tmp_path, monkeypatch):
    kb_dir = _ivf_kb(tmp_path, monkeypatch)
    head = json.dumps({"centroids": {"dtype": "F32", "shape": [1 << 18, 18], "data_offsets": [0, 18 << 20]},
                       "lists": {"dtype": "I32", "shape": [1 << 36], "data_offsets": [0, 1 << 38]}}).encode()
    hostile = struct.pack("<Q", len(head)) + head + b"\0" * 64
    (kb_dir / "ivf_latent_2_400.safetensors").write_bytes(hostile)
    sha = kb_format.sha256_file(kb_dir / "ivf_latent_2_400.safetensors")
    rewrite_log(kb_dir, lambda i, o: o["indexes"]["latent_2"].update(sha256=sha))
    with pytest.raises(KBError, match="ivf_latent_2_400.safetensors"):
        first_query(kb_dir)


def test_shard_header_size_is_bounded(kb_dir):
    shard = kb_dir / "shard_000000.safetensors"
    shard.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    kb = KnowledgeBase.open(kb_dir)
    with pytest.raises(KBError, match=r"shard_000000.safetensors: its header claims 1099511627776 bytes"):
        kb.values("latent", 2, [0])


def test_type_confused_manifest_lists_every_problem(kb_dir):
    man = json.loads((kb_dir / "manifest.json").read_text())
    man["fingerprint"]["steps"] = "20"
    man["fingerprint"]["latent_shape"] = "2x3x3"
    del man["fingerprint"]["sampler"]
    man["pool"] = -1
    (kb_dir / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(KBError) as e:
        KnowledgeBase.open(kb_dir)
    msg = str(e.value)
    for needle in ("'steps' must be int", "'latent_shape' must be tuple", "'sampler' is missing", "pool must be an integer"):
        assert needle in msg
    (kb_dir / "manifest.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(KBError, match="not a ReDi KB manifest"):
        KnowledgeBase.open(kb_dir)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda o: o["shards"][0].pop("file"), "exactly file, count, first"),
    (lambda o: o["shards"][0].update(count="3"), "count '3' must be an integer"),
    (lambda o: o.update(count=99), "claims 99 entries"),
    (lambda o: o.update(seq="0"), "seq must be a non-negative integer"),
    (lambda o: o.update(indexes={"latent_2": {"file": "../x", "rows": 1, "sha256": "0" * 64}}), "index record"),
])
def test_type_confused_log_lines_give_one_clear_message(kb_dir, edit, needle):
    rewrite_log(kb_dir, lambda i, o: edit(o) if i == 0 else None)
    with pytest.raises(KBError, match="log.jsonl of KB kb, line 0, is invalid") as e:
        KnowledgeBase.open(kb_dir)
    assert needle in str(e.value)


def test_edited_log_line_is_refused(kb_dir):
    lines = (kb_dir / "log.jsonl").read_text().splitlines()
    obj = json.loads(lines[0])
    obj["shards"][0]["count"] = 2  # edited without recomputing the line's checksum
    lines[0] = json.dumps(obj)
    (kb_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(KBError, match="does not match its checksum"):
        KnowledgeBase.open(kb_dir)


def test_non_finite_and_absurd_values_are_refused(tmp_path, monkeypatch):
    d = tmp_path / "kb"
    kb_writer.create_kb(d, fingerprint(stored_steps=(2, 4)), dtype="float32")
    x = {s: np.ones((2, 2, 3, 3), np.float32) for s in (2, 4)}
    x[2][1, 0, 0, 0] = 3e38  # finite, but its square overflows
    with pytest.raises(KBError, match="values up to 3e.38"):
        kb_writer.append_batch(d, x, x, [Entry("a", 1, 0), Entry("b", 1, 1)])
    monkeypatch.setattr(kb_shard, "check_values", lambda arr, what: None)  # a hostile writer skips the check
    kb_writer.append_batch(d, x, x, [Entry("a", 1, 0), Entry("b", 1, 1)])
    monkeypatch.undo()
    kb = KnowledgeBase.open(d)
    with pytest.raises(KBError, match="values up to 3e.38"):
        kb.values("latent", 2, [1])
    with pytest.raises(KBError, match="rkeys_latent_2.f32 holds values up to"):
        kb.search("latent", 2, np.ones((1, 18), np.float32), 1)
    with pytest.raises(KBError, match="the query latent holds NaN"):
        kb.search("latent", 2, np.full((1, 18), np.nan, np.float32), 1)


def test_prompts_file_is_confined_to_the_input_folder(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    (root / "prompts.txt").write_text("a\nb\n")
    (tmp_path / "secret").write_text("hostname")
    (root / "link.txt").symlink_to(tmp_path / "secret")
    assert confined_file("prompts.txt", str(root)) == os.path.realpath(root / "prompts.txt")
    for name in ("../secret", str(tmp_path / "secret"), "/etc/hostname", "link.txt"):
        with pytest.raises(KBError, match="outside ComfyUI's input folder"):
            confined_file(name, str(root))
    with pytest.raises(KBError, match="not found in ComfyUI's input folder"):
        confined_file("missing.txt", str(root))


def test_a_refused_shard_never_closes_a_reused_descriptor(kb_dir, tmp_path):
    """A shard refused while parsing once closed its descriptor twice (the second time at garbage
    collection), which closed whatever reused the number: the ComfyUI server's socket."""
    import gc

    (kb_dir / "shard_000000.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    kb = KnowledgeBase.open(kb_dir)
    saved = []
    try:
        kb.values("latent", 2, [0])
    except KBError as e:
        saved.append(e)  # ComfyUI keeps a node's exception (and its frames) for its error report
    with open(tmp_path / "other", "w+b") as other:  # takes the refused shard's descriptor number
        saved.clear()
        gc.collect()
        other.write(b"still open")
        other.flush()
        os.fstat(other.fileno())


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["entries.json"].update(shape=[1 << 40]), "not the bytes of 3 entries"),
    (lambda m: m["entries.offsets"].update(shape=[3]), "entries.offsets is"),
    (lambda m: m.update({"extra": m["crc.entries"]}), "unexpected tensors"),
])
def test_hostile_entry_tensors_are_refused_before_allocating(kb_dir, edit, needle):
    shard = kb_dir / "shard_000000.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])
    edit(meta)
    head = json.dumps(meta).encode()
    shard.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])
    with pytest.raises(KBError, match=needle):
        KnowledgeBase.open(kb_dir).entries[0]


def test_entry_offsets_that_go_backwards_are_refused(kb_dir):
    kb = KnowledgeBase.open(kb_dir)
    sf = kb._shards.get(kb.state.shards[0])
    at = sf.offsets["entries.offsets"] + 8  # offsets[1]
    kb.close()
    shard = kb_dir / "shard_000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[at : at + 8] = struct.pack("<q", -5)
    shard.write_bytes(bytes(data))
    with pytest.raises(KBError, match="entry offsets are not increasing"):
        KnowledgeBase.open(kb_dir).entries[0]
