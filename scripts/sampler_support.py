"""Which stock samplers and schedulers ReDi supports, measured on the demo model in one process.

    .venv/bin/python scripts/sampler_support.py [--samplers euler,uni_pc] [--schedulers normal,karras]
                                                [--kb-size 16] [--queries 8] [--out out/sampler_support]

For every pair of ComfyUI's KSampler.SAMPLERS x KSampler.SCHEDULERS (or the ones named): a KB of
--kb-size prompts built by the pack's own builder (seed 1024), then --queries new prompts at the KB's
seed (latent keys, as key_space auto picks for them) and at new seeds (denoised keys): the full run
(each image as a batch of one would sample it) and ReDi (k=4, v=10, H=1, the guard at its defaults).
Columns: mean PSNR of ReDi to the full run and the evaluator's attribute accuracy of both, per regime.

Verdict: works = mean PSNR >= 20 dB and accuracy at most 2 points below the full run's in both
regimes; refused = the pack refuses the sampler (the message is shown); anything else FAILS.
--write-verdicts records the failing pairs in comfy_adapter/sampler_verdicts.json, which the pack reads to
refuse them (with the samplers that work with that scheduler); a FAILS pair the pack does not refuse
makes the exit status 1. "(guard n/m)" counts items the guard sampled in full.

Each pair's result is cached in OUT/pairs/ (a re-run skips measured pairs); the table goes to
docs/sampler_support.md and every item's guard statistics to OUT/guard_items.json (the guard's
calibration, `--calibrate` prints it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redi_core.retrieval import landing_disagreements  # noqa: E402
from redi_demo import dataset, demo_models, evaluator, host  # noqa: E402

SEED, K, V = 1024, 4, 10
PSNR_MIN, ACC_POINTS = 20.0, 2.0
FAIL_DB = 15.0  # the per-image criterion: an image under 15 dB to its full run is a failed image
MAX_FAILURE_RATE = 0.01  # a pair ships as "works" only with at most 1% failed images per regime


def patched(model, patch: str):
    """The demo model with a sampling or guidance patch, applied by ComfyUI's own node (the KB is
    built with the same patch: the classes ReDi fingerprints)."""
    if patch == "none":
        return model
    import comfy_extras.nodes_apg as apg
    import comfy_extras.nodes_cfg as cfgs
    import comfy_extras.nodes_model_advanced as adv

    made = {
        "zsnr": lambda: adv.ModelSamplingDiscrete().patch(model, "eps", True),
        "rescalecfg1": lambda: adv.RescaleCFG().patch(model, 1.0),
        "apg": lambda: apg.APG.execute(model, eta=0.0, norm_threshold=2.0, momentum=-0.5),
        "cfgzerostar": lambda: cfgs.CFGZeroStar.execute(model),
    }[patch]()
    return made.result[0] if hasattr(made, "result") else made[0]


PATCHES = ("none", "zsnr", "rescalecfg1", "apg", "cfgzerostar")


class Support:
    def __init__(self, out: Path, kb_size: int, queries: int, patch: str = "none", model: str = "sd1", prompt_seed: int = 999) -> None:
        host.load_pack()
        self.cs = importlib.import_module("redi_accelerate.comfy_adapter")
        # what no verdict covers yet is what this script measures
        importlib.import_module("redi_accelerate.comfy_adapter.samplers").REFUSE_UNMEASURED = False
        self.kb_nodes = importlib.import_module("redi_accelerate.nodes.kb_nodes")
        # the nodes raise the pack's own KBError (the pack is imported as redi_accelerate)
        KBError = importlib.import_module("redi_accelerate.kb_tools.errors").KBError
        from kb_tools.storage.knowledge_base import KnowledgeBase
        from redi_core.retrieval import GUARD_DEFAULTS, ReDiParams, retrieve

        self.KBError, self.KnowledgeBase, self.ReDiParams, self.retrieve = KBError, KnowledgeBase, ReDiParams, retrieve
        self.guard = GUARD_DEFAULTS
        self.demo = demo_models.MODELS[model]
        self.cfg, self.steps = self.demo.cfg, self.demo.steps
        self.model, self.clip, self.vae = host.load_checkpoint(ROOT / "models" / self.demo.ckpt)
        self.model = patched(self.model, patch)
        self.net = evaluator.load()
        self.out = out
        self.arrays: dict | None = None  # set to {} to keep every item's states (--arrays)
        # the key space at the KB's seed: what key_space auto picks there for this model's kind
        self.same_keys = importlib.import_module("redi_accelerate.comfy_adapter.kb_match").AUTO_AT_KB_SEED[self.cs.samplers.model_kind(self.model)]
        self.kb_prompts = [s.prompt() for s in dataset.random_samples(kb_size, 12345, styles=("plain",))]
        self.samples = dataset.random_samples(queries, prompt_seed, styles=("plain",))
        self.cond = self.kb_nodes.encode_batch(self.clip, [s.prompt() for s in self.samples])
        neg = self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True)
        self.negative = [[neg[0], {"pooled_output": neg[1]}]]

    @torch.no_grad()
    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        return (self.vae.decode(latent).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def refusal(self, sampler: str, scheduler: str, per_scheduler: bool = False) -> str | None:
        """The pack's refusal of this sampler (with per_scheduler: of this pair), or None."""
        try:
            self.cs.check_sampler(sampler, scheduler if per_scheduler else None, self.model)
        except self.KBError as e:
            return str(e)
        return None

    def pair(self, sampler: str, scheduler: str, measure_refused: bool = False) -> dict:
        t0 = time.perf_counter()
        row = {"sampler": sampler, "scheduler": scheduler}
        refused = self.refusal(sampler, scheduler)
        if refused and not measure_refused:
            return {**row, "verdict": "refused", "message": refused, "seconds": 0.0}
        path = self.out / "kb" / f"{sampler}__{scheduler}"
        shutil.rmtree(path, ignore_errors=True)
        lifted = self._refusals_off() if self.refusal(sampler, scheduler, per_scheduler=True) else contextlib.nullcontext()
        with lifted, torch.inference_mode():  # as the server runs a prompt (uni_pc's finish on a flow model needs it)
            self._measure(sampler, scheduler, path, row)
        row.update(verdict=verdict(row), seconds=time.perf_counter() - t0)
        if refused:
            row.update(measured=row["verdict"], verdict="refused", message=refused)
        return row

    @contextlib.contextmanager
    def _refusals_off(self):
        """The pack's sampler refusals lifted, to measure a refused pair (its KB build refuses it too)."""
        samplers = importlib.import_module("redi_accelerate.comfy_adapter.samplers")
        restart, verdicts = dict(samplers.RESTART_FAILS), samplers.VERDICTS
        samplers.RESTART_FAILS.clear()
        samplers.VERDICTS = {kind: {"fails": {}, "works": {}} for kind in samplers.KINDS}
        try:
            yield
        finally:
            samplers.RESTART_FAILS.update(restart)
            samplers.VERDICTS = verdicts

    def _measure(self, sampler: str, scheduler: str, path: Path, row: dict) -> None:
        self.kb_nodes.build_kb(self.model, self.clip, path, self.kb_prompts, "", sampler, scheduler, self.steps, self.cfg, 64, 64,
                               len(self.kb_prompts), "fixed", SEED, (K, V), refuse_unsupported=False)
        kb = self.KnowledgeBase.open(path)  # format 2 reads rows on demand: the folder is removed after the queries
        try:
            self._queries(kb, sampler, scheduler, row)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _queries(self, kb, sampler: str, scheduler: str, row: dict) -> None:
        """ReDi against the full run at the KB's seed and at new seeds; fills row[regime] and row["items"]."""
        ph = self.cs.Phases(self.model, self.steps, self.cfg, sampler, scheduler, self.negative, preview=False)
        n = len(self.samples)
        latent = torch.zeros((n, 4, 8, 8))
        items = []
        for regime, space in (("same", self.same_keys), ("new", "denoised")):
            seeds = [SEED] * n if regime == "same" else [5000 + i for i in range(n)]
            noise = self.cs.noise_for(latent, seeds)
            full_latent = ph.full(self.cond, latent, noise, seeds[0], item_seeds=seeds).float().cpu()
            full = self._decode(full_latent)
            state = ph.key_phase(self.cond, latent, noise, seeds[0], K, item_seeds=seeds)
            sigma_v = float(ph.sigmas[V])
            noise = self.cs.noise_levels_of(self.model, ph.sigmas, K, V)
            off = self.retrieve(kb, state, self.ReDiParams(K, V, 1, space, 0.0, 0.0, 0.0), sigma_v)
            on_params = self.ReDiParams(K, V, 1, space, **self.guard)
            on = self.retrieve(kb, state, on_params, sigma_v, noise=noise)
            all_idx = np.arange(n)
            cap = ph.finish_capture(V)  # the finish's first denoised estimate, on the blend (no extra model call)
            redi_off = self._decode(ph.finish(self.cond, off.x_v, V, seeds[0], record=cap).float().cpu())
            after_jump = cap.ds[V].numpy()
            redi_on = redi_off.copy()
            # the guard's landing check, as the nodes' finish makes it (the blend is the guard-off one: H=1, same neighbour)
            landing = landing_disagreements(after_jump, state.denoised)
            lands = landing <= on_params.max_landing if on_params.landing_on else np.ones(n, dtype=bool)
            rej = np.flatnonzero(~(on.accepted & lands))
            if len(rej):
                lat = ph.finish(self.cond, state.x[rej], K, seeds[0], rows=rej)
                redi_on[rej] = self._decode(lat.float().cpu())
            p_off, p_on = evaluator.psnr(redi_off, full), evaluator.psnr(redi_on, full)
            acc = {name: float(np.mean(list(evaluator.accuracy(self.net, imgs, self.samples).values())))
                   for name, imgs in (("full", full), ("redi", redi_on), ("redi_off", redi_off))}
            for b in all_idx:
                r = off.reports[b]
                items.append({"sampler": sampler, "scheduler": scheduler, "regime": regime, "distance": r.distances[0],
                              "residual": r.residual, "weight_dev": abs(float(np.sum(r.weights)) - 1.0),
                              "denoised_distance": r.denoised_distance, "psnr": float(p_off[b]), "accepted": bool(on.accepted[b]),
                              "psnr_guard_on": float(p_on[b]), "landing": float(landing[b]), "lands": bool(lands[b])})
            if self.arrays is not None:  # every item's states, for studying per-image predictors offline
                self.arrays[regime] = {"after_jump": after_jump, "query_denoised": state.denoised, "key": state.x, "blend": off.x_v,
                                       "full": full_latent.numpy(), "psnr": p_off, "accepted": on.accepted & lands}
            row[regime] = {"psnr": float(np.mean(p_on)), "psnr_guard_off": float(np.mean(p_off)), "acc_full": acc["full"],
                           "below15": int((p_on < FAIL_DB).sum()), "below15_guard_off": int((p_off < FAIL_DB).sum()),
                           "acc_redi": acc["redi"], "acc_redi_guard_off": acc["redi_off"], "rejected": len(rej), "n": n}
        row["items"] = items


    def restart(self, sampler: str, scheduler: str = "normal") -> list[float]:
        """PSNR of a finish from v started on the query's OWN trajectory (3 prompts, seeds 1024, 5001,
        5002) to the full run: what the sampler loses by restarting at v, whatever the KB holds."""
        cond = self.kb_nodes.encode_batch(self.clip, [s.prompt() for s in self.samples[:3]])
        seeds = [SEED, 5001, 5002]
        latent = torch.zeros((3, 4, 8, 8))
        noise = self.cs.noise_for(latent, seeds)
        ph = self.cs.Phases(self.model, self.steps, self.cfg, sampler, scheduler, self.negative, preview=False)
        plan = self.cs.NoisePlan(sampler, ph.sigmas, seeds[0], 3, seeds)
        cap = self.cs.Capture(sampler, noise=plan)
        full = ph._run(cap, cond, latent, noise, ph.sigmas, seeds[0])
        ph.noise_plan = plan
        out = ph.finish(cond, cap.xs[V].numpy(), V, seeds[0])
        return evaluator.psnr(self._decode(out.float().cpu()), self._decode(full.float().cpu())).tolist()


