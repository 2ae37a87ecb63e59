"""Train the demo model on the procedural dataset, on the CPU, resumably.

    .venv/bin/python -m redi_demo.train [--work .cache/train] [--out models/redi_demo_shapes.safetensors]

Stages (each resumes from its last saved state in --work; a finished stage is skipped):
  1. ae:   ComfyUI's TAESD autoencoder on whole 64x64 images, object pixels weighted up,
           starting from a colour path through the network (see _ae_init).
  2. unet: UNet + CLIP text encoder jointly, epsilon prediction on the ComfyUI SD1
           noise schedule, 10% empty prompts so classifier-free guidance works, and an
           auxiliary attribute loss on the text features; prints prompt adherence now and then.
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

LATENT_CHANNELS = 4
UNET_LR = 5e-4
END_TOKEN = 49407  # the SD1 tokenizer's end/pad token


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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W floats in [-1, 1] -> N x H x W x 3 uint8, what the evaluator scores."""
    return ((x.clamp(-1, 1) * 0.5 + 0.5) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def _percentages(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in acc.items())


def _ae_init(ae: torch.nn.Module) -> None:
    """He init for TAESD's ReLU convs, each residual block starting as its skip path, and a
    colour path: encoder channels 0-2 carry the RGB image, average-pooled by the stride convs,
    into latent channels 0-2, and the decoder carries them back, so training starts from a
    blurred reconstruction rather than from nothing (several times faster here)."""
    from comfy.taesd.taesd import Block

    init_weights(ae)
    for m in ae.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in ae.modules():  # a second pass: modules() yields a block before its convs
        if isinstance(m, Block):
            torch.nn.init.zeros_(m.conv[-1].weight)
    enc, dec = ae.taesd_encoder, ae.taesd_decoder
    # (layer, weight, bias) per colour channel c: 3x3 average in the stride convs, centre tap elsewhere;
    # the encoder maps [0, 1] to [-1, 1] latents and the decoder maps them back
    taps = [(enc[0], 1.0, 0.0), (enc[14], 2.0, -1.0), (dec[1], 0.5, 0.5), (dec[7], 1.0, None),
            (dec[12], 1.0, None), (dec[17], 1.0, None)]
    with torch.no_grad():
        dec[19].weight.zero_()
        dec[19].bias.zero_()
        for c in range(3):
            for conv in (enc[2], enc[6], enc[10]):
                conv.weight[c] = 0
                conv.weight[c, c] = 1 / 9
            for conv, w, bias in taps:
                conv.weight[c] = 0
                conv.weight[c, c, 1, 1] = w
                if bias is not None:
                    conv.bias[c] = bias
            dec[19].weight[c, c, 1, 1] = 1.0


def _object_weights(samples: list[dataset.Sample], x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: `weight` where the image differs from its background colour,
    so that the small objects (their colour, shape and texture) are not drowned by it."""
    bg = torch.tensor([dataset.BACKGROUNDS[s.value("background")] for s in samples]).float().view(-1, 3, 1, 1)
    on_object = ((x - (bg / 127.5 - 1)).abs().amax(1, keepdim=True) > 0.05).float()
    return 1 + (weight - 1) * on_object


def _texture_energy(img: torch.Tensor) -> torch.Tensor:
    """Local high-frequency energy on a 4-pixel grid: how much stripe, dot or outline texture
    a region holds, whatever its phase."""
    detail = img - torch.nn.functional.avg_pool2d(img, 3, 1, 1, count_include_pad=False)
    return torch.nn.functional.avg_pool2d(detail.abs(), 4)


@torch.no_grad()
def reconstruction_check(ae, n: int = 200) -> dict[str, float]:
    """The evaluator's accuracy on `n` real images passed through the autoencoder: the ceiling
    that generated images can reach, printed while training."""
    from redi_demo import evaluator

    samples = dataset.random_samples(n, 123)
    x = _images(samples, 123).to(_device(ae))  # the same images as evaluator.real_images(n, 123)
    y = ae.taesd_decoder(ae.taesd_encoder(x * 0.5 + 0.5)) * 2 - 1
    return evaluator.accuracy(evaluator.load(), _to_uint8(y.cpu()), samples)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_ae(work: Path, steps: int, texture_steps: int, seed: int, batch: int, log_every: int, check_every: int,
             device: str = "cpu"):
    """`steps` of weighted MSE, then `texture_steps` more with a fresh optimiser, a lower learning
    rate and a texture-energy term: MSE alone renders striped and dotted objects as flat blobs."""
    from comfy.taesd.taesd import TAESD

    torch.manual_seed(seed)
    ae = TAESD(latent_channels=LATENT_CHANNELS)
    _ae_init(ae)
    ae.to(device)
    params = list(ae.taesd_encoder.parameters()) + list(ae.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    path = work / "ae.safetensors"
    step = _load_state(path, ae, opt)
    total = steps + texture_steps
    t0 = time.time()
    while step < total:
        if step == steps:
            opt = torch.optim.Adam(params, lr=3e-4)
        samples = dataset.random_samples(batch, seed * 1_000_003 + 7919 + step)
        x = _images(samples, seed + step)
        w = _object_weights(samples, x, 10.0).to(device)
        x = x.to(device)
        z = ae.taesd_encoder(x * 0.5 + 0.5)
        y = ae.taesd_decoder(z) * 2 - 1
        loss = (w * (y - x).pow(2)).mean() + 1e-4 * z.pow(2).mean()
        if step < steps:
            lr = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        else:
            k = step - steps
            lr = 3e-4 * min(1.0, (k + 1) / 50) * 0.5 * (1 + math.cos(math.pi * k / texture_steps))
            w4 = torch.nn.functional.avg_pool2d(w, 4)
            loss = loss + (w4 * (_texture_energy(y) - _texture_energy(x)).abs()).mean()
        for gr in opt.param_groups:
            gr["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == total:
            _save_state(path, step, ae, opt)
            print(f"[ae] step {step}/{total} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if check_every and (step % check_every == 0 or step == total):
            acc = reconstruction_check(ae)
            print(f"[ae] step {step} evaluator on 200 reconstructions: {_percentages(acc)}", flush=True)
    # normalise latents to zero mean, unit std through TAESD's own scale/shift parameters
    with torch.no_grad():
        x = _images(dataset.random_samples(512, seed + 99), seed + 99).to(device)
        z = torch.cat([ae.taesd_encoder(c * 0.5 + 0.5) for c in x.split(64)])
        ae.vae_scale.fill_(float(z.std()))
        ae.vae_shift.fill_(float(-z.mean() / z.std()))
    return ae


def _text_forward(text_model, token_lists: list[list[int]]) -> torch.Tensor:
    """ComfyUI's CLIP text forward (layer "last") without its in-place adds, so
    autograd can train it. Checked equal to ComfyUI's own forward at export."""
    tm = text_model
    ids = torch.tensor(token_lists, device=tm.embeddings.token_embedding.weight.device)
    x = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight
    n = x.shape[1]
    causal = torch.full((n, n), -torch.finfo(x.dtype).max, device=x.device).triu(1)
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


def latent_pool(work: Path, ae, n: int, seed: int) -> tuple[torch.Tensor, list[dataset.Sample]]:
    """Encode `n` dataset images once (the encoder is the costly part of a step)."""
    samples = dataset.random_samples(n, 1_000_000 + seed)
    path = work / f"latents_{n}.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"], samples
    chunks = []
    with torch.no_grad():
        for i in range(0, n, 256):
            chunks.append(ae.encode(_images(samples[i : i + 256], 2_000_000 + i).to(_device(ae))).cpu())
            if (i // 256) % 10 == 0:
                print(f"[latents] {i + 256}/{n}", flush=True)
    latents = torch.cat(chunks)
    save_file({"latents": latents.contiguous()}, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return latents, samples


def _prompt_features(hidden: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
    """The text encoder's output at each prompt's first end token (CLIP's pooled position)."""
    ends = [ids.index(END_TOKEN) for ids in token_lists]
    return hidden[torch.arange(len(ends)), torch.tensor(ends)]


@torch.no_grad()
def sample_check(base, clip, ae, n: int, seed: int, steps: int = 20, cfg: float = 6.0) -> dict[str, float]:
    """Euler + CFG in-process on `n` fresh prompts, scored by the evaluator: a progress
    readout of prompt adherence while training (the shipped figures come from the real server)."""
    import comfy.samplers

    from redi_demo import evaluator

    samples = dataset.random_samples(n, 5_000_000 + seed)
    tokens = _Tokens()
    ctx = clip.clip_l([tokens(s.prompt()) for s in samples] + [tokens("")] * n)[0]
    device = _device(base)
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "normal", steps).float().to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, LATENT_CHANNELS, 8, 8), generator=g).to(device) * sigmas[0]
    for i in range(steps):
        s = sigmas[i].expand(2 * n)
        den = base.apply_model(torch.cat([x, x]), s, c_crossattn=ctx).float()
        den = den[n:] + cfg * (den[:n] - den[n:])
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return evaluator.accuracy(evaluator.load(), _to_uint8(ae.decode(x).cpu()), samples)


def train_unet(work: Path, ae, steps: int, seed: int, batch: int, log_every: int, pool: int, check_every: int,
               device: str = "cpu"):
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
    width = model_config.TEXT_CONFIG["hidden_size"]
    # attribute heads on the prompt features: an auxiliary loss that makes the small text encoder,
    # trained from scratch, tell the attributes apart early; not part of the exported model
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in dataset.ATTRIBUTES.items()})
    net = torch.nn.ModuleDict({"unet": base.diffusion_model, "clip": clip, "heads": heads})
    base.to(device)
    net.to(device)
    params = [p for n, p in net.named_parameters() if "logit_scale" not in n and "text_projection" not in n]
    opt = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=0.01)
    path = work / "unet.safetensors"
    step = _load_state(path, net, opt)
    tokens = _Tokens()
    sigmas = base.model_sampling.sigmas.float().cpu()
    ae.requires_grad_(False)
    latents, pool_samples = latent_pool(work, ae, pool, seed)
    truth = {k: torch.from_numpy(v).to(device) for k, v in dataset.attribute_array(pool_samples).items()}
    t0 = time.time()
    while step < steps:
        g = torch.Generator().manual_seed(seed * 31 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        t = torch.randint(0, len(sigmas), (batch,), generator=g)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        xc = ((x0 + sigma * noise) / torch.sqrt(sigma**2 + 1)).to(device)
        keep = torch.rand(batch, generator=g) >= 0.1
        noise, t = noise.to(device), t.to(device)
        token_lists = [tokens(pool_samples[i].prompt() if k else "") for i, k in zip(idx.tolist(), keep.tolist())]
        ctx = _text_forward(text_model, token_lists)
        eps = base.diffusion_model(xc, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(eps, noise)
        feats = _prompt_features(ctx, token_lists)[keep]
        aux = sum(torch.nn.functional.cross_entropy(h(feats), truth[k][idx[keep].to(device)]) for k, h in heads.items())
        opt.zero_grad(set_to_none=True)
        (loss + 0.1 * aux).backward()
        lr = optimizer_step(opt, params, UNET_LR, step, steps)
        step += 1
        if step % log_every == 0 or step == steps:
            _save_state(path, step, net, opt)
            print(f"[unet] step {step}/{steps} loss {loss.item():.4f} text-aux {aux.item():.3f} lr {lr:.2e} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if check_every and (step % check_every == 0 or step == steps):
            acc = sample_check(base, clip, ae, 48, seed)
            print(f"[unet] step {step} adherence on 48 samples: {_percentages(acc)}", flush=True)
    with torch.no_grad():
        ids = [tokens(p) for p in ("a small red circle at the top left on a white background", "")]
        ours, theirs = _text_forward(text_model, ids), clip.clip_l(ids)[0]
        assert torch.allclose(ours, theirs.to(ours.device), atol=1e-4), "training text forward differs from ComfyUI's"
    base.cpu()
    clip.cpu()
    return cfg, base, clip


def saving_args(base, clip_sd: dict, vae_sd: dict) -> dict:
    """Keyword arguments of BaseModel.state_dict_for_saving on this host: ComfyUI 0.30 takes the UNet
    state dict from its caller (its first parameter), v0.3.75 reads it from the model itself."""
    import inspect

    kwargs = {"clip_state_dict": clip_sd, "vae_state_dict": vae_sd}
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        kwargs["unet_state_dict"] = base.diffusion_model.state_dict()
    return kwargs


def export(out: Path, preview: Path, cfg, base, clip, ae, seed: int) -> None:
    """Write the checkpoint in ComfyUI's SD1 layout (fp16) and the preview factors."""
    clip_sd = {k: v for k, v in clip.state_dict().items()}
    vae_sd = {k: v for k, v in ae.state_dict().items()}
    sd = base.state_dict_for_saving(**saving_args(base, clip_sd, vae_sd))
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
        zf = z.permute(0, 2, 3, 1).reshape(-1, LATENT_CHANNELS)
        a = torch.cat([zf, torch.ones(len(zf), 1)], 1)
        sol = torch.linalg.lstsq(a, rgb.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    fit = {"latent_rgb_factors": sol[:LATENT_CHANNELS].tolist(), "latent_rgb_factors_bias": sol[LATENT_CHANNELS].tolist()}
    preview.write_text(json.dumps(fit, indent=1) + "\n")


def optimizer_step(opt: torch.optim.Optimizer, params, base_lr: float, step: int, steps: int) -> float:
    """Clip the gradients, set the learning rate (200 warm-up steps, then a cosine to a tenth) and
    step; returns the rate used."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    lr = base_lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
    for gr in opt.param_groups:
        gr["lr"] = lr
    opt.step()
    return lr


def add_run_args(ap: argparse.ArgumentParser, pool_help: str, readouts: str) -> None:
    """The options both demo models' training scripts share."""
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=12288, help=pool_help)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--check-every", type=int, default=500, help=f"steps between readouts of {readouts} (0: none)")


def start(args: argparse.Namespace) -> tuple[Path, float]:
    """Threads, the host's ComfyUI and the resumable work folder: (work folder, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    load_comfy()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return work, time.time()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(PACK_ROOT / ".cache" / "train"), help="resumable training state")
    ap.add_argument("--out", default=str(PACK_ROOT / "models" / "redi_demo_shapes.safetensors"))
    ap.add_argument("--preview", default=str(Path(__file__).with_name("latent_preview.json")),
                    help="where the fitted latent->RGB preview factors go (the model config reads them from here)")
    ap.add_argument("--ae-steps", type=int, default=1200)
    ap.add_argument("--ae-texture-steps", type=int, default=300)
    ap.add_argument("--ae-batch", type=int, default=8)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda (the shipped weights were trained on the CPU)")
    add_run_args(ap, "dataset images encoded once for the UNet stage", "reconstruction / prompt accuracy")
    args = ap.parse_args(argv)
    work, t0 = start(args)
    ae = train_ae(work, args.ae_steps, args.ae_texture_steps, args.seed, args.ae_batch, args.log_every, args.check_every,
                  args.device)
    cfg, base, clip = train_unet(work, ae, args.unet_steps, args.seed, args.batch, args.log_every, args.pool, args.check_every,
                                 args.device)
    ae.cpu()
    export(Path(args.out), Path(args.preview), cfg, base, clip, ae, args.seed)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s this run)", flush=True)


if __name__ == "__main__":
    main()
