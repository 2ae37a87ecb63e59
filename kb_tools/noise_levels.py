"""Which key and value steps a noise schedule allows ReDi to use.

Retrieval needs an image in the key (a key step still at almost pure noise matches any
prompt), and the finish needs enough noise left at the value step to correct the blended
value: below some noise level the picture keeps its neighbours' content (their shape, colour,
place) instead of the query's. Both limits are noise-to-signal ratios, so they hold for any
scheduler and step count: sigma itself for eps/v-prediction models, sigma / (1 - sigma) for
flow models (x = (1 - t) x0 + t noise).

Calibrated on the demo model (`scripts/sampler_support.py`, README "Sampler support"): with
k=4, v=10 of 20 steps, the value-step noise of normal (1.48), simple (1.61), beta (1.62) and
ddim_uniform (1.38) schedules kept every sampler within tolerance; karras (1.09), kl_optimal
(0.89) and exponential (0.55) lost up to 5 points of accuracy at the KB's seed; linear_quadratic's
key step (14.5, the schedule's start) found no useful neighbours at new seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_KEY_NSR = 10.0  # above this at the key step the latent is still almost pure noise
MIN_VALUE_NSR = 1.2  # below this at the value step the finish cannot correct the blended value


def noise_ratio(sigma: float, flow: bool) -> float:
    """Noise-to-signal ratio of a latent at `sigma`."""
    if not flow:
        return float(sigma)
    return math.inf if sigma >= 1.0 else float(sigma) / (1.0 - float(sigma))


def usable_steps(sigmas: Sequence[float], flow: bool) -> tuple[list[int], list[int]]:
    """(key steps, value steps) of a schedule (step i = after i steps) whose noise allows ReDi."""
    nsr = [noise_ratio(float(s), flow) for s in sigmas]
    steps = len(nsr) - 1
    keys = [i for i in range(1, steps) if nsr[i] <= MAX_KEY_NSR]
    values = [i for i in range(2, steps + 1) if nsr[i] >= MIN_VALUE_NSR]
    return keys, values


def step_problem(sigmas: Sequence[float], key_step: int, value_step: int, flow: bool, schedule: str) -> str | None:
    """None when (key_step, value_step) suits this schedule, else what is wrong and which steps to use.

    `schedule` names the scheduler and step count in the message (e.g. "karras at 20 steps")."""
    nsr = [noise_ratio(float(s), flow) for s in sigmas]
    keys, values = usable_steps(sigmas, flow)
    pairs = [(k, v) for k in keys for v in values if v > k]
    hint = ""
    if pairs:
        k_lo = min(k for k, _ in pairs)
        v_hi = max(v for _, v in pairs)
        hint = f"; with {schedule} use a key step of at least {k_lo} and a value step of at most {v_hi}"
    else:
        hint = f"; {schedule} leaves no such pair of steps: use the normal, simple or beta scheduler, or more steps"
    problems = []
    if nsr[key_step] > MAX_KEY_NSR:
        problems.append(f"at key step {key_step} the latent is still almost pure noise (noise ratio {nsr[key_step]:.3g}, "
                        f"at most {MAX_KEY_NSR:g} needed), so retrieval would match any prompt")
    if nsr[value_step] < MIN_VALUE_NSR:
        problems.append(f"at value step {value_step} too little noise is left (noise ratio {nsr[value_step]:.3g}, at least "
                        f"{MIN_VALUE_NSR:g} needed) for the remaining steps to correct the retrieved value: the image would "
                        "keep the neighbours' content")
    if not problems:
        return None
    return "; ".join(problems) + hint
