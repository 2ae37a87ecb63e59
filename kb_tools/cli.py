"""`python -m kb_tools COMMAND`: build, inspect, validate, merge and query ReDi knowledge bases.

    build     sample prompts headlessly into a KB (the KB Builder node's own code path), or with
              --workers URL,URL,... on several ComfyUI servers at once (fault-tolerant, resumable)
    inspect   fingerprint, size and sample prompts of a KB
    validate  read every file, row and checksum; exit 1 listing every problem found
    merge     join KBs built elsewhere (same fingerprint) into a new one
    query     nearest stored trajectories of one stored entry or of a latent file
    upgrade   convert a format-1 KB into a new format-2 KB (lossless)
    recall    recall of the reduced-key search + re-rank against exact search, on a KB's own keys
    bench-scale  write a synthetic KB of a given size through the real writer and time it
    library   list or prune a KB library (a folder of KBs that ReDi KSampler / ReDi Record fill)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from . import builder
from .errors import KBError, is_kb_error
from .storage.commit_log import listed_files, read_state
from .storage.disk_format import DEFAULT_STORED_STEPS, read_header
from .storage.knowledge_base import KnowledgeBase


def _kb_size(path: Path) -> int:
    return sum((path / f).stat().st_size for f in listed_files(path))


def cmd_inspect(args) -> None:
    kb_dir = Path(args.kb)
    header = read_header(kb_dir)
    st = read_state(kb_dir, header)
    print(json.dumps({"kb": kb_dir.name, "format_version": 2, "entries": st.count, "shards": len(st.shards), "units": len(st.units),
                      "dtype": header.dtype, "key_pool": header.pool, "key_dims": header.key_dims,
                      "ivf_indexes": sorted(st.indexes), "bytes": _kb_size(kb_dir), "fingerprint": header.fingerprint.to_json()}, indent=1))
    if st.count:
        kb = KnowledgeBase(kb_dir, st)
        for e in kb.entries[: args.samples]:
            print(f"  seed {e.seed} pos {e.pos}: {e.prompt}")


def cmd_validate(args) -> None:
    from .storage.validate import validate_kb

    n = validate_kb(Path(args.kb))
    print(f"ok: {Path(args.kb).name}, {n} entries; every file, row checksum, value and index checked")


def cmd_upgrade(args) -> None:
    from .storage.upgrade import upgrade

    st = upgrade(Path(args.old), Path(args.new), dtype=args.dtype)
    print(f"upgraded {args.old} -> {args.new}: {st.count} entries, format 2, {args.dtype}")


def cmd_recall(args) -> None:
    from .measure.recall import measure_recall, print_table

    print_table(measure_recall(Path(args.kb), args.space, args.step, args.queries, args.noise, args.h,
                               [int(v) for v in args.rerank.split(",")], [int(v) for v in args.key_dims.split(",")]))


def cmd_bench_scale(args) -> None:
    from .measure.bench_scale import run

    run(args)


def cmd_merge(args) -> None:
    m = builder.merge(Path(args.out), [Path(s) for s in args.sources])
    print(f"merged {len(args.sources)} KBs into {args.out}: {m.count} entries")


def cmd_query(args) -> None:
    kb = KnowledgeBase.open(Path(args.kb))
    if args.latent:
        from safetensors.numpy import load_file

        q = load_file(args.latent)["latent"].reshape(1, -1)
        label = args.latent
    else:
        if not 0 <= args.entry < len(kb):
            raise KBError(f"entry {args.entry} is out of range 0..{len(kb) - 1}")
        q = kb.full_keys(args.space, args.step, [args.entry])
        label = f"entry {args.entry}: {kb.entries[args.entry].prompt}"
    dist, ids = kb.search(args.space, args.step, q, args.n)
    print(f"query ({args.space} key at step {args.step}): {label}")
    qn = float(np.linalg.norm(q))
    for d, i in zip(dist[0], ids[0]):
        print(f"  {i:6d}  dist {d / max(qn, 1e-12):.4f}  {kb.entries[i].prompt}")


def _prompts_from_args(args) -> list[str]:
    lines = list(args.prompt or [])
    if args.prompts_file:  # the user's own file on their own shell: no input-folder confinement here
        path = Path(args.prompts_file)
        if not path.is_file():
            raise KBError(f"prompts file {path} not found; give a text file with one prompt per line")
        lines += path.read_text(encoding="utf-8").splitlines()
    prompts = builder.clean_prompts(lines)
    if not prompts:
        raise KBError("no prompts given: use --prompts-file FILE or --prompt TEXT")
    return prompts


def cmd_library(args) -> None:
    from .library import Library, describe

    root = Path(args.folder)
    if not root.is_dir():
        raise KBError(f"no library folder at {root}; give a folder under models/redi_kb (ReDi KSampler's `library` input creates it)")
    lib = Library(root)
    if args.action == "list":
        rows = describe(lib.list())
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"{'trajectories':>12}  {'gen':>3}  {'MB':>8}  name")
        for r in rows:
            print(f"{r['trajectories']:12d}  {r['generation']:3d}  {r['bytes'] / 1e6:8.2f}  {r['name']}")
        print(f"{len(rows)} KBs, {sum(r['trajectories'] for r in rows)} trajectories")
        return
    gone = lib.prune(keep_generations=args.keep_generations, dry_run=args.dry_run, empty=args.empty)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(gone)} KBs" + "".join(f"\n  {g}" for g in gone))


def cmd_build_distributed(args) -> None:
    from .distributed import build as dist_build

    if args.dtype != "float16":
        raise KBError("--dtype float32 is for in-process builds; the workers' KB Builder node stores float16")
    settings = dist_build.Settings(
        ckpt=args.ckpt, negative=args.negative, sampler=args.sampler, scheduler=args.scheduler, steps=args.steps,
        cfg=args.cfg, width=args.width, height=args.height, batch_size=args.batch_size, seed_mode=args.seed_mode,
        seed=args.seed, stored_steps=args.stored_steps,
    )
    limits = dist_build.Limits(unit_size=args.unit_size, unit_timeout=args.unit_timeout)
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    dist_build.run(workers, settings, _prompts_from_args(args), Path(args.out), limits)


def cmd_build(args) -> None:
    if args.workers:
        return cmd_build_distributed(args)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from redi_demo import host

    host.load_pack()
    kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
    model, clip, _vae = host.load_checkpoint(args.ckpt)
    prompts = _prompts_from_args(args)
    stored = kb_nodes.parse_steps(args.stored_steps, args.steps)

    def progress(done, total):
        print(f"\r{done}/{total} prompts", end="", flush=True)

    m = kb_nodes.build_kb(model, clip, Path(args.out), prompts, args.negative, args.sampler, args.scheduler, args.steps,
                          args.cfg, args.width, args.height, args.batch_size, args.seed_mode, args.seed, stored, progress,
                          dtype=args.dtype)
    print(f"\nKB {args.out}: {m.count} entries")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kb_tools", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="sample prompts into a KB (needs the bootstrap's ComfyUI)")
    p.add_argument("--ckpt", required=True, help="checkpoint file (e.g. models/redi_demo_shapes.safetensors); with --workers "
                   "the checkpoint's name as the workers' Load Checkpoint lists it (e.g. redi_demo_shapes.safetensors)")
    p.add_argument("--out", required=True, help="KB folder to create, continue or extend")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--negative", default="")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed-mode", choices=["fixed", "range"], default="fixed")
    p.add_argument("--seed", type=int, default=1024)
    p.add_argument("--stored-steps", default=DEFAULT_STORED_STEPS)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of a new KB (float32: twice the size)")
    p.add_argument("--workers", help="comma-separated ComfyUI server URLs with this pack (e.g. http://gpu1:8188,http://gpu2:8188); "
                   "without it the build runs in this process")
    p.add_argument("--unit-size", type=int, default=64, help="prompts per work unit sent to one worker (with --workers)")
    p.add_argument("--unit-timeout", type=float, default=1800.0, help="seconds a unit may take on a worker, queue wait included, "
                   "before it is cancelled and rebuilt elsewhere (with --workers)")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("inspect", help="fingerprint, size and sample prompts")
    p.add_argument("kb")
    p.add_argument("--samples", type=int, default=5)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("validate", help="check every file and checksum")
    p.add_argument("kb")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("merge", help="merge compatible KBs into a new one")
    p.add_argument("out")
    p.add_argument("sources", nargs="+")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("query", help="nearest neighbours of an entry or a latent")
    p.add_argument("kb")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--space", choices=["latent", "denoised"], default="latent")
    p.add_argument("--entry", type=int, default=0)
    p.add_argument("--latent", help="safetensors file holding a tensor named 'latent'")
    p.add_argument("-n", type=int, default=5)
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("upgrade", help="convert a format-1 KB into a new format-2 KB")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="float32 keeps it lossless (default)")
    p.set_defaults(func=cmd_upgrade)
    p = sub.add_parser("recall", help="recall of reduced-key search + re-rank against exact search")
    p.add_argument("kb")
    p.add_argument("--step", type=int, default=4)
    p.add_argument("--space", choices=["latent", "denoised"], default="latent")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.05, help="relative noise added to stored keys to make queries")
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--rerank", default="4,8,16,32,64")
    p.add_argument("--key-dims", default="16,64,256", help="pooled key sizes to compare")
    p.set_defaults(func=cmd_recall)
    p = sub.add_parser("bench-scale", help="synthetic KB through the real writer: size, open, query, append times")
    p.add_argument("--latent", default="4x8x8", help="CxHxW, e.g. 4x64x64 for SD1.5 at 512x512")
    p.add_argument("--entries", type=int, default=10000)
    p.add_argument("--stored-steps", default=DEFAULT_STORED_STEPS)
    p.add_argument("--batch", type=int, default=0, help="entries per append while writing (0: one shard's worth)")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--keep", help="leave the KB in this folder (a normal KB for inspect/validate/query)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: time an existing KB in a fresh process
    p.set_defaults(func=cmd_bench_scale)
    p = sub.add_parser("library", help="list or prune a KB library folder")
    p.add_argument("action", choices=["list", "prune"])
    p.add_argument("folder", help="the library folder, e.g. ComfyUI/models/redi_kb/my_library")
    p.add_argument("--json", action="store_true", help="list: one JSON object per KB")
    p.add_argument("--keep-generations", type=int, default=1, help="prune: generations of each KB to keep (newest first)")
    p.add_argument("--empty", action="store_true", help="prune: also remove KBs that hold no trajectory")
    p.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    p.set_defaults(func=cmd_library)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except Exception as e:  # a refusal from either import name of the pack (kb_tools.errors)
        if not is_kb_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
