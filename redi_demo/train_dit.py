"""Train the DiT demo model (ComfyUI's Flux architecture, small) on the procedural dataset.

    .venv/bin/python -m redi_demo.train_dit [--work .cache/train_dit] [--out models/redi_demo_shapes_dit.safetensors]

On ComfyUI 0.3.75 (REDI_COMFY=0.3.75 .venv-0.3.75/bin/python ...): 0.30's Flux rotary embedding has no backward.

It reuses the SD1.x demo checkpoint's text encoder and autoencoder, frozen (`--base`), so only the
transformer trains:
  1. latents: dataset images encoded once by the demo's TAESD autoencoder; prompts encoded once by
     its CLIP (token context and pooled vector), the same as CLIP Text Encode gives at sampling;
  2. dit: rectified flow (x_t = (1 - s) x0 + s noise, the network predicts noise - x0) with s drawn
     through Flux's time shift, 10% empty prompts for classifier-free guidance, adaLN-zero init;
  3. export: one fp16 safetensors checkpoint in ComfyUI's Flux layout (`model.diffusion_model.`,
     `text_encoders.`, `vae.`), loadable by the stock Load Checkpoint node.
Resumable from --work; deterministic for a given --seed and thread count.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from redi_demo import dataset
from redi_demo.host import PACK_ROOT
from redi_demo.train import (
    LATENT_CHANNELS,
    _load_state,
    _percentages,
    _save_state,
    _to_uint8,
    _Tokens,
    add_run_args,
    init_weights,
    latent_pool,
    optimizer_step,
    start,
)

DIT_LR = 5e-4
# Flux's default time shift (ModelSamplingFlux, mu = 1.15): the schedule the model is sampled with
SHIFT_MU = 1.15


def flux_sigma(t: torch.Tensor, mu: float = SHIFT_MU) -> torch.Tensor:
    """ComfyUI's flux_time_shift(mu, 1, t): the noise level at uniform time t."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def load_base(path: Path):
    """The SD1.x demo checkpoint's CLIP and VAE (ComfyUI objects), loaded by ComfyUI itself."""
    import comfy.sd

    _model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return clip, vae


