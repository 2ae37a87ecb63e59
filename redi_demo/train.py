"""Train the demo model on the procedural dataset, on the CPU, resumably.

    .venv/bin/python -m redi_demo.train [--work .cache/train] [--out models/redi_demo_shapes.safetensors]

Stages (each resumes from its last saved state in --work; a finished stage is skipped):
  1. ae:   ComfyUI's TAESD autoencoder, on 32x32 crops aligned to the 8-pixel latent grid.
  2. unet: UNet + CLIP text encoder jointly, epsilon prediction on the ComfyUI SD1
           noise schedule, 10% empty prompts so classifier-free guidance works.
  3. export: one fp16 safetensors checkpoint in ComfyUI's SD1 layout, plus the
           fitted latent->RGB preview factors.
Deterministic for a given --seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from redi_demo import dataset
from redi_demo.host import PACK_ROOT, load_comfy


def init_weights(module: torch.nn.Module) -> None:
    """ComfyUI's ops layers skip init; give every layer torch's default init."""
    for m in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
        if "RMSNorm" in type(m).__name__:  # DiT norms (their scale is left as torch.empty)
            for p in m.parameters(recurse=False):
                torch.nn.init.ones_(p)


def _save_state(path: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, val in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(val).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return step


def _images(samples: list[dataset.Sample], seed: int) -> torch.Tensor:
    """Rendered samples as N x 3 x H x W floats in [-1, 1]."""
    arr = dataset.render_batch(samples, jitter_seed=seed)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_ae(work: Path, steps: int, seed: int, log_every: int):
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(seed)
    ae = TAESD()
    init_weights(ae)
    opt = torch.optim.Adam(list(ae.taesd_encoder.parameters()) + list(ae.taesd_decoder.parameters()), lr=1e-3)
    path = work / "ae.safetensors"
    step = _load_state(path, ae, opt)
    t0 = time.time()
    while step < steps:
        rng = np.random.default_rng(seed * 1_000_003 + step)
        x = _images(dataset.random_samples(16, seed * 7919 + step), seed + step)
        oy, ox = (int(v) * 8 for v in rng.integers(0, 5, size=2))
        x = x[:, :, oy : oy + 32, ox : ox + 32]
        z = ae.taesd_encoder(x * 0.5 + 0.5)
        y = ae.taesd_decoder(z) * 2 - 1
        loss = torch.nn.functional.mse_loss(y, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % log_every == 0 or step == steps:
            _save_state(path, step, ae, opt)
            print(f"[ae] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    # normalise latents to zero mean, unit std through TAESD's own scale/shift parameters
    with torch.no_grad():
        x = _images(dataset.random_samples(512, seed + 99), seed + 99)
        z = torch.cat([ae.taesd_encoder(c * 0.5 + 0.5) for c in x.split(64)])
        ae.vae_scale.fill_(float(z.std()))
        ae.vae_shift.fill_(float(-z.mean() / z.std()))
    return ae


def _text_forward(text_model, token_lists: list[list[int]]) -> torch.Tensor:
    """ComfyUI's CLIP text forward (layer "last") without its in-place adds, so
    autograd can train it. Checked equal to ComfyUI's own forward at export."""
    tm = text_model
    ids = torch.tensor(token_lists)
    x = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight
    n = x.shape[1]
    causal = torch.full((n, n), -torch.finfo(x.dtype).max).triu(1)
    for layer in tm.encoder.layers:
        a = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (p(h).unflatten(-1, (a.heads, -1)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        x = x + a.out_proj(o.transpose(1, 2).flatten(2))
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


class _Tokens:
    """Prompt -> token id list, through ComfyUI's own SD1 tokenizer (cached)."""

    def __init__(self) -> None:
        import comfy.sd1_clip

        self.tok = comfy.sd1_clip.SD1Tokenizer()
        self.cache: dict[str, list[int]] = {}

    def __call__(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            pairs = self.tok.tokenize_with_weights(prompt)["l"][0]
            self.cache[prompt] = [t for t, _w in pairs]
        return self.cache[prompt]


def latent_pool(work: Path, ae, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Encode `n` dataset images once (the encoder is the costly part of a step)."""
    samples = dataset.random_samples(n, 1_000_000 + seed)
    prompts = [s.prompt() for s in samples]
    path = work / f"latents_{n}.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"], prompts
    chunks = []
    with torch.no_grad():
        for i in range(0, n, 256):
            chunks.append(ae.encode(_images(samples[i : i + 256], 2_000_000 + i)))
            if (i // 256) % 10 == 0:
                print(f"[latents] {i + 256}/{n}", flush=True)
    latents = torch.cat(chunks)
    save_file({"latents": latents.contiguous()}, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return latents, prompts


def train_unet(work: Path, ae, steps: int, seed: int, batch: int, log_every: int, pool: int):
    from redi_demo import model_config

    torch.manual_seed(seed)
    cfg = model_config.new_config()
    base = cfg.get_model({})
    clip = cfg.clip_target().clip()
    init_weights(base.diffusion_model)
    init_weights(clip)
    clip.train()
    for p in clip.parameters():
        p.requires_grad_(True)
    text_model = clip.clip_l.transformer.text_model
    net = torch.nn.ModuleDict({"unet": base.diffusion_model, "clip": clip})
    params = [p for n, p in net.named_parameters() if "logit_scale" not in n and "text_projection" not in n]
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.01)
    path = work / "unet.safetensors"
    step = _load_state(path, net, opt)
    tokens = _Tokens()
    sigmas = base.model_sampling.sigmas.float()
    ae.requires_grad_(False)
    latents, pool_prompts = latent_pool(work, ae, pool, seed)
    t0 = time.time()
    while step < steps:
        g = torch.Generator().manual_seed(seed * 31 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        t = torch.randint(0, len(sigmas), (batch,), generator=g)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        xc = (x0 + sigma * noise) / torch.sqrt(sigma**2 + 1)
        drop = torch.rand(batch, generator=g) < 0.1
        prompts = ["" if d else pool_prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        ctx = _text_forward(text_model, [tokens(p) for p in prompts])
        eps = base.diffusion_model(xc, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = 4e-4 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        opt.step()
        step += 1
        if step % log_every == 0 or step == steps:
            _save_state(path, step, net, opt)
            print(f"[unet] step {step}/{steps} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)", flush=True)
    with torch.no_grad():
        ids = [tokens(p) for p in ("a small red circle at the top left on a white background", "")]
        ours, theirs = _text_forward(text_model, ids), clip.clip_l(ids)[0]
        assert torch.allclose(ours, theirs, atol=1e-4), "training text forward differs from ComfyUI's"
    return cfg, base, clip


def export(out: Path, cfg, base, clip, ae, seed: int) -> None:
    """Write the checkpoint in ComfyUI's SD1 layout (fp16) and the preview factors."""
    clip_sd = {k: v for k, v in clip.state_dict().items()}
    vae_sd = {k: v for k, v in ae.state_dict().items()}
    sd = base.state_dict_for_saving(clip_sd, vae_sd, None)
    sd = {k: (v.half() if v.is_floating_point() and "position_ids" not in k else v).contiguous() for k, v in sd.items()}
    meta = {"modelspec.title": "ReDi demo shapes", "modelspec.architecture": "stable-diffusion-v1 (small)"}
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, out)
    # least-squares latent -> mean RGB map, for ComfyUI's Latent2RGB previews
    with torch.no_grad():
        imgs = _images(dataset.random_samples(256, seed + 5), seed + 5)
        z = ae.encode(imgs)
        rgb = torch.nn.functional.avg_pool2d(imgs, 8) * 0.5 + 0.5
        zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
        a = torch.cat([zf, torch.ones(len(zf), 1)], 1)
        sol = torch.linalg.lstsq(a, rgb.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    fit = {"latent_rgb_factors": sol[:4].tolist(), "latent_rgb_factors_bias": sol[4].tolist()}
    (Path(__file__).with_name("latent_preview.json")).write_text(json.dumps(fit, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(PACK_ROOT / ".cache" / "train"), help="resumable training state")
    ap.add_argument("--out", default=str(PACK_ROOT / "models" / "redi_demo_shapes.safetensors"))
    ap.add_argument("--ae-steps", type=int, default=1500)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=24576, help="dataset images encoded once for the UNet stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_comfy()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ae = train_ae(work, args.ae_steps, args.seed, args.log_every)
    cfg, base, clip = train_unet(work, ae, args.unet_steps, args.seed, args.batch, args.log_every, args.pool)
    export(Path(args.out), cfg, base, clip, ae, args.seed)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s this run)", flush=True)


if __name__ == "__main__":
    main()
