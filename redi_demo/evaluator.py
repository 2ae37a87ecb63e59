"""Scores generated images of the procedural dataset against their prompts.

    .venv/bin/python -m redi_demo.evaluator train     # writes redi_demo/weights/redi_demo_evaluator.safetensors
    .venv/bin/python -m redi_demo.evaluator selftest  # its own accuracy on real dataset images

(a) prompt adherence: per-attribute accuracy of a CNN trained on the dataset;
(b) a Frechet distance in that CNN's feature space (an FID analogue);
(c) fidelity to a reference image: PSNR and SSIM.
Pure torch/numpy: no ComfyUI import.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import dataset

# kept outside models/ (a checkpoint folder of ComfyUI): it is not a diffusion model
WEIGHTS = Path(__file__).resolve().parent / "weights" / "redi_demo_evaluator.safetensors"
FEATURES = 128


class EvalNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 64, 128, FEATURES]
        layers: list[torch.nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU(),
                       torch.nn.Conv2d(b, b, 3, padding=1), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(FEATURES, len(v)) for k, v in dataset.ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def _check_images(images: np.ndarray, what: str = "images") -> None:
    s = dataset.IMAGE_SIZE
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (s, s, 3):
        shape = getattr(images, "shape", None)
        raise ValueError(f"{what} must be an N x {s} x {s} x 3 uint8 array (the demo model's size), got shape {shape}")
    if len(images) == 0:
        raise ValueError(f"no {what} given")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load(path: Path = WEIGHTS) -> EvalNet:
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluator weights not found at {path}: run `python -m redi_demo.evaluator train`")
    net = EvalNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def predict(net: EvalNet, images: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predicted attribute indices and features for N x 64 x 64 x 3 uint8 images."""
    _check_images(images)
    preds: dict[str, list] = {k: [] for k in dataset.ATTRIBUTES}
    feats = []
    for chunk in np.array_split(images, max(1, len(images) // 256)):
        x = _to_tensor(chunk)
        f = net.features(x)
        feats.append(f.numpy())
        for k, h in net.heads.items():
            preds[k].append(h(f).argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats).astype(np.float64)


def accuracy(net: EvalNet, images: np.ndarray, samples: list[dataset.Sample]) -> dict[str, float]:
    """Per-attribute accuracy (0..1) of `images` against the prompts of `samples`."""
    ok = correct(net, images, samples)
    return {k: float(ok[:, i].mean()) for i, k in enumerate(dataset.ATTRIBUTES)}


def correct(net: EvalNet, images: np.ndarray, samples: list[dataset.Sample]) -> np.ndarray:
    """Per image and attribute (in dataset.ATTRIBUTES order): whether the evaluator reads the prompt's value."""
    if len(images) != len(samples):
        raise ValueError(f"got {len(images)} images for {len(samples)} prompts; give one image per prompt")
    preds, _ = predict(net, images)
    truth = dataset.attribute_array(samples)
    return np.stack([preds[k] == truth[k] for k in dataset.ATTRIBUTES], axis=1)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    ca, cb = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    covmean, _ = linalg.sqrtm(ca @ cb, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 image sets of equal shape."""
    _check_images(a, "images")
    _check_images(b, "reference images")
    if a.shape != b.shape:
        raise ValueError(f"images {a.shape} and references {b.shape} differ in shape")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, averaged over channels)."""
    _check_images(a, "images")
    _check_images(b, "reference images")
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    w = g.expand(3, 1, 11, 11).contiguous()

    def filt(t):
        return torch.nn.functional.conv2d(t, w, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return m.mean(dim=(1, 2, 3)).numpy()


def real_images(n: int, seed: int) -> tuple[np.ndarray, list[dataset.Sample]]:
    samples = dataset.random_samples(n, seed)
    return dataset.render_batch(samples, jitter_seed=seed), samples


def train(steps: int = 2500, seed: int = 0, out: Path = WEIGHTS) -> EvalNet:
    torch.manual_seed(seed)
    net = EvalNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    for step in range(steps):
        imgs, samples = real_images(64, 10_000 + seed * 100_003 + step)
        x = _to_tensor(imgs)
        g = torch.Generator().manual_seed(step)
        # mild degradations so that decoded (slightly soft, noisy) samples are judged fairly
        if step % 2:
            x = torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 0.5 + x * 0.5
        x = x + 0.04 * torch.randn(x.shape, generator=g)
        truth = dataset.attribute_array(samples)
        logits = net(x)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], torch.from_numpy(truth[k])) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for gr in opt.param_groups:
            gr["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        if (step + 1) % 100 == 0:
            print(f"[evaluator] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    net.eval()
    tmp = Path(out).with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return net


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "selftest"])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = train(args.steps) if args.command == "train" else load()
    imgs, samples = real_images(2000, 424242)
    acc = accuracy(net, imgs, samples)
    print("evaluator accuracy on 2000 real dataset images: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
