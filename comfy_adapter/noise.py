"""The noise of a ReDi run: the initial noise per item, and the noise a stochastic sampler draws
later, arranged so that every phase of a split run draws what the full run draws."""

from __future__ import annotations

import comfy.k_diffusion.sampling as kds
import comfy.sample
import numpy as np
import torch

from .samplers import BROWNIAN, BROWNIAN_GPU, DETERMINISTIC


class NoisePlan:
    """The noise a stochastic sampler draws after the initial noise, arranged so that every phase of a
    ReDi run draws what the full run draws at the same steps:

    - Brownian-tree samplers (the SDE ones) get the tree over the WHOLE schedule's sigma range (a run
      on sigmas[v:] would build it over [sigma_min, sigma_v] and draw other increments);
    - generator samplers (ancestral, lcm, ...) get the seeded generator advanced past the draws the
      full run makes before the phase's first step (counted in the key phase, per step);
    - `item_seeds`: each item draws what a batch of one with its seed draws (KB builds, benchmarks);
      otherwise the batch shares the stock generator and a subset of items takes its rows."""

    def __init__(self, sampler: str, sigmas: torch.Tensor, seed: int, batch: int, item_seeds: list[int] | None = None) -> None:
        self.sampler, self.sigmas, self.seed, self.batch, self.item_seeds = sampler, sigmas.cpu(), seed, batch, item_seeds
        self.draws = 0  # noise-sampler calls of the key phase
        self.key_steps = 0

    @property
    def active(self) -> bool:
        return self.sampler not in DETERMINISTIC

    def skip_for(self, start: int) -> int:
        return 0 if start == 0 or not self.key_steps else round(self.draws / self.key_steps * start)

    def make(self, x: torch.Tensor, idx: np.ndarray | None, start: int, count: bool):
        """A noise sampler for a phase starting at step `start`, for the batch rows `idx` of `x`'s batch."""
        rows = np.arange(x.shape[0]) if idx is None else np.asarray(idx)
        shape = (self.batch, *x.shape[1:])
        proto = torch.zeros(shape, dtype=x.dtype, device=x.device)
        brownian = self.sampler in BROWNIAN or self.sampler in BROWNIAN_GPU
        if brownian:
            cpu = self.sampler in BROWNIAN
            sig = self.sigmas if cpu else self.sigmas.to(x.device)
            lo, hi = sig[sig > 0].min(), sig.max()
            if self.item_seeds is not None:
                fns = [kds.BrownianTreeNoiseSampler(proto[:1], lo, hi, seed=self.item_seeds[r], cpu=cpu) for r in rows]
            else:
                tree = kds.BrownianTreeNoiseSampler(proto, lo, hi, seed=self.seed, cpu=cpu)
                fns = [lambda s, sn, tree=tree: tree(s, sn)[torch.as_tensor(rows)]]
        else:
            skip = self.skip_for(start)
            if self.item_seeds is not None:
                fns = [_skipped(kds.default_noise_sampler(proto[:1], seed=self.item_seeds[r]), skip) for r in rows]
            else:
                gen = _skipped(kds.default_noise_sampler(proto, seed=self.seed), skip)
                fns = [lambda s, sn, gen=gen: gen(s, sn)[torch.as_tensor(rows)]]

        def sample(sigma, sigma_next):
            if count:
                self.draws += 1
            return torch.cat([f(sigma, sigma_next) for f in fns])

        return sample


def _skipped(noise_sampler, n: int):
    for _ in range(n):
        noise_sampler(None, None)
    return noise_sampler


def noise_for(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-item noise: item b gets exactly the noise a batch-1 run with seeds[b] gets."""
    return torch.cat([comfy.sample.prepare_noise(latent[b : b + 1], s) for b, s in enumerate(seeds)])