def failure_rate(m: dict) -> float | None:
    """The share of images under FAIL_DB to their full run (guard on); None for rows measured before it was recorded."""
    return m["below15"] / m["n"] if "below15" in m else None


def verdict(row: dict) -> str:
    """works: in both regimes, mean PSNR >= PSNR_MIN, accuracy at most ACC_POINTS below the full run's, and
    per image at most MAX_FAILURE_RATE of the images under FAIL_DB (rows that predate it: the means only)."""
    def ok(m: dict) -> bool:
        rate = failure_rate(m)
        return (m["psnr"] >= PSNR_MIN and (m["acc_full"] - m["acc_redi"]) * 100 <= ACC_POINTS
                and (rate is None or rate <= MAX_FAILURE_RATE))
    return "works" if all(ok(row[r]) for r in ("same", "new")) else "FAILS"


def why(row: dict) -> str:
    """The first way a failing pair missed the tolerance, for the refusal message."""
    kb = f" with a {row['kb_size']:,}-entry KB" if "kb_size" in row else ""
    for r, label in (("same", f"at the KB's seed{kb}"), ("new", f"at new seeds{kb}")):
        m = row[r]
        if m["psnr"] < PSNR_MIN:
            return f"{m['psnr']:.1f} dB from the full run {label}"
        if (m["acc_full"] - m["acc_redi"]) * 100 > ACC_POINTS:
            return f"accuracy {100 * m['acc_redi']:.0f}% vs {100 * m['acc_full']:.0f}% for the full run {label}"
        rate = failure_rate(m)
        if rate is not None and rate > MAX_FAILURE_RATE:
            return f"{m['below15']} of {m['n']} images under {FAIL_DB:g} dB to their full run {label}"
    return "within tolerance"


