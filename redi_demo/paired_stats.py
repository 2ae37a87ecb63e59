"""Statistics for benchmarks judged per image: standard errors, paired differences, failures.

Every benchmark setting is run on the same queries (prompts and seeds), so two settings are
compared image by image: the difference of their per-image values, its mean and standard
error. Frechet distance is a statistic of the whole set, so its standard error (and the
standard error of a difference of two) comes from a bootstrap over images, resampled in
pairs. An image *fails* on its own when it lies under 15 dB PSNR to the full run of the same
prompt and seed, or loses an attribute that the full run got right.

Pure numpy: no ComfyUI, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAIL_DB = 15.0  # an image this far from its full run is a different picture


@dataclass(frozen=True)
class RealStats:
    """The real images' feature statistics, precomputed once for many Frechet distances."""

    mean: np.ndarray
    sqrt_cov: np.ndarray
    trace: float

    @classmethod
    def of(cls, real_features: np.ndarray) -> RealStats:
        cov = np.cov(real_features, rowvar=False)
        w, v = np.linalg.eigh(cov)
        return cls(real_features.mean(0), (v * np.sqrt(np.clip(w, 0, None))) @ v.T, float(np.trace(cov)))


def frechet(features: np.ndarray, real: RealStats) -> float:
    """Frechet distance between Gaussians fitted to `features` and to the real images.
    tr sqrt(Ca Cr) = tr sqrt(Cr^1/2 Ca Cr^1/2), from a symmetric eigen-decomposition: the same
    value as scipy's sqrtm up to rounding, in milliseconds."""
    ca = np.cov(features, rowvar=False)
    ev = np.linalg.eigvalsh(real.sqrt_cov @ ca @ real.sqrt_cov)
    return float(((features.mean(0) - real.mean) ** 2).sum() + np.trace(ca) + real.trace - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def bootstrap_indices(n: int, reps: int = 200, seed: int = 0) -> np.ndarray:
    """`reps` resamples of n image indices, with replacement; share them between settings so
    that their bootstrap statistics are paired."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 images, got {n}")
    return np.random.default_rng(seed).integers(n, size=(reps, n))


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float

    def clear_of(self, k: float = 2.0) -> bool:
        """True when the value is more than k standard errors away from 0."""
        return abs(self.value) > k * self.se

    def __str__(self) -> str:
        return f"{self.value:.3g} ± {self.se:.2g}"


def mean_se(values: np.ndarray) -> Estimate:
    """The mean of per-image values and its standard error."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError(f"a standard error needs at least 2 images, got {len(v)}")
    return Estimate(float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))))


@dataclass(frozen=True)
class Paired:
    """a - b over the same images: the mean difference, its standard error, and the share of
    images where a is larger."""

    diff: Estimate
    share_a_larger: float


def paired(a: np.ndarray, b: np.ndarray) -> Paired:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: {a.shape} vs {b.shape}")
    d = a - b
    return Paired(mean_se(d), float((d > 0).mean()))


def frechet_se(features: np.ndarray, real: RealStats, idx: np.ndarray) -> Estimate:
    """Frechet distance of the set and its bootstrap standard error over images."""
    boots = [frechet(features[i], real) for i in idx]
    return Estimate(frechet(features, real), float(np.std(boots, ddof=1)))


def paired_frechet(fa: np.ndarray, fb: np.ndarray, real: RealStats, idx: np.ndarray) -> Estimate:
    """frechet(fa) - frechet(fb) over the same images, with the bootstrap standard error of the
    difference (both sets resampled with the same indices)."""
    if fa.shape != fb.shape:
        raise ValueError(f"paired features need the same images: {fa.shape} vs {fb.shape}")
    boots = [frechet(fa[i], real) - frechet(fb[i], real) for i in idx]
    return Estimate(frechet(fa, real) - frechet(fb, real), float(np.std(boots, ddof=1)))


def relative(diff: Estimate, base: float) -> Estimate:
    """A difference as a fraction of a baseline value (for "Frechet within 10%")."""
    return Estimate(diff.value / base, diff.se / abs(base))


def attributes_lost(correct: np.ndarray, correct_full: np.ndarray) -> np.ndarray:
    """Per image: True when some attribute the full run got right is wrong here.
    `correct` and `correct_full` are boolean arrays (images, attributes)."""
    correct, correct_full = np.asarray(correct, dtype=bool), np.asarray(correct_full, dtype=bool)
    if correct.shape != correct_full.shape:
        raise ValueError(f"attribute tables differ in shape: {correct.shape} vs {correct_full.shape}")
    return (correct_full & ~correct).any(axis=1)


def failures(psnr: np.ndarray, correct: np.ndarray, correct_full: np.ndarray, fail_db: float = FAIL_DB) -> np.ndarray:
    """Per image: True when it is under `fail_db` PSNR to its full run or lost an attribute."""
    return (np.asarray(psnr, dtype=float) < fail_db) | attributes_lost(correct, correct_full)


def share_se(flags: np.ndarray) -> Estimate:
    """The share of True flags and its binomial standard error (0 when none or all are True:
    then see `upper_bound_share`)."""
    f = np.asarray(flags, dtype=float)
    p = float(f.mean())
    return Estimate(p, float(np.sqrt(p * (1 - p) / len(f))))


def upper_bound_share(flags: np.ndarray) -> float:
    """A 95% upper bound on the true share of True flags (exact binomial, Clopper-Pearson);
    with no failure in n images it is about 3 / n (the rule of three)."""
    from scipy.stats import beta

    f = np.asarray(flags, dtype=bool)
    k, n = int(f.sum()), len(f)
    return 1.0 if k == n else float(beta.ppf(0.95, k + 1, n - k))
