"""Fuzz the KB format: seeded random damage to every file kind of valid KBs, then validate,
a query and an append on each damaged copy, in worker subprocesses.

    python scripts/fuzz_kb.py --cases 20000 [--seed 1] [--workers 2] [--work /tmp/kbfuzz]

Bases: two small KBs built by the pack's builder (2 shards each, 3 stored steps) and one
written by `kb_tools bench-scale`'s writer (8,300 entries of 4x8x8: large enough for IVF files).
Case N (seed S) picks a base and 1-3 mutations from Random(S, N): bytes flipped, truncated,
extended (zeros, random bytes, a sparse 3 GiB tail), deleted, replaced by a link or a folder,
swapped with a file of the same kind from another KB; JSON fields of the manifest, the log
and safetensors headers changed in type and value; log lines reordered, duplicated, dropped
and re-signed (every checksum and the chain recomputed, as a hostile author can).

Checked per case (docs/kb_fuzzing.md says why these and how agreement is defined):
  crash         the worker died from a signal (or hung past --case-timeout)
  raw           an exception other than the pack's KBError escaped validate, query or append
  disagree      validate accepted the KB but the query or the append refused it; or the query
                succeeded on a KB validate refused with a different answer than the undamaged
                KB gives; or an append succeeded on a refused KB and changed existing bytes
                or made validate accept it
  touched       an append was refused but a byte of the KB changed (every file hashed
                before and after)
  outside       validate, query or append opened a file outside the KB folder (audit hook)
Each worker runs many cases in one process (a case that kills it is the crash, the driver
restarts it after that case).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASES = ("small_a", "small_b", "ivf")
IVF_SHARE = 0.1  # of the cases (a copy of the IVF base is 35 MB, of a small one 30 KB)
SPARSE = 3 << 30
ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -1e-308, 0.5, "", "x", "../../etc/passwd",
              "shard_000000.safetensors", "a" * 5000, [], [1, 2], {}, {"a": 1}, [[[[[[[[]]]]]]]], "0" * 64]


# ---- bases -----------------------------------------------------------------------------------

def make_bases(work: Path) -> Path:
    """The undamaged KBs (built once per work folder)."""
    import numpy as np

    from kb_tools import builder
    from kb_tools.measure.bench_scale import write_kb
    from kb_tools.storage.disk_format import Fingerprint

    bases = work / "bases"
    if (bases / "done").exists():
        return bases
    shutil.rmtree(bases, ignore_errors=True)
    bases.mkdir(parents=True)
    fp = Fingerprint(model_hash="m1", model_name="Fuzz", latent_shape=(2, 4, 4), sampler="euler", scheduler="normal", steps=10,
                     cfg=5.0, stored_steps=(2, 4, 6), seed_mode="fixed", seed=1024)

    def run_batch(prompts, seeds):
        x, d = {}, {}
        for s in fp.stored_steps:
            rows = [np.random.default_rng([s, *p.encode()]).normal(size=fp.latent_shape).astype(np.float32) for p in prompts]
            x[s] = np.stack(rows)
            d[s] = x[s] * 0.5
        return x, d

    builder.build(bases / "small_a", fp, [f"a prompt {i}" for i in range(8)], 4, run_batch)
    builder.build(bases / "small_b", fp, [f"b prompt {i}" for i in range(8)], 4, run_batch)
    write_kb(bases / "ivf", (4, 8, 8), (4, 10), 8300, 0, "float16")  # kb_tools bench-scale's writer: IVF above 8,192
    for b in BASES:
        assert any(p.name.startswith("ivf_") for p in (bases / b).iterdir()) == (b == "ivf")
    (bases / "done").write_text("ok\n")
    return bases


# ---- mutations ------------------------------------------------------------------------------

def _odd(rng: random.Random, old):
    choices = list(ODD_VALUES)
    if isinstance(old, bool):
        choices.append(not old)
    elif isinstance(old, int):
        choices += [old + 1, old - 1, old * 2, -old, str(old), float(old)]
    elif isinstance(old, str):
        choices += [old[:-1], old + "0", old.upper(), old[::-1]]
    elif isinstance(old, list):
        choices += [old[:-1], old + old[-1:], list(reversed(old))]
    return rng.choice(choices)


def mutate_json(rng: random.Random, obj):
    """Change one field anywhere in a JSON tree in type or value (or drop or add one)."""
    paths = []

    def walk(o, path):
        paths.append(path)
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, path + [k])
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, path + [i])

    walk(obj, [])
    path = rng.choice(paths[1:] or paths)
    if not path:
        return _odd(rng, obj)
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    r = rng.random()
    if r < 0.1 and isinstance(parent, dict):
        del parent[path[-1]]
    elif r < 0.15 and isinstance(parent, dict):
        parent[rng.choice(["extra", "evil", "__metadata__"])] = _odd(rng, None)
    else:
        parent[path[-1]] = _odd(rng, parent[path[-1]])
    return obj


def resign_lines(lines: list[dict]) -> bytes:
    from kb_tools.storage.commit_log import encode_line

    out, prev, seq = b"", "", 0
    for obj in lines:
        if not isinstance(obj, dict):
            out += json.dumps(obj).encode() + b"\n"
            continue
        obj = dict(obj)
        obj.pop("sha", None)
        obj["prev"], obj["seq"] = prev, seq
        raw = encode_line(obj)
        prev, seq = json.loads(raw)["sha"], seq + 1
        out += raw
    return out


def _mutate_log(rng: random.Random, kb: Path, resign: bool) -> str:
    path = kb / "log.jsonl"
    if not _regular(path):
        return "log is not a regular file"
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    op = rng.choice(["field", "field", "reorder", "duplicate", "drop", "drop_last", "swap_shard_rec"])
    i = rng.randrange(len(lines))
    if op == "field":
        lines[i] = mutate_json(rng, lines[i])
    elif op == "reorder" and len(lines) > 1:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "duplicate":
        lines.insert(i, json.loads(json.dumps(lines[i])))
    elif op == "drop":
        del lines[i]
    elif op == "drop_last":
        lines = lines[:-1]
    elif op == "swap_shard_rec":
        recs = [r for ln in lines for r in ln.get("shards", [])]
        if len(recs) > 1:
            a, b = rng.sample(recs, 2)
            for k in ("sha256", "head_sha") if rng.random() < 0.5 else ("file",):
                a[k], b[k] = b[k], a[k]
    if resign:
        path.write_bytes(resign_lines(lines))
    else:
        path.write_bytes(b"".join(json.dumps(x, sort_keys=True, separators=(",", ":")).encode() + b"\n" for x in lines))
    return f"log {op} line {i}{' re-signed' if resign else ''}"


def _mutate_safetensors_header(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8 : 8 + n])
    head = mutate_json(rng, head)
    raw = json.dumps(head).encode()
    if rng.random() < 0.5:
        raw = raw.ljust(n) if len(raw) <= n else raw  # keep the data where it was when it fits
    size = len(raw) if rng.random() < 0.9 else rng.choice([0, 1 << 40, n + 1, len(data)])
    path.write_bytes(struct.pack("<Q", size) + raw + data[8 + n :])
    return f"header of {path.name}"


def _regular(path: Path) -> bool:
    """A regular file small enough to read whole (mutations skip links, folders, sparse tails)."""
    return path.is_file() and not path.is_symlink() and path.stat().st_size <= (64 << 20)


def _resign_file(kb: Path, name: str) -> None:
    """Make the log agree with a changed file again (sha256 and head_sha), as a hostile author can."""
    from kb_tools.storage.shard import ShardFile

    if not _regular(kb / "log.jsonl") or not _regular(kb / name):
        return
    lines = [json.loads(x) for x in (kb / "log.jsonl").read_bytes().splitlines()]
    sha = hashlib.sha256((kb / name).read_bytes()).hexdigest()
    for ln in lines:
        for r in ln.get("shards", []):
            if r.get("file") == name:
                r["sha256"] = sha
                try:
                    from kb_tools.storage.commit_log import read_state

                    st = read_state(kb)
                    rec = next(s for s in st.shards if s.file == name)
                    sf = ShardFile(kb / name, rec, st.header, check_head=False)
                    r["head_sha"] = sf.head_sha
                    sf.close()
                except Exception:
                    pass
        for v in ln.get("indexes", {}).values():
            if isinstance(v, dict) and v.get("file") == name:
                v["sha256"] = sha
    (kb / "log.jsonl").write_bytes(resign_lines(lines))


def mutate(rng: random.Random, kb: Path, other: Path) -> list[str]:
    """1-3 random mutations of the KB at `kb` (`other`: a KB to take swapped files from)."""
    files = sorted(p.name for p in kb.iterdir() if p.name != ".lock")
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        name = rng.choice(files + ["log.jsonl", "log.jsonl", ".lock", "<tempdir>"])
        try:
            what = _mutate_one(rng, kb, other, name)
        except (OSError, ValueError, MemoryError, RecursionError, IndexError, KeyError, TypeError, AttributeError, struct.error):
            what = None  # the file is already too damaged for this mutation (a sparse tail, a folder...)
        if what:
            done.append(what)
    return done or ["none"]


def _mutate_one(rng: random.Random, kb: Path, other: Path, name: str) -> str | None:
    path = kb / name
    if name == "<tempdir>":
        (kb / f".shard_{rng.randrange(10):06d}.safetensors.{rng.randrange(1 << 20)}.tmp").mkdir(exist_ok=True)
        return "temp-named folder"
    if name == ".lock":
        path.unlink(missing_ok=True)
        if rng.random() < 0.5:
            os.symlink("/etc/passwd", path)
        else:
            path.mkdir()
        return ".lock replaced"
    if not path.is_file() or path.is_symlink() or path.stat().st_size > (64 << 20):
        return None
    kinds = ["flip", "flip", "truncate", "extend", "delete", "link", "folder", "swap"]
    if name.endswith(".json") or name == "log.jsonl":
        kinds += ["json", "json", "json"]
    if name == "log.jsonl":
        kinds += ["lines", "lines", "lines_resigned", "lines_resigned", "lines_resigned", "garbage_line", "sparse"]
    if name.endswith(".safetensors"):
        kinds += ["header", "header", "header_resigned", "flip_resigned"]
    kind = rng.choice(kinds)
    data = path.read_bytes()
    if kind == "flip" or kind == "flip_resigned":
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
        if kind == "flip_resigned":
            _resign_file(kb, name)
    elif kind == "truncate":
        path.write_bytes(data[: rng.randrange(len(data) + 1)])
    elif kind == "extend":
        path.write_bytes(data + (rng.randbytes(rng.randrange(1, 5000)) if rng.random() < 0.5 else b"\0" * rng.randrange(1, 1 << 16)))
    elif kind == "sparse":
        with open(path, "r+b") as f:
            f.truncate(SPARSE)
    elif kind == "delete":
        path.unlink()
    elif kind == "link":
        path.unlink()
        os.symlink(rng.choice(["/etc/passwd", "/dev/zero", str(other / name), "/nonexistent"]), path)
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    elif kind == "swap":
        same = [p for p in list(kb.iterdir()) + list(other.iterdir()) if p.suffix == path.suffix and p.name != name
                and p.is_file() and not p.is_symlink() and p.name != ".lock"]
        if same:
            shutil.copyfile(rng.choice(same), path)
    elif kind == "json":
        try:
            obj = json.loads(data.splitlines()[rng.randrange(len(data.splitlines()))] if name == "log.jsonl" else data)
            obj = mutate_json(rng, obj)
            if name == "log.jsonl":
                lines = data.splitlines()
                i = rng.randrange(len(lines))
                lines[i] = json.dumps(obj).encode()
                path.write_bytes(b"\n".join(lines) + b"\n")
            else:
                path.write_bytes(json.dumps(obj).encode())
        except (ValueError, IndexError):
            return None
    elif kind in ("lines", "lines_resigned"):
        kind = _mutate_log(rng, kb, kind == "lines_resigned")
    elif kind == "garbage_line":
        path.write_bytes(data + rng.choice([b"\xff\xfe\x00garbage\n", b"{}\n", b'{"seq": 1}\n', b"[" * 100000 + b"\n",
                                            b'{"count": ' + b"9" * 5000 + b"}\n", b"partial line without newline"]))
    elif kind in ("header", "header_resigned"):
        _mutate_safetensors_header(rng, path)
        if kind == "header_resigned":
            _resign_file(kb, name)
    return f"{kind} {name}"


# ---- one case, in a worker ----------------------------------------------------------------------

def tree_hashes(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.iterdir()):
        if p.name == ".lock":
            continue  # the writer's lock, not part of the KB
        if p.is_symlink():
            out[p.name] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[p.name] = "dir"
        else:
            with open(p, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                h = hashlib.sha256()
                if size > (256 << 20):  # a sparse tail: its size and its first and last MiB
                    h.update(f.read(1 << 20))
                    f.seek(size - (1 << 20))
                    h.update(f.read())
                    h.update(str(size).encode())
                else:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def _query(kb_dir: Path, q) -> dict:
    """What a ReDi retrieval reads: the 3 nearest entries of `q`, their prompts and their
    values at the last stored step (row sha256 each)."""
    from kb_tools.storage.knowledge_base import KnowledgeBase

    kb = KnowledgeBase.open(kb_dir)
    try:
        step = kb.fingerprint.stored_steps[0]
        dist, ids = kb.search("latent", step, q, 3)
        ids = [int(i) for i in ids[0] if i >= 0]
        vals = kb.values("denoised", kb.fingerprint.stored_steps[-1], ids)
        return {"count": len(kb), "ids": ids, "dist": [float(d) for d in dist[0][: len(ids)]],
                "prompts": [kb.entries[i].prompt for i in ids], "values": [hashlib.sha256(v.tobytes()).hexdigest() for v in vals]}
    finally:
        kb.close()


def _base_truth(kb_dir: Path, q) -> dict:
    """Every entry of an undamaged base: prompt, value row sha256, distance of its key to `q`."""
    import numpy as np

    from kb_tools.storage.knowledge_base import KnowledgeBase

    kb = KnowledgeBase.open(kb_dir)
    fp = kb.fingerprint
    out = {"prompts": [], "values": [], "dist": []}
    for a in range(0, len(kb), 1024):
        ids = np.arange(a, min(a + 1024, len(kb)))
        keys = kb.full_keys("latent", fp.stored_steps[0], ids)
        out["dist"] += np.sqrt(((keys.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1)).tolist()
        out["values"] += [hashlib.sha256(v.tobytes()).hexdigest() for v in kb.values("denoised", fp.stored_steps[-1], ids)]
        out["prompts"] += [kb.entries[int(i)].prompt for i in ids]
    kb.close()
    return out


def _genuine(result: dict, truth: dict) -> bool:
    """Every neighbour a query returned is a stored entry of the undamaged KB, with its own
    prompt, its own value row and its true distance (damage never reaches a blend unseen)."""
    for i, d, p, v in zip(result["ids"], result["dist"], result["prompts"], result["values"]):
        if not (0 <= i < len(truth["prompts"]) and truth["prompts"][i] == p and truth["values"][i] == v
                and abs(truth["dist"][i] - d) <= 1e-4 * max(1.0, d)):
            return False
    return bool(result["ids"])


def _append(kb_dir: Path, base_fp):
    """Two new entries that fit what the KB's manifest says (latent shape, stored steps), or the
    base's fingerprint when the manifest is unreadable: a refusal is then about the KB, not
    about a request that does not fit it."""
    import numpy as np

    from kb_tools.storage.disk_format import Entry, read_header
    from kb_tools.storage.writer import append_batch

    try:
        base_fp = read_header(kb_dir).fingerprint
    except Exception:
        pass  # the append below meets the same problem and refuses it
    rng = np.random.default_rng(5)
    x = {s: rng.normal(size=(2, *base_fp.latent_shape)).astype(np.float32) for s in base_fp.stored_steps}
    append_batch(kb_dir, x, {s: v * 0.5 for s, v in x.items()}, [Entry("fuzz 0", 1, 0), Entry("fuzz 1", 1, 0)], number=True)


_WATCH: dict = {"root": None, "outside": []}


def _audit(event: str, args: tuple) -> None:
    """Record every file the pack opens outside the case's KB folder while it runs (Python's
    audit hook sees builtins.open, io.open and os.open; the pack opens KB files only so)."""
    root = _WATCH["root"]
    if event != "open" or root is None or isinstance(args[0], int):
        return
    p = os.path.abspath(os.fsdecode(args[0]))
    if not (p == root or p.startswith(root + os.sep) or p.startswith((sys.prefix, sys.base_prefix, str(ROOT)))):
        _WATCH["outside"].append(p)


def _outcome(fn):
    from kb_tools.errors import is_kb_error

    try:
        return "ok", fn()
    except Exception as e:
        if is_kb_error(e):
            return "refused", str(e).splitlines()[0][:160]
        return "raw", f"{type(e).__name__}: {str(e)[:160]}"


def _committed_ends(kb: Path) -> dict[str, int] | None:
    """The files the KB's log lists, with how many leading bytes of the log and of each rkeys
    file it commits (-1: all of it). An append may rewrite what lies beyond, and files the log
    does not list (a killed writer's leftovers); None when the log is unreadable."""
    from kb_tools.storage.commit_log import read_state
    from kb_tools.storage.disk_format import key_list, rkeys_file

    try:
        st = read_state(kb)
    except Exception:
        return None
    ends = {"log.jsonl": st.log_bytes, "manifest.json": -1}
    for space, step in key_list(st.fingerprint):
        ends[rkeys_file(space, step)] = st.count * st.header.key_dims * 4
    ends.update({r.file: -1 for r in st.shards})
    ends.update({r.file: -1 for r in st.indexes.values()})
    return ends


def _only_appended(before: dict, after: dict, kb: Path, old: dict, ends: dict[str, int] | None) -> bool:
    """Every file the KB lists is unchanged, or (log, rkeys) kept its committed bytes."""
    for name, h in before.items():
        if after.get(name) == h or (ends is not None and name not in ends):
            continue
        p = kb / name
        if ends is None or ends[name] < 0 or name not in old or p.is_symlink() or not p.is_file():
            return False
        with open(p, "rb") as f:
            if f.read(ends[name]) != old[name][: ends[name]]:
                return False
    return True


def run_case(n: int, seed: int, bases: Path, work: Path, expected: dict) -> dict:
    from kb_tools.storage.validate import validate_kb

    rng = random.Random(seed * 1_000_003 + n)
    base = "ivf" if rng.random() < IVF_SHARE else rng.choice(["small_a", "small_b"])
    other = bases / ("small_b" if base != "small_b" else "small_a")
    kb = work / f"case_{os.getpid()}"
    shutil.rmtree(kb, ignore_errors=True)
    t0 = time.perf_counter()
    shutil.copytree(bases / base, kb, symlinks=True)
    muts = mutate(rng, kb, other)
    res: dict = {"case": n, "base": base, "mutations": muts}
    t1 = time.perf_counter()
    _WATCH["root"], _WATCH["outside"] = str(kb), []
    v = _outcome(lambda: validate_kb(kb))
    t2 = time.perf_counter()
    q = _outcome(lambda: _query(kb, expected[base]["q"]))
    t3 = time.perf_counter()
    _WATCH["root"] = None
    before = tree_hashes(kb)
    old = {name: (kb / name).read_bytes() for name in before if name == "log.jsonl" or name.startswith("rkeys_")
           if (kb / name).is_file() and not (kb / name).is_symlink() and (kb / name).stat().st_size < (64 << 20)}
    ends = _committed_ends(kb)
    _WATCH["root"] = str(kb)
    a = _outcome(lambda: _append(kb, expected[base]["fp"]))
    _WATCH["root"] = None
    after = tree_hashes(kb)
    if _WATCH["outside"]:
        res["outside"] = sorted(set(_WATCH["outside"]))[:5]
    res["seconds"] = [round(t1 - t0, 3), round(t2 - t1, 3), round(t3 - t2, 3), round(time.perf_counter() - t3, 3)]
    res.update(validate=v[0], query=q[0], append=a[0])
    raw = [f"{what}: {out[1]}" for what, out in (("validate", v), ("query", q), ("append", a)) if out[0] == "raw"]
    if raw:
        res["raw"] = raw
    dis = []
    if v[0] == "ok":
        if q[0] == "refused" and not (v[1] == 0 and "is empty" in q[1]):  # an empty KB is valid, and has nothing to query
            dis.append(f"validate ok, query refused: {q[1]}")
        if a[0] == "refused":
            dis.append(f"validate ok, append refused: {a[1]}")
    if q[0] == "ok" and not _genuine(q[1], expected[base]["truth"]):
        dis.append(f"query (validate {v[0]}) returned data that is not the undamaged KB's: {json.dumps(q[1])[:300]}")
    if v[0] != "ok" and a[0] == "ok":
        if not _only_appended(before, after, kb, old, ends):
            dis.append("validate refused, the append succeeded and changed committed bytes")
        elif _outcome(lambda: validate_kb(kb))[0] == "ok":
            dis.append("validate refused, but accepts the KB after an append (the damage was hidden)")
    if dis:
        res["disagree"] = dis
    if a[0] == "refused" and after != before:
        res["touched"] = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    res["refusals"] = {what: out[1] for what, out in (("validate", v), ("query", q), ("append", a)) if out[0] == "refused"}
    shutil.rmtree(kb, ignore_errors=True)
    return res


def worker(args) -> None:
    os.fsync = lambda fd: None  # durability is not under test: 5x more cases per second
    sys.addaudithook(_audit)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # an unbounded allocation fails instead of swapping
    from kb_tools.storage.commit_log import read_state
    from kb_tools.storage.knowledge_base import KnowledgeBase

    bases, work = Path(args.bases), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    expected = {}
    for b in BASES:
        kb = KnowledgeBase.open(bases / b)
        q = kb.full_keys("latent", kb.fingerprint.stored_steps[0], [1]) + 0.01
        kb.close()
        expected[b] = {"q": q, "fp": read_state(bases / b).fingerprint, "truth": _base_truth(bases / b, q)}
    for line in sys.stdin:
        n = int(line)
        if n == args.inject_crash:  # tests the harness: this case must be counted as a crash
            os.kill(os.getpid(), 11)
        print("done " + json.dumps(run_case(n, args.seed, bases, work, expected)), flush=True)


# ---- the driver ---------------------------------------------------------------------------------

class Worker:
    def __init__(self, args, bases: Path, wid: int) -> None:
        cmd = [sys.executable, __file__, "--worker", "--bases", str(bases), "--work", str(Path(args.work) / f"w{wid}"), "--seed", str(args.seed),
               "--inject-crash", str(args.inject_crash)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT)
        self.current: int | None = None
        self.since = 0.0

    def give(self, n: int) -> None:
        """Send one case; the worker answers it with one line (never two lines in flight, so
        select() on the pipe always sees the answer)."""
        self.current, self.since = n, time.time()
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()


def drive(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bases = make_bases(work)
    todo = list(range(args.first, args.first + args.cases))
    todo.reverse()
    counts = {"cases": 0, "crash": 0, "hang": 0, "worker_error": 0, "raw": 0, "disagree": 0, "touched": 0, "outside": 0}
    by_validate = {"ok": 0, "refused": 0, "raw": 0}
    by_outcome: dict[str, int] = {}
    findings = []
    workers = [Worker(args, bases, i) for i in range(args.workers)]
    t0 = time.time()
    for w in workers:
        if todo:
            w.give(todo.pop())
    log = open(work / "results.jsonl", "w", buffering=1) if args.keep_results else None
    shown = 0
    while any(w.current is not None for w in workers):
        ready, _, _ = select.select([w.proc.stdout for w in workers if w.current is not None], [], [], 5)
        for w in workers:
            if w.current is None:
                continue
            if w.proc.stdout in ready:
                line = w.proc.stdout.readline()
                if not line:  # the worker died: the case it was running is the crash
                    rc = w.proc.wait()
                    kind = "crash" if rc < 0 else "worker_error"  # a signal, or a bug of this script
                    counts["cases"] += 1
                    counts[kind] += 1
                    findings.append({"case": w.current, kind: rc})
                    print(f"{kind.upper()} case {w.current}: worker exited {rc}", flush=True)
                    i = workers.index(w)
                    workers[i] = Worker(args, bases, i)
                    if todo:
                        workers[i].give(todo.pop())
                    continue
                if not line.startswith("done "):
                    continue
                res = json.loads(line[5:])
                counts["cases"] += 1
                by_validate[res["validate"]] = by_validate.get(res["validate"], 0) + 1
                key = f"validate {res['validate']}, query {res['query']}, append {res['append']}"
                by_outcome[key] = by_outcome.get(key, 0) + 1
                for k in ("raw", "disagree", "touched", "outside"):
                    if k in res:
                        counts[k] += 1
                        findings.append(res)
                        print(f"{k.upper()} case {res['case']}: {res['mutations']} {res[k]}", flush=True)
                if log:
                    log.write(json.dumps(res) + "\n")
                w.current = None
                if todo:
                    w.give(todo.pop())
            elif time.time() - w.since > args.case_timeout:
                w.proc.kill()
                w.proc.wait()
                counts["cases"] += 1
                counts["hang"] += 1
                findings.append({"case": w.current, "hang": args.case_timeout})
                print(f"HANG case {w.current}", flush=True)
                i = workers.index(w)
                workers[i] = Worker(args, bases, i)
                if todo:
                    workers[i].give(todo.pop())
        if args.progress and counts["cases"] // 1000 > shown:
            shown = counts["cases"] // 1000
            print(f"  {counts['cases']} cases, {time.time() - t0:.0f} s", flush=True)
    for w in workers:
        w.proc.stdin.close()
        w.proc.wait()
    summary = {"cases": counts["cases"], "seed": args.seed, "workers": args.workers, "wall_s": round(time.time() - t0, 1), **counts,
               "validate": by_validate, "outcomes": dict(sorted(by_outcome.items(), key=lambda kv: -kv[1])), "findings": findings[:50]}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0, help="number of the first case (a case is reproducible from seed and number)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/kb_fuzz")
    ap.add_argument("--case-timeout", type=float, default=120.0)
    ap.add_argument("--keep-results", action="store_true", help="write every case's result to WORK/results.jsonl")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bases", help=argparse.SUPPRESS)
    ap.add_argument("--inject-crash", type=int, default=-1, help=argparse.SUPPRESS)  # the harness' own test
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    s = drive(args)
    print(json.dumps({k: v for k, v in s.items() if k != "findings"}, indent=1))
    return 1 if any(s[k] for k in ("crash", "hang", "worker_error", "raw", "disagree", "touched", "outside")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