def write_verdicts(rows: list[dict], path: Path, kind: str = "eps", made_by: str = "") -> None:
    """comfy_adapter/sampler_verdicts.json: the pairs the pack refuses (FAILS here) and the ones that work, for
    epsilon models (the file's top level) or flow models (its "flow" section). The measured pairs replace
    their old verdicts; pairs not measured in this run keep theirs."""
    data = json.loads(path.read_text())
    section = data if kind == "eps" else data.setdefault("flow", {})
    measured = {(r["sampler"], r["scheduler"]) for r in rows if "same" in r}
    fails = {s: {k: v for k, v in per.items() if k == "*" or (s, k) not in measured} for s, per in section.get("fails", {}).items()}
    works: dict[str, list[str]] = {k: [s for s in v if (s, k) not in measured] for k, v in section.get("works", {}).items()}
    for r in rows:
        if "same" not in r:
            continue
        if verdict(r) == "FAILS":
            fails.setdefault(r["sampler"], {})[r["scheduler"]] = why(r)
            if kind == "eps" and r["scheduler"] == "normal" and min(r["same"]["psnr"], r["new"]["psnr"]) < PSNR_MIN:
                # broken images, not a few points of accuracy: refused with every scheduler
                fails[r["sampler"]]["*"] = why(r) + " with the normal scheduler"
        else:
            works.setdefault(r["scheduler"], []).append(r["sampler"])
    section["fails"] = {s: per for s, per in sorted(fails.items()) if per}
    section["works"] = {k: sorted(set(v)) for k, v in sorted(works.items()) if v}
    if made_by:
        section["made_by"] = made_by
    path.write_text(json.dumps(data, indent=1) + "\n")


