"""The two shipped demo models and the sampling settings each is measured at (pure data).

sd1: the SD1.x-architecture UNet (epsilon prediction, ComfyUI's SD1 discrete schedule).
dit: the Flux-architecture DiT (rectified flow with Flux's time shift), sampled on the
     "simple" schedule that Flux graphs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoModel:
    name: str
    ckpt: str  # file name in models/ (what Load Checkpoint lists)
    config: str  # the ComfyUI model config class that loads it
    title: str
    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 6.0


MODELS = {
    "sd1": DemoModel("sd1", "redi_demo_shapes.safetensors", "ReDiDemoShapes", "SD1.x UNet demo model"),
    "dit": DemoModel("dit", "redi_demo_shapes_dit.safetensors", "ReDiDemoDiT", "Flux DiT demo model", scheduler="simple", cfg=3.0),
}


def by_checkpoint(path: str | Path) -> DemoModel:
    """The demo model a checkpoint file is (by its file name), for scripts that take --ckpt."""
    name = Path(path).name
    for model in MODELS.values():
        if model.ckpt == name:
            return model
    raise SystemExit(f"{name} is not one of the demo models ({', '.join(m.ckpt for m in MODELS.values())})")