@torch.no_grad()
def encode_prompts(clip, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Token context (N x 77 x width) and pooled vector (N x width) of each prompt."""
    tokens = _Tokens()
    clip_l = clip.cond_stage_model.clip_l
    ctx, pooled = [], []
    for i in range(0, len(prompts), batch):
        z, p = clip_l([tokens(s) for s in prompts[i : i + batch]])[:2]
        ctx.append(z.float().cpu())
        pooled.append(p.float().cpu())
    return torch.cat(ctx), torch.cat(pooled)


def adaln_zero(net: torch.nn.Module) -> None:
    """Every block starts as the identity (its modulation gates at zero) and the output at zero:
    the DiT paper's adaLN-zero, which ComfyUI's inference-only classes do not set."""
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.endswith(("img_mod.lin", "txt_mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


def _forward(net, x, sigma, ctx, pooled):
    # ComfyUI's Flux blocks add their residuals in place; saving copies of what backward needs
    # lets autograd train through the host's own forward unchanged
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        return net(x, sigma, ctx, y=pooled)


@torch.no_grad()
def sample_check(base, clip, vae, n: int, seed: int, steps: int = 20, cfg: float = 5.0) -> dict[str, float]:
    """Euler + CFG in-process on `n` fresh prompts (Flux's simple schedule), scored by the
    evaluator: a progress readout while training (the shipped figures come from the real server)."""
    import comfy.samplers

    from redi_demo import evaluator

    samples = dataset.random_samples(n, 5_000_000 + seed)
    ctx, pooled = encode_prompts(clip, [s.prompt() for s in samples] + [""] * n)
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "simple", steps).float()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, LATENT_CHANNELS, 8, 8), generator=g) * sigmas[0]
    for i in range(steps):
        s = sigmas[i].expand(2 * n)
        den = base.apply_model(torch.cat([x, x]), s, c_crossattn=ctx, y=pooled).float()
        den = den[n:] + cfg * (den[:n] - den[n:])
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return evaluator.accuracy(evaluator.load(), _to_uint8(vae.first_stage_model.decode(x)), samples)


def train_dit(work: Path, clip, vae, steps: int, seed: int, batch: int, log_every: int, pool: int, check_every: int):
    from redi_demo import dit_config

    torch.manual_seed(seed)
    cfg = dit_config.new_config()
    base = cfg.get_model({})
    net = base.diffusion_model
    net.requires_grad_(True)  # ComfyUI 0.30 builds its Flux for inference, with frozen parameters
    init_weights(net)
    adaln_zero(net)
    opt = torch.optim.AdamW(net.parameters(), lr=DIT_LR, weight_decay=0.01)
    path = work / "dit.safetensors"
    step = _load_state(path, net, opt)
    latents, samples = latent_pool(work, vae.first_stage_model, pool, seed)
    cond_path = work / f"prompts_{pool}.safetensors"
    if cond_path.is_file():
        cond = load_file(str(cond_path))
    else:
        ctx, pooled = encode_prompts(clip, [s.prompt() for s in samples])
        empty_ctx, empty_pooled = encode_prompts(clip, [""])
        cond = {"ctx": ctx.half(), "pooled": pooled, "empty_ctx": empty_ctx, "empty_pooled": empty_pooled}
        save_file(cond, str(cond_path.with_suffix(".tmp")))
        os.replace(cond_path.with_suffix(".tmp"), cond_path)
    t0 = time.time()
    while step < steps:
        g = torch.Generator().manual_seed(seed * 31 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        # half uniform, half logit-normal time (SD3's emphasis on the middle), then Flux's shift
        u = torch.rand(batch, generator=g)
        ln = torch.sigmoid(torch.randn(batch, generator=g))
        t = torch.where(torch.rand(batch, generator=g) < 0.5, u, ln).clamp(1e-4, 1.0)
        sigma = flux_sigma(t)
        noise = torch.randn(x0.shape, generator=g)
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1 - s4) * x0 + s4 * noise
        keep = (torch.rand(batch, generator=g) >= 0.1).view(-1, 1)
        ctx = torch.where(keep.view(-1, 1, 1), cond["ctx"][idx].float(), cond["empty_ctx"])
        pooled = torch.where(keep, cond["pooled"][idx], cond["empty_pooled"])
        pred = _forward(net, xt, sigma, ctx, pooled)
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except RuntimeError as e:
            if "no autograd formula" not in str(e):
                raise
            raise SystemExit(f"this ComfyUI's Flux forward cannot be trained ({e}); train the DiT on ComfyUI 0.3.75: "
                             "REDI_COMFY=0.3.75 .venv-0.3.75/bin/python -m redi_demo.train_dit (the shipped weights were trained there)") from e
        lr = optimizer_step(opt, list(net.parameters()), DIT_LR, step, steps)
        step += 1
        if step % log_every == 0 or step == steps:
            _save_state(path, step, net, opt)
            print(f"[dit] step {step}/{steps} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)", flush=True)
        if check_every and (step % check_every == 0 or step == steps):
            acc = sample_check(base, clip, vae, 48, seed)
            print(f"[dit] step {step} adherence on 48 samples: {_percentages(acc)}", flush=True)
    return base


def export(out: Path, base, clip, vae) -> None:
    """One fp16 checkpoint in ComfyUI's Flux layout (its RMSNorm scales under Flux's own names)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in base.diffusion_model.state_dict().items()}
    text = clip.cond_stage_model.state_dict()
    sd.update({f"text_encoders.{k}": v for k, v in text.items() if not k.endswith(("text_projection.weight", "logit_scale"))})
    sd.update({f"vae.{k}": v for k, v in vae.first_stage_model.state_dict().items()})
    sd = {k: (v.half() if v.is_floating_point() and "position_ids" not in k else v).contiguous() for k, v in sd.items()}
    meta = {"modelspec.title": "ReDi demo DiT", "modelspec.architecture": "flux (small)"}
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(PACK_ROOT / ".cache" / "train_dit"), help="resumable training state")
    ap.add_argument("--base", default=str(PACK_ROOT / "models" / "redi_demo_shapes.safetensors"),
                    help="the SD1.x demo checkpoint whose text encoder and autoencoder the DiT uses")
    ap.add_argument("--out", default=str(PACK_ROOT / "models" / "redi_demo_shapes_dit.safetensors"))
    ap.add_argument("--steps", type=int, default=4000)
    add_run_args(ap, "dataset images encoded once", "prompt accuracy")
    args = ap.parse_args(argv)
    work, t0 = start(args)
    clip, vae = load_base(Path(args.base))
    base = train_dit(work, clip, vae, args.steps, args.seed, args.batch, args.log_every, args.pool, args.check_every)
    export(Path(args.out), base, clip, vae)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s this run)", flush=True)


if __name__ == "__main__":
    main()