# The per-image bar a pair must pass to be served (comfy_adapter.samplers.unverified_reason): held-out query
# prompts (not the ones the guard was calibrated on), 96 queries per regime with a 16-entry KB and 48 per
# regime (96 items) with a 1,000-entry KB, and at most 1% of the images under 15 dB in every run.
VERIFY_RUNS = ((16, 96), (1000, 48))
VERIFY_PROMPT_SEED = 777


def verify(args) -> None:
    """Measure each pair under the per-image bar (cached in out/verifyKB[-model]/pairs), print and write
    docs/sampler_verification[_model].md, and with --write-verdicts record the verified pairs and the failing ones."""
    suffix = "" if args.model == "sd1" else f"-{args.model}"
    by_pair: dict[tuple[str, str], list[dict]] = {}
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",") if p]
    same_keys = "denoised"
    for kb_size, queries in VERIFY_RUNS:
        out = ROOT / "out" / f"verify{kb_size}{suffix}"
        (out / "pairs").mkdir(parents=True, exist_ok=True)
        sup = Support(out, kb_size, queries, "none", args.model, VERIFY_PROMPT_SEED)
        same_keys = sup.same_keys
        for s, sch in pairs or [tuple(f.stem.split("__")) for f in sorted((out / "pairs").glob("*.json"))]:
            f = out / "pairs" / f"{s}__{sch}.json"
            if not f.is_file():
                row = sup.pair(s, sch, measure_refused=True)
                f.write_text(json.dumps(row))
                print(f"KB {kb_size:5d} {s:20s} {sch:14s} {row.get('measured', row['verdict']):6s} same {cell(row, 'same'):34s} "
                      f"new {cell(row, 'new'):34s} ({row['seconds']:.0f}s)", flush=True)
            row = json.loads(f.read_text())
            row["verdict"] = verdict(row)  # today's tolerance
            row["kb_size"] = kb_size
            by_pair.setdefault((s, sch), []).append(row)
    # a pair that misses the bar in one run fails (the other run is not needed); one that passed every run is verified
    failed = {p: next(r for r in rows if r["verdict"] != "works") for p, rows in by_pair.items() if any(r["verdict"] != "works" for r in rows)}
    verified = sorted(p for p, rows in by_pair.items() if len(rows) == len(VERIFY_RUNS) and p not in failed)
    items = [i for rows in by_pair.values() for r in rows for i in r.get("items", [])]
    lines = ["| sampler | scheduler | KB 16: KB's seed | KB 16: new seeds | KB 1,000: KB's seed | KB 1,000: new seeds | verified |",
             "|---|---|---|---|---|---|---|"]
    for (s, sch), rows in sorted(by_pair.items(), key=lambda kv: (kv[0] not in verified, kv[0])):
        by_size = {r["kb_size"]: r for r in rows}
        cells = " | ".join(f"{cell(by_size[kb], 'same')} | {cell(by_size[kb], 'new')}" if kb in by_size else "not run | not run"
                           for kb, _ in VERIFY_RUNS)
        status = "yes" if (s, sch) in verified else f"no: {why(failed[(s, sch)])}" if (s, sch) in failed else "not yet (one run missing)"
        lines.append(f"| {s} | {sch} | {cells} | {status} |")
    demo = demo_models.MODELS[args.model]
    md = (f"# ReDi per-image verification{' on ' + demo.title if suffix else ''}\n\n"
          f"Made by `.venv/bin/python scripts/sampler_support.py --verify --pairs ...{' --model ' + args.model if suffix else ''}` on "
          f"{platform.machine()} ({platform.processor() or 'CPU'}), {demo.title}, k={K}, v={V}, H=1, {demo.steps} steps, cfg {demo.cfg:g}, "
          f"the guard at its defaults (landing check included), `key_space` auto ({same_keys} keys at the KB's seed, denoised "
          f"keys at new seeds). Query prompts from seed {VERIFY_PROMPT_SEED} (held out: the guard "
          f"was calibrated on seed 999 and 4242). Per run: "
          + ", ".join(f"a {kb}-entry KB with {q} queries per regime" for kb, q in VERIFY_RUNS)
          + ". A pair is verified when every run keeps mean PSNR >= 20 dB, accuracy within 2 points of the full run and at most "
          f"1% of its images under {FAIL_DB:g} dB in both regimes. Cells: mean PSNR to the full run, accuracy ReDi vs full (%), "
          "images under 15 dB, items the guard sampled in full.\n\n" + "\n".join(lines)
          + "\n\n## Guard statistics of these runs (guard off)\n\n" + calibration(items) + "\n")
    table = ROOT / "docs" / f"sampler_verification{'_' + args.model if suffix else ''}.md"
    table.write_text(md)
    print("\n".join(lines) + f"\n\nwrote {table.relative_to(ROOT)}")
    if args.write_verdicts:
        kind = "flow" if args.model == "dit" else "eps"
        failing = list(failed.values())
        path = ROOT / "comfy_adapter" / "sampler_verdicts.json"
        write_verdicts(failing, path, kind)
        write_verified(verified, path, kind, "docs/" + table.name)
        print(f"wrote comfy_adapter/sampler_verdicts.json: {len(verified)} verified, {len(failing)} refused")


