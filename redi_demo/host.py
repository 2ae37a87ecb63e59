"""Importing ComfyUI in a plain Python process (training, benchmarks, CLI builds).

Inside the ComfyUI server none of this is needed; scripts call `load_comfy()`
first so that `import comfy...` finds the host tree installed by the bootstrap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
# The ComfyUI versions the pack is tested on, each installed by scripts/bootstrap.sh into its own
# ignored folders (virtualenv, host tree); REDI_COMFY picks one, the first is the default.
HOSTS: dict[str, str] = {"0.30.0": "", "0.3.75": "-0.3.75"}
DEFAULT_HOST = "0.30.0"


def host_version(name: str | None = None) -> str:
    """The host REDI_COMFY (or `name`) selects, as a key of HOSTS."""
    name = name or os.environ.get("REDI_COMFY") or DEFAULT_HOST
    version = {"0.30": "0.30.0"}.get(name, name)
    if version not in HOSTS:
        raise SystemExit(f"REDI_COMFY={name} is not a supported host ({', '.join(HOSTS)})")
    return version


def host_comfy_dir(name: str | None = None) -> Path:
    """The ComfyUI tree the bootstrap installs for that host (REDI_COMFY_DIR overrides it)."""
    override = os.environ.get("REDI_COMFY_DIR")
    if override and name is None:
        return Path(override).resolve()
    return PACK_ROOT / f".host{HOSTS[host_version(name)]}" / "ComfyUI"


def host_python(name: str | None = None) -> Path:
    """The Python of that host's virtualenv."""
    return PACK_ROOT / f".venv{HOSTS[host_version(name)]}" / "bin" / "python"


DEFAULT_COMFY_DIR = host_comfy_dir()


def load_comfy(comfy_dir: str | os.PathLike | None = None) -> Path:
    """Put ComfyUI on sys.path in CPU mode and register the demo model. Idempotent."""
    path = Path(comfy_dir or host_comfy_dir()).resolve()
    if not (path / "comfy" / "model_management.py").is_file():
        raise SystemExit(
            f"ComfyUI not found at {path}: run `bash scripts/bootstrap.sh` first (with the same REDI_COMFY), or set REDI_COMFY_DIR"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not _has_cuda():
            args.cpu = True
    from redi_demo import dit_config, model_config

    model_config.register()
    dit_config.register()
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
