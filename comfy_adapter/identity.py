"""Identity of what shapes a trajectory, recorded in a KB's fingerprint and compared at query
time: the model's weights and weight patches, its sampling object, and an encoded conditioning."""

from __future__ import annotations

import hashlib


def model_hash(model) -> str:
    """Identity of the model's weights and weight patches (LoRA etc.), cheap to compute:
    every tensor's name and shape, and a strided sample of its values."""
    h = hashlib.sha256()
    sd = model.model.state_dict()
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        h.update(f"{k}:{tuple(t.shape)}".encode())
        if i % 4 == 0 and t.numel():
            flat = t.detach().flatten()
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    for k in sorted(getattr(model, "patches", {})):
        h.update(f"patch:{k}:{[p[0] for p in model.patches[k]]}".encode())
    return h.hexdigest()[:20]


def sampling_signature(model) -> str:
    """What the model's sampling object does to a trajectory: its class (prediction type), its
    sigma range and a sample of its sigma table (zsnr, shift, v-prediction patches all change it)."""
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
    return "; ".join(parts)


def conditioning_signature(cond) -> str:
    """A numeric signature of an encoded conditioning (its shape, per-channel means over the
    tokens and RMS of the first entry), compared with a tolerance by `redi_compat`; it works on
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