def write_verified(pairs: list[tuple[str, str]], path: Path, kind: str, where: str) -> None:
    """The pairs that passed the per-image bar, in the verdicts file's "verified" table (added to the ones there)."""
    data = json.loads(path.read_text())
    section = data if kind == "eps" else data.setdefault("flow", {})
    verified: dict[str, set] = {k: set(v) for k, v in section.get("verified", {}).items()}
    fails = section.get("fails", {})
    for s, sch in pairs:
        verified.setdefault(sch, set()).add(s)
        if "*" not in fails.get(s, {}):  # the bar's larger measurement supersedes an older per-pair failure
            fails.get(s, {}).pop(sch, None)
    section["fails"] = {s: per for s, per in fails.items() if per}
    failing = {(s, k) for s, per in section["fails"].items() for k in per}
    section["verified"] = {k: sorted(s for s in v if (s, k) not in failing and (s, "*") not in failing) for k, v in sorted(verified.items())}
    works = section.setdefault("works", {})
    for k, v in section["verified"].items():  # verified is stricter than works
        works[k] = sorted(set(works.get(k, [])) | set(v))
    section["verified_by"] = (f"scripts/sampler_support.py --verify (per image: at most 1% under {FAIL_DB:g} dB; "
                              + ", ".join(f"KB {kb} x {q} queries per regime" for kb, q in VERIFY_RUNS) + f"; {where})")
    path.write_text(json.dumps(data, indent=1) + "\n")


def previous_rows(md: Path) -> dict[tuple[str, str], str]:
    """The "Every pair" lines of an earlier table, by (sampler, scheduler): pairs this run did not measure keep them."""
    if not md.is_file():
        return {}
    text = md.read_text()
    if "## Every pair" not in text:
        return {}
    section = text.split("## Every pair", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) >= 3 and line.startswith("| ") and cols[0] not in ("sampler", "---") and cols[1] != "all":
            out[(cols[0], cols[1])] = line
    return out


def previous_verdict(line: str) -> str:
    v = [c.strip() for c in line.strip().strip("|").split("|")][2]
    return "works" if v.startswith("works") else "refused" if v.startswith(("refused", "FAILS")) else "not measured"


def cell(row: dict, regime: str) -> str:
    r = row[regime]
    guard = f" (guard {r['rejected']}/{r['n']})" if r["rejected"] else ""
    failed = f", {r['below15']}/{r['n']} < {FAIL_DB:g} dB" if "below15" in r else ""
    return f"{r['psnr']:.1f} dB, {100 * r['acc_redi']:.0f} vs {100 * r['acc_full']:.0f}{failed}{guard}"


