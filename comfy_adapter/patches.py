"""Patches that change the denoiser without touching its weights (cfg functions, pre/post-cfg
functions, model function wrappers, block and attention patches, sampling wrappers, object
patches), and what ReDi does with each class of them:

- served: a KB built without the patch serves a query with it (measured within tolerance);
- fingerprinted: the patch and its settings become part of the KB's sampling fingerprint, so
  only a KB built with the same patch serves the query (and a library picks or makes one);
- refused: it misses ReDi's tolerance even from a KB built with it; the message says what was measured.

A patch the table does not know is fingerprinted: trajectories are only retrieved from runs that
were made with the same patch and settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Served from any KB, by the class (node) that installs the patch or the wrapper key. Measured on
# the demo model through a KB built without them: FreeU, FreeU_V2, PAG, SAG, ToMe, EasyCache and
# LazyCache; the pack's own FeatureReuse, UNet-call counter, build progress and recorder do not
# change the math of a full step.
SERVED_CLASSES = frozenset({
    "FreeU", "FreeU_V2", "PerturbedAttentionGuidance", "SelfAttentionGuidance", "TomePatchModel",
})
SERVED_WRAPPER_KEYS = frozenset({
    "easycache", "lazycache", "redi_frdiff", "redi_nfe_counter", "redi_kb_progress", "redi_record",
})
SERVED_MODULE_PREFIXES = ("comfy_extras.nodes_freelunch", "comfy_extras.nodes_pag", "comfy_extras.nodes_sag",
                          "comfy_extras.nodes_tomesd", "comfy_extras.nodes_easycache")
# Refused: measured to miss ReDi's tolerance even from a KB built with the same patch and settings
# (`scripts/sampler_support.py --patch NAME`, demo model, euler/normal, KB of 16 prompts, 24 queries
# per regime). owner class -> (a check on its settings, or None for every setting; the measurement)
REFUSED_CLASSES: dict[str, tuple[Callable[[dict], bool] | None, str]] = {
    "APG": (None, "accuracy 94% against 99% for the full run at new seeds, from a KB built with APG"),
    "RescaleCFG": (lambda v: float(v.get("multiplier", 1.0)) > 0.7,
                   "multiplier 1.0: accuracy 90% against 97% at new seeds, from a KB built with it (0.7 and below stay within tolerance)"),
}
# this pack's own patches (FeatureReuse, measured with ReDi; see docs)
PACK_PREFIX = __name__.rsplit(".comfy_adapter", 1)[0] + "."
# Object patches that other parts of the fingerprint already cover
COVERED_OBJECT_PATCHES = frozenset({"model_sampling"})


@dataclass(frozen=True)
class Patch:
    where: str  # e.g. "sampler_cfg_function", "patches.output_block_patch", "wrappers.outer_sample.easycache"
    owner: str  # the class (node) that made it, or the function's name
    settings: str  # a digest of its closure's values ("" when it has none)
    values: tuple = ()  # its closure's plain values (name, value), to read a setting such as a multiplier

    @property
    def refusal(self) -> str | None:
        rule = REFUSED_CLASSES.get(self.owner.split(".")[-1])
        if rule is None or self.served:
            return None
        check, why = rule
        return why if check is None or check(dict(self.values)) else None

    @property
    def served(self) -> bool:
        if self.where.startswith("wrappers.") and self.where.rsplit(".", 1)[-1] in SERVED_WRAPPER_KEYS:
            return True
        return (self.owner.split(".")[-1] in SERVED_CLASSES or self.owner.startswith(SERVED_MODULE_PREFIXES)
                or self.owner.startswith(PACK_PREFIX))

    def describe(self) -> str:
        name = self.owner.rsplit(".", 1)[-1]
        return f"{name}({self.settings})" if self.settings else name


def _owner(fn) -> str:
    """The module and class that defined a patch function ('comfy_extras.nodes_apg.APG')."""
    target = getattr(fn, "func", fn)  # functools.partial
    qual = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    head = qual.split(".<locals>")[0].split(".")
    cls = head[0] if len(head) > 1 else head[-1]
    return f"{module}.{cls}"


def _value_digest(v, h, depth: int) -> None:
    if depth > 3:
        return
    if isinstance(v, bool | int | float | str) or v is None:
        h.update(repr(v).encode())
    elif torch.is_tensor(v):
        h.update(f"T{tuple(v.shape)}{v.dtype}".encode())
        flat = v.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    elif isinstance(v, list | tuple):
        for x in v:
            _value_digest(x, h, depth + 1)
    elif callable(v):
        h.update(_owner(v).encode())
        _closure_digest(v, h, depth + 1)


def _closure_digest(fn, h, depth: int) -> None:
    target = getattr(fn, "func", fn)
    for cell in getattr(target, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.nn.Module) or hasattr(value, "model_options"):
            continue  # the model itself (or a patcher): not a setting
        _value_digest(value, h, depth)
    for v in (getattr(fn, "args", ()) or ()) + tuple((getattr(fn, "keywords", None) or {}).values()):
        _value_digest(v, h, depth)


def _plain_values(fn) -> tuple:
    target = getattr(fn, "func", fn)
    code = getattr(target, "__code__", None)
    out = []
    for name, cell in zip(getattr(code, "co_freevars", ()), getattr(target, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, bool | int | float | str):
            out.append((name, value))
    return tuple(out)


def _settings(fn) -> str:
    h = hashlib.sha256()
    _closure_digest(fn, h, 0)
    return h.hexdigest()[:10]


def _functions(where: str, value) -> Iterator[tuple[str, Callable]]:
    if callable(value):
        yield where, value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _functions(where, v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _functions(f"{where}.{k}", value[k])


def denoiser_patches(model) -> list[Patch]:
    """Every patch on `model` (a ModelPatcher) that can change a denoiser call, in a stable order."""
    opts = getattr(model, "model_options", {}) or {}
    found: list[tuple[str, Callable]] = []
    for key in ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function", "model_function_wrapper",
                "sampler_calc_cond_batch_function", "denoise_mask_function"):
        if opts.get(key) is not None:
            found += _functions(key, opts[key])
    to = opts.get("transformer_options", {}) or {}
    for key in ("patches", "patches_replace"):
        found += _functions(key, to.get(key, {}) or {})
    for wtype, by_key in sorted((getattr(model, "wrappers", {}) or {}).items()):
        for wkey, fns in sorted((by_key or {}).items()):
            found += _functions(f"wrappers.{wtype}.{wkey}", fns)
    out = [Patch(where, _owner(fn), _settings(fn), _plain_values(fn)) for where, fn in found]
    for key in sorted(getattr(model, "object_patches", {}) or {}):
        if key not in COVERED_OBJECT_PATCHES:
            obj = model.object_patches[key]
            out.append(Patch(f"object.{key}", f"{type(obj).__module__}.{type(obj).__qualname__}", ""))
    return out


def refused_patches(model) -> list[str]:
    """One line per patch on `model` that ReDi refuses, with the measurement behind it."""
    return [f"{p.describe().split('(')[0]}: {p.refusal}" for p in denoiser_patches(model) if p.refusal]


def guidance_signature(model) -> str:
    """The fingerprinted patches of `model`, '' when it has none (then a KB built before this
    field existed still matches)."""
    kept = sorted({f"{p.where}={p.describe()}" for p in denoiser_patches(model) if not p.served})
    return ",".join(kept)
