"""How much noise is left at the key and value steps, and what the quality guard makes of it.

Retrieval needs an image in the key: denoised estimates of a latent at almost pure noise all
look alike (latent keys at the KB's own seed still work there: their noise is the same). And
the finish needs noise left at the value step to correct the blended value: with little noise
left, a neighbour that is not close keeps its own content (shape, colour, place) in the image.
Both limits are noise-to-signal ratios, so they hold for any scheduler and step count: sigma
itself for eps/v-prediction models, sigma / (1 - sigma) for flow models.

Calibrated on the demo model (`scripts/sampler_support.py`, docs/how_redi_works.md): KB of 32
prompts, 24 queries per regime, k=4 and v=10 of 20 steps across the 9 schedulers. With a
noise ratio of 1.38 or more at v (normal, simple, sgm_uniform, beta, ddim_uniform) items at
any key distance up to 0.5 (latent keys) stayed within tolerance (1% below 20 dB); at 0.55-1.09
(exponential, kl_optimal, karras) 22-62% of the latent-key items with a nearest key farther than
0.2 fell below 20 dB, and none of those closer than 0.2. Denoised keys (new seeds, distances
0.3-1.4) kept every item within 20 dB at karras' 1.09 but lost 10-42% at 0.55-0.89. The
benchmark's large KB reaches v=14 (ratio 0.73) at 58 dB because its neighbours are that close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_KEY_NSR = 10.0  # above this at the key step, denoised keys cannot tell prompts apart (eps/v models)
# Flow models (measured on the Flux DiT demo, scripts/bench_dit.py --seeds per-image --noise-guard off, docs/dit.md):
# denoised keys at ratio 28.4 (step 2 of 20, simple) served as well as at 12.6 or 7.4 (the same accuracy, no image
# under 15 dB), so the limit sits above the measured range; step 1 (ratio 60) was not measured and stays refused
FLOW_MAX_KEY_NSR = 30.0
# below this at the value step only close neighbours are used (per key space: denoised keys, which
# serve new seeds, stayed within tolerance at karras' 1.09 where latent keys did not) ...
MIN_VALUE_NSR = {"latent": 1.2, "denoised": 1.0}
LOW_NOISE_MAX_DISTANCE = 0.2  # ... nearest key within this relative distance


def noise_ratio(sigma: float, flow: bool) -> float:
    """Noise-to-signal ratio of a latent at `sigma`."""
    if not flow:
        return float(sigma)
    return math.inf if sigma >= 1.0 else float(sigma) / (1.0 - float(sigma))


@dataclass(frozen=True)
class NoiseLevels:
    key: float  # noise ratio after the key step
    value: float  # noise ratio at the value step
    flow: bool = False  # a flow (rectified-flow) model: its own key limit

    @classmethod
    def of(cls, sigmas: Sequence[float], key_step: int, value_step: int, flow: bool) -> NoiseLevels:
        return cls(noise_ratio(float(sigmas[key_step]), flow), noise_ratio(float(sigmas[value_step]), flow), flow)

    @property
    def max_key(self) -> float:
        return FLOW_MAX_KEY_NSR if self.flow else MAX_KEY_NSR

    def _keys_blind(self, key_space: str) -> bool:
        return key_space == "denoised" and self.key > self.max_key

    @staticmethod
    def _min_value(key_space: str) -> float:
        return MIN_VALUE_NSR.get(key_space, max(MIN_VALUE_NSR.values()))

    def rejection(self, key_space: str, distance: float, value_step: int) -> str | None:
        """Why the guard sends an item whose nearest key lies at relative `distance` to full sampling, or None."""
        if self._keys_blind(key_space):
            return (f"the key step is still almost pure noise (noise ratio {self.key:.3g} > {self.max_key:g}), where denoised keys "
                    "cannot tell prompts apart; use a later key step")
        low = self._min_value(key_space)
        if self.value < low and distance > LOW_NOISE_MAX_DISTANCE:
            return (f"little noise is left at value step {value_step} (noise ratio {self.value:.2f} < {low:g}) to correct "
                    f"a neighbour at distance {distance:.3f} (> {LOW_NOISE_MAX_DISTANCE:g} there); use a lower value step or a larger KB")
        return None

    def summary(self, key_space: str) -> str | None:
        """A report line when the noise levels tighten the guard, else None."""
        if self._keys_blind(key_space):
            return f"guard: the key step is almost pure noise (noise ratio {self.key:.3g}): denoised keys are not used"
        low = self._min_value(key_space)
        if self.value < low:
            return (f"guard: noise ratio {self.value:.2f} at the value step (< {low:g}): only neighbours within distance "
                    f"{LOW_NOISE_MAX_DISTANCE:g} are used")
        return None