def table(rows: list[dict], samplers: list[str], schedulers: list[str], wide: dict[str, str],
          previous: dict[tuple[str, str], str] | None = None) -> str:
    """Every pair; `wide`: the pack's refusal of each sampler refused with every scheduler; `previous`: lines
    of an earlier table for the pairs not measured in OUT/pairs."""
    by = {(r["sampler"], r["scheduler"]): r for r in rows}
    previous = previous or {}
    lines = ["| sampler | scheduler | verdict | KB's seed: PSNR, acc ReDi vs full | new seeds: PSNR, acc ReDi vs full |", "|---|---|---|---|---|"]
    for s in samplers:
        if s in wide:
            lines.append(f"| {s} | all | refused | {wide[s].split(';')[0]} | |")
            continue
        for sch in schedulers:
            r = by.get((s, sch))
            if r is None:
                lines.append(previous.get((s, sch), f"| {s} | {sch} | not measured | | |"))
            elif r["verdict"] == "refused":
                why = "refused: " + r["message"].split(" (")[0]
                if "same" in r:
                    lines.append(f"| {s} | {sch} | {why}; measured anyway: {r.get('measured')} | {cell(r, 'same')} | {cell(r, 'new')} |")
                else:
                    lines.append(f"| {s} | {sch} | {why} | | |")
            else:
                lines.append(f"| {s} | {sch} | {r['verdict']} | {cell(r, 'same')} | {cell(r, 'new')} |")
    return "\n".join(lines)


def summary(rows: list[dict], samplers: list[str], schedulers: list[str], wide: dict[str, str],
            previous: dict[tuple[str, str], str] | None = None) -> str:
    """One line per sampler: the schedulers it works with, is refused with, and not yet measured with."""
    by: dict[tuple[str, str], dict] = {pair: {"verdict": previous_verdict(line)} for pair, line in (previous or {}).items()}
    by.update({(r["sampler"], r["scheduler"]): r for r in rows})
    by = {pair: r for pair, r in by.items() if r["verdict"] != "not measured"}
    lines = ["| sampler | works with | refused with | not measured |", "|---|---|---|---|"]
    for s in samplers:
        if s in wide:
            lines.append(f"| {s} | | every scheduler: {wide[s].split(';')[0].split(' (')[0]} | |")
            continue
        works = [sch for sch in schedulers if by.get((s, sch), {}).get("verdict") == "works"]
        refused = [sch for sch in schedulers if by.get((s, sch), {}).get("verdict") in ("refused", "FAILS")]
        missing = [sch for sch in schedulers if (s, sch) not in by]
        lines.append(f"| {s} | {', '.join(works)} | {', '.join(refused)} | {', '.join(missing)} |")
    return "\n".join(lines)


def calibration(items: list[dict]) -> str:
    """Quantiles of each guard statistic for good and failed items (guard off), and the trade-off of the
    per-image predictor (denoised distance, latent keys): good retrievals given up against failures caught."""
    lines = []
    for label, fail in ((f"under {PSNR_MIN:g} dB", PSNR_MIN), (f"under {FAIL_DB:g} dB (per-image criterion)", FAIL_DB)):
        good = [i for i in items if i["psnr"] >= fail]
        bad = [i for i in items if i["psnr"] < fail]
        lines += [f"{len(good)} good items, {len(bad)} failed ({label}), guard off", "",
                  "| statistic | items | min | 10% | 50% | 90% | max |", "|---|---|---|---|---|---|---|"]
        for stat in ("distance", "residual", "weight_dev", "denoised_distance"):
            for name, group in (("good", good), ("failed", bad)):
                v = np.array([i[stat] for i in group if i.get(stat) is not None])
                if len(v):
                    q = np.quantile(v, [0, 0.1, 0.5, 0.9, 1.0])
                    lines.append(f"| {stat} | {name} ({len(v)}) | " + " | ".join(f"{x:.3f}" for x in q) + " |")
        lines.append("")
    landed = [i for i in items if i.get("landing") is not None]
    if landed:
        lines += [f"landing check (the finish's first estimate vs the query's at k; 1 - correlation), guard off, under {FAIL_DB:g} dB = failed:", "",
                  "| regime | max landing | good given up | failed caught |", "|---|---|---|---|"]
        for regime in ("same", "new"):
            lines += tradeoff([i for i in landed if i["regime"] == regime], "landing", (0.4, 0.5, 0.6, 0.7, 0.8), f"| {regime} ")
        lines.append("")
    latent = [i for i in items if i.get("denoised_distance") is not None]
    if latent:
        bad = sum(i["psnr"] < FAIL_DB for i in latent)
        lines += [f"denoised-distance threshold, latent keys ({len(latent) - bad} good, {bad} failed under {FAIL_DB:g} dB):", "",
                  "| max denoised distance | good given up | failed caught |", "|---|---|---|"]
        lines += tradeoff(latent, "denoised_distance", (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0))
    return "\n".join(lines)


