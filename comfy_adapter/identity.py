"""Identity of what shapes a trajectory, recorded in a KB's fingerprint and compared at query
time: the model's weights and weight patches, its sampling object, and an encoded conditioning."""

from __future__ import annotations

import hashlib
import weakref

import torch

from .patches import guidance_signature


def _pristine_weights(model) -> dict:
    """The model's weights as loaded, whatever a clone has patched in place at this moment:
    ComfyUI patches the shared weights of a loaded clone in place and keeps the originals in the
    backup dict that every clone of the model shares."""
    sd = dict(model.model.state_dict())
    for k, bk in list((getattr(model, "backup", None) or {}).items()):
        if k in sd and getattr(bk, "weight", None) is not None:
            sd[k] = bk.weight
    for k, hbk in list((getattr(model, "hook_backup", None) or {}).items()):
        if k in sd and hbk:
            sd[k] = hbk[0]
    return sd


def _hash_base_weights(h, model) -> None:
    """Identity of the base weights: every tensor's name and shape and a strided sample of its values
    (the same bytes as before weight patches were hashed by content, so KBs built on a plain model
    keep matching)."""
    sd = _pristine_weights(model)
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        h.update(f"{k}:{tuple(t.shape)}".encode())
        if i % 4 == 0 and t.numel():
            flat = t.detach().flatten()
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())


_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's whole contents, cached while the tensor lives unchanged (a LoRA or
    merge keeps its patch tensors between runs)."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter: one made under inference mode, never changed after
        version = -1
    hit = _TENSOR_DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    raw = t.detach().cpu().contiguous().flatten()
    h = hashlib.blake2b(f"{tuple(t.shape)}{t.dtype}".encode(), digest_size=16)
    if raw.numel():
        h.update(raw.view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    try:
        ref = weakref.ref(t, lambda _r, key=id(t): _TENSOR_DIGESTS.pop(key, None))
    except TypeError:
        return digest
    _TENSOR_DIGESTS[id(t)] = (ref, version, digest)
    return digest


def _patch_value_digest(v, h, depth: int = 0) -> None:
    """Walk a weight patch's value (a tensor, a LoRA adapter, ("diff", (tensor,)), a merge's
    [(weight, convert), *patches] list, ...) and hash every tensor's contents."""
    if depth > 8:
        return
    if torch.is_tensor(v):
        h.update(b"T" + tensor_digest(v).encode())
    elif isinstance(v, bool | int | float | str) or v is None:
        h.update(repr(v).encode())
    elif isinstance(v, list | tuple):
        h.update(b"(")
        for x in v:
            _patch_value_digest(x, h, depth + 1)
        h.update(b")")
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _patch_value_digest(v[k], h, depth + 1)
    elif callable(v) and not hasattr(v, "__dict__"):
        h.update(getattr(v, "__qualname__", type(v).__qualname__).encode())
    else:  # an adapter object (LoRAAdapter, LoHaAdapter, ...): its class and its weights / fields
        h.update(type(v).__qualname__.encode())
        fields = getattr(v, "weights", None)
        _patch_value_digest(fields if fields is not None else
                            {k: x for k, x in vars(v).items() if not k.startswith("_")} if hasattr(v, "__dict__") else repr(v),
                            h, depth + 1)


def weight_patches_digest(model) -> str:
    """Identity of every weight patch (LoRA, merge, ...): its key, strengths, offset, function and
    the contents of its tensors; '' when the model has none. Independent of the order in which
    keys were added, and of the order of patches on one key when they only add to the weight
    (strength_model 1: LoRAs), where the order does not change the result."""
    patches = getattr(model, "patches", None) or {}
    if not patches:
        return ""
    h = hashlib.sha256()
    for key in sorted(patches, key=str):
        items = []
        for p in patches[key]:
            strength_patch, value, strength_model, offset, function = (tuple(p) + (None,) * 5)[:5]
            ph = hashlib.sha256(f"{strength_patch!r}|{strength_model!r}|{offset!r}|{getattr(function, '__qualname__', function)!r}".encode())
            _patch_value_digest(value, ph)
            items.append((strength_model, ph.hexdigest()))
        if all(sm == 1.0 for sm, _ in items):
            items.sort()
        h.update(f"{key}:{','.join(d for _, d in items)};".encode())
    return h.hexdigest()


def model_hash(model) -> str:
    """Identity of the model's weights and weight patches: the base weights as loaded plus every
    weight patch's key, strength and contents. Two different LoRAs or merges never share it, and
    one model gets the same one whatever ran before it."""
    h = hashlib.sha256()
    _hash_base_weights(h, model)
    patches = weight_patches_digest(model)
    if patches:
        h.update(b"patches:" + patches.encode())
    return h.hexdigest()[:20]


def sampling_signature(model) -> str:
    """What the model's sampling object does to a trajectory: its class (prediction type), its
    sigma range and a sample of its sigma table (zsnr, shift, v-prediction patches all change it),
    and the guidance and denoiser patches that ReDi fingerprints (patches.py; none: no part)."""
    ms = model.get_model_object("model_sampling")
    # the classes of comfy.model_sampling it mixes (e.g. ModelSamplingDiscrete + EPS), not the dynamic class name
    parts = [c.__name__ for c in type(ms).__mro__ if c.__module__ == "comfy.model_sampling"]
    parts.append(f"min={float(ms.sigma_min):.5g} max={float(ms.sigma_max):.5g}")
    sig = getattr(ms, "sigmas", None)
    if sig is not None and sig.numel():
        pick = sig.flatten()[:: max(1, sig.numel() // 16)].float().cpu().tolist()
        parts.append("sigmas=" + ",".join(f"{v:.5g}" for v in pick))
    for name in ("shift", "multiplier", "sigma_data"):
        if hasattr(ms, name):
            parts.append(f"{name}={float(getattr(ms, name)):.5g}")
    guidance = guidance_signature(model)
    if guidance:
        parts.append(f"patches={guidance}")
    return "; ".join(parts)


def conditioning_signature(cond) -> str:
    """A numeric signature of an encoded conditioning (its shape, per-channel means over the
    tokens and RMS of the first entry), compared with a tolerance by `kb_match`; it works on
    both the node form [[tensor, {...}]] and the sampler's converted form [{"cross_attn": tensor}]."""
    if not cond:
        return "none"
    c = cond[0]
    t = c.get("cross_attn") if isinstance(c, dict) else c[0]
    if t is None:
        return "none"
    t = t.detach().float().cpu()
    mean = t.reshape(t.shape[0], -1, t.shape[-1]).mean(dim=1)[0]
    picks = mean[:: max(1, mean.numel() // 16)][:16].tolist()
    rms = float(t.pow(2).mean().sqrt())
    return "x".join(str(v) for v in t.shape[1:]) + ":" + ",".join(f"{v:.4f}" for v in picks) + f";{rms:.4f}"
