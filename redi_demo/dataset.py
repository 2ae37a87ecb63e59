"""Procedural text-to-image data: coloured shapes with positions, sizes,
backgrounds and rendering styles, each image paired with a prompt.

Everything is generated in code (no downloads) and is deterministic per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
POSITIONS = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}
SIZES = {"small": 10.0, "large": 14.0}
BACKGROUNDS = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (250, 180, 200),
}
# "plain" has no style phrase; the others are written as a style in the prompt.
STYLES = ("plain", "striped", "dotted", "outlined", "pixelated")

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
    "style": STYLES,
}

CONTENT_TEMPLATES = (
    "a {size} {colour} {shape} at the {position} on a {background} background",
    "{size} {colour} {shape}, {position}, {background} background",
    "a picture of a {size} {colour} {shape} in the {position}, {background} background",
    "{background} background with a {size} {colour} {shape} at the {position}",
)
STYLE_TEMPLATES = (", in {style} style", ", {style} style", " in {style} style")


@dataclass(frozen=True)
class Sample:
    """One item: the content attributes as indices into ATTRIBUTES' tuples."""

    attrs: dict[str, int]
    template: int
    style_template: int

    def value(self, name: str) -> str:
        return ATTRIBUTES[name][self.attrs[name]]

    def content_prompt(self) -> str:
        words = {k: self.value(k) for k in ("size", "colour", "shape", "position", "background")}
        return CONTENT_TEMPLATES[self.template].format(**words)

    def prompt(self) -> str:
        style = self.value("style")
        if style == "plain":
            return self.content_prompt()
        return self.content_prompt() + STYLE_TEMPLATES[self.style_template].format(style=style)


def random_samples(n: int, seed: int, styles: tuple[str, ...] = STYLES) -> list[Sample]:
    """`n` random samples; `styles` restricts the styles drawn (e.g. ("plain",))."""
    rng = np.random.default_rng(seed)
    style_ids = [STYLES.index(s) for s in styles]
    out = []
    for _ in range(n):
        attrs = {name: int(rng.integers(len(vals))) for name, vals in ATTRIBUTES.items()}
        attrs["style"] = int(style_ids[rng.integers(len(style_ids))])
        out.append(Sample(attrs, int(rng.integers(len(CONTENT_TEMPLATES))), int(rng.integers(len(STYLE_TEMPLATES)))))
    return out


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        # apex up: inside when below the two slanted edges and above the base
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.58)
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        m[1:, :] &= mask[:-1, :] & m[1:, :]
        m[:-1, :] &= m[1:, :]
        m[:, 1:] &= m[:, :-1]
        m[:, :-1] &= m[:, 1:]
    return m


def render(sample: Sample, jitter_seed: int | None = None) -> np.ndarray:
    """Render one sample to a uint8 HxWx3 image. `jitter_seed` adds a small
    random offset to the position (training variety); None renders it exactly."""
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cx, cy = POSITIONS[sample.value("position")]
    r = SIZES[sample.value("size")]
    if jitter_seed is not None:
        rng = np.random.default_rng(jitter_seed)
        cx, cy = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
        r = r * rng.uniform(0.9, 1.1)
    shape = sample.value("shape")
    style = sample.value("style")
    fg = np.array(COLOURS[sample.value("colour")], np.float32)
    bg = np.array(BACKGROUNDS[sample.value("background")], np.float32)

    if style == "pixelated":
        # the shape sampled on a 4-pixel grid, drawn as blocks with a checker shade
        by, bx = (yy // 4) * 4 + 2, (xx // 4) * 4 + 2
        mask = _shape_mask(shape, cx, cy, r * 1.1, by, bx)
        checker = ((yy // 4 + xx // 4) % 2 == 0)[..., None]
        img = np.where(mask[..., None], np.where(checker, fg, fg * 0.6), bg)
        return img.clip(0, 255).astype(np.uint8)

    # The textures shade the object rather than cut holes in it, and repeat on the 8-pixel grid of
    # the autoencoder's latent cells, so that a cell's mean colour stays the object's colour and a
    # 4-channel latent can carry them (single-pixel patterns and holes came back flattened).
    mask = _shape_mask(shape, cx, cy, r, yy, xx)
    shade = np.zeros_like(mask)
    if style == "striped":
        shade = (yy % 8) >= 4
    elif style == "dotted":
        shade = (xx % 8 - 3.5) ** 2 + (yy % 8 - 3.5) ** 2 <= 5.0
    elif style == "outlined":
        shade = ~_erode(mask, 3)
    fill = np.where(shade[..., None], fg * 0.4, fg)
    img = np.where(mask[..., None], fill, bg)
    return img.clip(0, 255).astype(np.uint8)


def render_batch(samples: list[Sample], jitter_seed: int | None = None) -> np.ndarray:
    """Render samples to an N x H x W x 3 uint8 array."""
    seeds = [None] * len(samples) if jitter_seed is None else [jitter_seed + i for i in range(len(samples))]
    return np.stack([render(smp, sd) for smp, sd in zip(samples, seeds)])


def attribute_array(samples: list[Sample]) -> dict[str, np.ndarray]:
    """The ground truth of `samples`, one int array per attribute."""
    return {name: np.array([smp.attrs[name] for smp in samples]) for name in ATTRIBUTES}
