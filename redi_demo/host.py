"""Importing ComfyUI in a plain Python process (training, benchmarks, CLI builds).

Inside the ComfyUI server none of this is needed; scripts call `load_comfy()`
first so that `import comfy...` finds the host tree installed by the bootstrap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMFY_DIR = PACK_ROOT / ".host" / "ComfyUI"


def load_comfy(comfy_dir: str | os.PathLike | None = None) -> Path:
    """Put ComfyUI on sys.path in CPU mode and register the demo model. Idempotent."""
    path = Path(comfy_dir or os.environ.get("REDI_COMFY_DIR") or DEFAULT_COMFY_DIR).resolve()
    if not (path / "comfy" / "model_management.py").is_file():
        raise SystemExit(f"ComfyUI not found at {path}: run `bash scripts/bootstrap.sh` first, or set REDI_COMFY_DIR")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not _has_cuda():
            args.cpu = True
    from redi_demo import model_config

    model_config.register()
    return path


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_pack(package: str = "redi_accelerate"):
    """Import this pack as a package, the way ComfyUI's loader does, so that the node
    glue (relative imports) runs in headless tools. Returns the package module."""
    import importlib.util

    load_comfy()
    if package in sys.modules:
        return sys.modules[package]
    spec = importlib.util.spec_from_file_location(package, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return module


def load_checkpoint(path: str | os.PathLike):
    """(model, clip, vae) from a checkpoint file, with ComfyUI's stock loader."""
    load_comfy()
    import comfy.sd

    if not Path(path).is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae
