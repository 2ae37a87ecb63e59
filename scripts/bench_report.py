"""Per-image benchmark tables: every figure with its standard error, every comparison paired.

Used by the benchmark scripts. A row (one setting run on the benchmark's queries) carries its
per-image values: `psnr_items` (PSNR to the full run of the same prompt and seed) and `correct`
(images x attributes, whether the evaluator reads the prompt's value); its image features are
passed beside it. The statistics are in redi_demo/paired_stats.py.
"""

from __future__ import annotations

import numpy as np

from redi_demo import paired_stats as ps


def _acc_items(row: dict) -> np.ndarray:
    return np.asarray(row["correct"], dtype=float).mean(axis=1)


def summarize(rows: list[dict], feats: dict[str, np.ndarray], real: ps.RealStats, idx: np.ndarray, full: str) -> None:
    """Add to each row its figures with standard errors, each paired with the full run's:
    accuracy and its difference (points), Frechet and its relative difference, PSNR, and the
    share of failing images (under 15 dB or an attribute lost) with its 95% upper bound."""
    base = next(r for r in rows if r["name"] == full)
    acc_full, fb = _acc_items(base), feats[full]
    for r in rows:
        acc = _acc_items(r)
        r["acc"] = ps.mean_se(acc).__dict__
        r["frechet_est"] = ps.frechet_se(feats[r["name"]], real, idx).__dict__
        if r["name"] == full:
            continue
        r["acc_diff"] = ps.paired(acc, acc_full).diff.__dict__
        d = ps.paired_frechet(feats[r["name"]], fb, real, idx)
        r["frechet_rel_diff"] = ps.relative(d, ps.frechet(fb, real)).__dict__
        r["psnr_est"] = ps.mean_se(r["psnr_items"]).__dict__
        fails = ps.failures(r["psnr_items"], r["correct"], base["correct"])
        r["fail_share"] = ps.share_se(fails).__dict__
        r["fail_upper"] = ps.upper_bound_share(fails)
        r["below_15db"] = int((np.asarray(r["psnr_items"]) < ps.FAIL_DB).sum())
        r["attr_lost"] = int(ps.attributes_lost(r["correct"], base["correct"]).sum())


def within_tolerance(row: dict, acc_points: float = 2.0, frechet_rel: float = 0.10, max_below_15db: float = 0.01) -> bool:
    """The benchmark's tolerance: accuracy within `acc_points` and Frechet within `frechet_rel` of
    the full run, each allowing two standard errors, and at most `max_below_15db` of the images
    under 15 dB to their full run (the per-image criterion)."""
    a, f = row["acc_diff"], row["frechet_rel_diff"]
    return (a["value"] * 100 + 2 * a["se"] * 100 >= -acc_points and f["value"] - 2 * f["se"] <= frechet_rel
            and row["below_15db"] <= max_below_15db * len(row["psnr_items"]))


def _pm(e: dict, scale: float = 1.0, fmt: str = ".2f", sign: bool = False) -> str:
    return f"{e['value'] * scale:{'+' if sign else ''}{fmt}} ± {e['se'] * scale:.2f}"


def table(rows: list[dict], full: str, cost_key: str = "sd15_cost", cost_label: str = "SD1.5-size cost (x full)") -> str:
    head = (f"| group | setting | {cost_label} | accuracy % | vs full, points | Frechet | vs full, % | PSNR dB | "
            "failing images (95% bound) | under 15 dB / attribute lost | within tolerance |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r["name"] == full:
            lines.append(f"| {r['group']} | {r['name']} | 1.00 | {_pm(r['acc'], 100, '.1f')} | - | {_pm(r['frechet_est'])} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['group']} | {r['name']} | {r[cost_key]:.3f} | {_pm(r['acc'], 100, '.1f')} | {_pm(r['acc_diff'], 100, '.1f', True)} | "
            f"{_pm(r['frechet_est'])} | {_pm(r['frechet_rel_diff'], 100, '.1f', True)} | {_pm(r['psnr_est'])} | "
            f"{r['fail_share']['value']:.1%} ({r['fail_upper']:.1%}) | {r['below_15db']} / {r['attr_lost']} | "
            f"{'yes' if within_tolerance(r) else 'no'} |")
    return "\n".join(lines)


def _verdict(e: ps.Estimate, higher_is_better: bool) -> str:
    if not e.clear_of(2.0):
        return "tie"
    return "better" if (e.value > 0) == higher_is_better else "worse"


def paired_table(rows: list[dict], feats: dict[str, np.ndarray], real: ps.RealStats, idx: np.ndarray, name: str, full: str,
                 cost_key: str = "sd15_cost") -> str:
    """Row `name` against every other row over the same images: PSNR, Frechet and accuracy
    differences with their standard errors, and a verdict each (a difference under two
    standard errors is a tie)."""
    ref = next((r for r in rows if r["name"] == name), None)
    if ref is None:
        return f"(no row named {name!r})"
    lines = [f"Paired over the same images: {name} (cost {ref[cost_key]:.3f}) minus each row.", "",
             "| row | cost | PSNR dB | images closer | PSNR | Frechet | Frechet | accuracy, points | accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r is ref or r["name"] == full:
            continue
        p = ps.paired(ref["psnr_items"], r["psnr_items"])
        f = ps.paired_frechet(feats[name], feats[r["name"]], real, idx)
        a = ps.paired(_acc_items(ref), _acc_items(r)).diff
        lines.append(f"| {r['name']} | {r[cost_key]:.3f} | {p.diff.value:+.2f} ± {p.diff.se:.2f} | {p.share_a_larger:.0%} | "
                     f"{_verdict(p.diff, True)} | {f.value:+.2f} ± {f.se:.2f} | {_verdict(f, False)} | "
                     f"{a.value * 100:+.2f} ± {a.se * 100:.2f} | {_verdict(a, True)} |")
    return "\n".join(lines)