def tradeoff(items: list[dict], stat: str, thresholds: tuple[float, ...], prefix: str = "") -> list[str]:
    """Table rows of a per-image predictor: at each threshold on `stat`, the good items (FAIL_DB or more,
    guard off) it would give up and the failed ones it would catch."""
    good = [i[stat] for i in items if i["psnr"] >= FAIL_DB]
    bad = [i[stat] for i in items if i["psnr"] < FAIL_DB]
    return [f"{prefix}| {t:g} | {sum(v > t for v in good)} of {len(good)} | {sum(v > t for v in bad)} of {len(bad)} |" for t in thresholds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", default="")
    ap.add_argument("--schedulers", default="")
    ap.add_argument("--kb-size", type=int, default=16)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "out" / "sampler_support"))
    ap.add_argument("--table", default=str(ROOT / "docs" / "sampler_support.md"))
    ap.add_argument("--calibrate", action="store_true", help="print the guard statistics of every measured item")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prompt-seed", type=int, default=999, help="seed of the query prompts (another one: a held-out set)")
    ap.add_argument("--model", choices=list(demo_models.MODELS), default="sd1",
                    help="the demo model (dit: the Flux DiT; its pairs go to OUT-dit and its table to docs/sampler_support_dit.md)")
    ap.add_argument("--patch", choices=PATCHES, default="none", help="build and query with this model patch (pairs go to OUT/pairs-PATCH)")
    ap.add_argument("--measure-refused", action="store_true", help="measure pairs the pack refuses too")
    ap.add_argument("--arrays", action="store_true", help="also keep every item's states in OUT/arrays/ (predictor studies)")
    ap.add_argument("--same-keys", choices=("latent", "denoised"), default="",
                    help="the key space of the queries at the KB's seed (default: what key_space auto picks for the model)")
    ap.add_argument("--verify", action="store_true",
                    help="the per-image bar for --pairs (held-out prompts, a 16- and a 1,000-entry KB; docs/sampler_verification.md)")
    ap.add_argument("--pairs", default="", help="with --verify: sampler/scheduler,... (empty: the pairs already measured)")
    ap.add_argument("--no-measure", action="store_true", help="only rebuild the table (and verdicts) from OUT/pairs")
    ap.add_argument("--write-verdicts", action="store_true", help="write the failing pairs to comfy_adapter/sampler_verdicts.json (the pack refuses them)")
    ap.add_argument("--restart", action="store_true",
                    help="only measure each sampler's finish from v on the query's own trajectory (no KB, normal scheduler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model != "sd1":
        args.out += f"-{args.model}"
        args.table = args.table.replace(".md", f"_{args.model}.md")
    if args.verify:
        return verify(args)
    out = Path(args.out) if args.patch == "none" else Path(args.out) / f"patch-{args.patch}"
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    sup = Support(out, args.kb_size, args.queries, args.patch, args.model, args.prompt_seed)
    sup.same_keys = args.same_keys or sup.same_keys
    import comfy.samplers as cs

    all_samplers, all_schedulers = list(cs.KSampler.SAMPLERS), list(cs.KSampler.SCHEDULERS)
    samplers = [s for s in args.samplers.split(",") if s] or all_samplers
    schedulers = [s for s in args.schedulers.split(",") if s] or all_schedulers
    if args.restart:
        sup.cs.RESTART_FAILS.clear()  # measure the refused ones too
        for s in samplers:
            if s in sup.cs.OWN_STEPS:
                continue
            p = sup.restart(s)
            print(f"| {s} | " + ", ".join(f"{v:.1f}" for v in p) + f" | {np.mean(p):.1f} |", flush=True)
        return
    for s in samplers if not args.no_measure else []:
        for sch in schedulers:
            f = out / "pairs" / f"{s}__{sch}.json"
            if f.is_file() and not (json.loads(f.read_text())["verdict"] == "refused" and sup.refusal(s, sch) is None):
                continue
            if args.arrays:
                sup.arrays = {}
            row = sup.pair(s, sch, args.measure_refused)
            if args.arrays and sup.arrays:
                (out / "arrays").mkdir(exist_ok=True)
                np.savez_compressed(out / "arrays" / f"{s}__{sch}.npz",
                                    **{f"{regime}_{name}": a for regime, d in sup.arrays.items() for name, a in d.items()})
            f.write_text(json.dumps(row))
            if row["verdict"] == "refused" and "same" not in row:
                print(f"{s:28s} refused: {row['message'][:90]}", flush=True)
                break  # pair() leaves only samplers refused with every scheduler unmeasured
            print(f"{s:28s} {sch:16s} {row['verdict']:6s} same {cell(row, 'same'):34s} new {cell(row, 'new'):34s} "
                  f"({row['seconds']:.0f}s)", flush=True)
    rows = []
    for f in sorted((out / "pairs").glob("*.json")):
        row = json.loads(f.read_text())
        if "same" in row and row["verdict"] != "refused":
            row["verdict"] = verdict(row)  # today's tolerance
        refused = sup.refusal(row["sampler"], row["scheduler"], per_scheduler=True)
        if refused and row["verdict"] != "refused":  # measured before the pack refused it
            row.update(measured=row["verdict"], verdict="refused", message=refused)
        elif not refused and row["verdict"] == "refused":
            continue  # no longer refused: measure it again
        rows.append(row)
    items = [i for r in rows for i in r.get("items", [])]
    (out / "guard_items.json").write_text(json.dumps(items))
    import comfyui_version

    table_path = Path(args.table)
    old_text = table_path.read_text() if table_path.is_file() else ""
    previous = {p: line for p, line in previous_rows(table_path).items() if p not in {(r["sampler"], r["scheduler"]) for r in rows}}
    head = (f"Made by `.venv/bin/python scripts/sampler_support.py` on {platform.machine()} ({platform.processor() or 'CPU'}), "
            f"{sup.demo.title}, KB of {args.kb_size} prompts, {args.queries} query prompts per regime, k={K}, v={V}, H=1, {sup.steps} steps, "
            f"cfg {sup.cfg:g}, guard at its defaults. accuracy: the evaluator's mean attribute accuracy in %.")
    guard = "\n\n## Guard statistics (guard off)\n\n" + calibration(items) + "\n"
    if previous:  # a partial run (new samplers of a newer host): the other pairs keep their earlier lines and header
        settings = head.split(" demo model, ", 1)[1].split(". accuracy:")[0]
        head = old_text.split("\n\n")[1] if old_text.count("\n\n") > 1 else head
        head += (f"\n\nThe pairs measured in the latest run (ComfyUI {comfyui_version.__version__}, {settings}): "
                 + ", ".join(sorted(f"{r['sampler']}/{r['scheduler']}" for r in rows)) + "; every other line is from the earlier runs.")
        marker = "\n## Guard statistics (guard off)"
        earlier = old_text.split(marker, 1)[1] if marker in old_text else "\n\n(none)\n"
        earlier = earlier.split("\n## Guard statistics of the latest run", 1)[0]
        guard = ("\n\n## Guard statistics (guard off)" + earlier.rstrip() + "\n\n## Guard statistics of the latest run (guard off)\n\n"
                 + calibration(items) + "\n")
    wide = {s: m for s in all_samplers if (m := sup.refusal(s, ""))}
    served = ("A pair this grid calls works is served (steps skipped) only once it passed the per-image bar of "
              "`--verify`: [sampler_verification.md](sampler_verification.md) (DiT: [sampler_verification_dit.md](sampler_verification_dit.md)); the others are sampled in full, and the report says why.")
    md = ("# ReDi sampler and scheduler support\n\n" + head + "\n\n" + served + "\n\n## Per sampler\n\n"
          + summary(rows, all_samplers, all_schedulers, wide, previous)
          + "\n\n## Every pair\n\n" + table(rows, all_samplers, all_schedulers, wide, previous) + guard)
    table_path.write_text(md)
    print(f"\nwrote {args.table}")
    if args.calibrate:
        print(calibration(items))
    if args.write_verdicts:
        kind = "flow" if args.model == "dit" else "eps"
        write_verdicts(rows, ROOT / "comfy_adapter" / "sampler_verdicts.json", kind,
                       f".venv/bin/python scripts/sampler_support.py --model {args.model} --kb-size {args.kb_size} --queries {args.queries} "
                       f"({sup.demo.title}, k={K}, v={V}, H=1, {sup.steps} steps, cfg {sup.cfg:g})" if kind == "flow" else "")
        print("wrote comfy_adapter/sampler_verdicts.json")
    failing = [f"{r['sampler']}/{r['scheduler']}" for r in rows if r["verdict"] == "FAILS"
               and sup.refusal(r["sampler"], r["scheduler"], per_scheduler=True) is None]
    if failing:
        print("FAILS and not refused (run with --write-verdicts to refuse them):", ", ".join(failing))
        sys.exit(1)


if __name__ == "__main__":
    main()
