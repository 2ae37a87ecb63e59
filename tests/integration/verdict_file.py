"""The shipped sampler x scheduler verdicts, for tests whose expectation depends on them."""

import json
from pathlib import Path

VERDICTS = json.loads((Path(__file__).resolve().parents[2] / "comfy_adapter" / "sampler_verdicts.json").read_text())


def verified(sampler: str, scheduler: str, kind: str = "eps") -> bool:
    """Whether ReDi serves this pair (skips steps) instead of sampling every image in full."""
    table = VERDICTS if kind == "eps" else VERDICTS["flow"]
    return sampler in table.get("verified", {}).get(scheduler, [])


def unverified_working_pair() -> tuple[str, str]:
    """A pair that works by the grid's means but is not verified per image (ReDi holds it in full)."""
    for scheduler, samplers in sorted(VERDICTS["works"].items()):
        for s in samplers:
            if s in ("euler", "heun", "euler_ancestral", "dpmpp_2m", "ddim", "lcm") and not verified(s, scheduler):
                return s, scheduler
    raise AssertionError("every working pair is verified")
