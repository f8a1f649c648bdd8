"""Drawing primitives for the synthetic CoIN-mini images: coloured shapes, signs with words, book covers, digits.

Everything is drawn with PIL from a ``random.Random`` so an image is a pure function of the generator's seed.
Fonts: PIL's built-in scalable default font (``ImageFont.load_default(size)``); nothing is downloaded.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
POSITIONS_3x3 = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled default font at ``size`` px (a bitmap fallback when PIL has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font exists
        return ImageFont.load_default()


def background(rng: random.Random, size: int) -> Image.Image:
    """A light, slightly noisy background so that images are not trivially flat."""
    base = np.array([rng.randint(200, 250) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@dataclass
class Obj:
    """One drawn shape: its kind, colour name and pixel box (x1, y1, x2, y2), x2/y2 exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def draw_shape(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x1, y1, x2, y2 = obj.box
    fill = COLOURS[obj.colour]
    x2, y2 = x2 - 1, y2 - 1
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    elif obj.shape == "diamond":
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def place_objects(rng: random.Random, size: int, specs: Sequence[tuple[str, str]], *,
                  sizes: Sequence[int] = (14, 18, 22), distinct_sizes: bool = False,
                  tries: int = 200) -> list[Obj]:
    """Place shapes (shape, colour) without overlap (1 px margin). Sizes are fractions of a 64 px canvas."""
    scale = size / 64
    chosen = list(rng.sample(list(sizes), len(specs))) if distinct_sizes else [rng.choice(sizes) for _ in specs]
    objs: list[Obj] = []
    for (shape, colour), s in zip(specs, chosen):
        s = max(4, int(round(s * scale)))
        for _ in range(tries):
            x, y = rng.randint(1, size - s - 1), rng.randint(1, size - s - 1)
            box = (x, y, x + s, y + s)
            if all(box[2] + 1 < o.box[0] or o.box[2] + 1 < box[0] or box[3] + 1 < o.box[1] or o.box[3] + 1 < box[1]
                   for o in objs):
                objs.append(Obj(shape, colour, box))
                break
        else:  # crowded canvas: shrink and retry rather than fail, so generation never loops forever
            return place_objects(rng, size, specs, sizes=[max(6, int(z * 0.8)) for z in sizes],
                                 distinct_sizes=distinct_sizes, tries=tries)
    return objs


def scene(rng: random.Random, size: int, objs: Sequence[Obj]) -> Image.Image:
    img = background(rng, size)
    d = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(d, o)
    return img


def text_image(rng: random.Random, size: int, text: str, *, fg: Optional[tuple[int, int, int]] = None,
               bg: Optional[tuple[int, int, int]] = None, font_px: Optional[int] = None,
               plate: bool = True) -> Image.Image:
    """``text`` rendered large on a sign plate (random plate colour, dark or light ink, small jitter)."""
    img = background(rng, size)
    d = ImageDraw.Draw(img)
    lines = text.split("\n")
    fpx = font_px or max(8, int(size * (0.27 if max(map(len, lines)) <= 5 else 0.2)))
    f = font(fpx)
    widths = [d.textbbox((0, 0), ln, font=f)[2] for ln in lines]
    while max(widths) > size - 6 and fpx > 8:  # shrink long words until they fit
        fpx -= 1
        f = font(fpx)
        widths = [d.textbbox((0, 0), ln, font=f)[2] for ln in lines]
    h = fpx * len(lines) + 2 * (len(lines) - 1)
    x0 = rng.randint(2, max(2, size - max(widths) - 3))
    y0 = rng.randint(2, max(2, size - h - 4))
    if plate:
        pc = bg or rng.choice([(30, 30, 30), (250, 250, 250), (30, 90, 40), (40, 50, 140), (170, 30, 30)])
        d.rectangle((x0 - 2, y0 - 2, x0 + max(widths) + 2, y0 + h + 4), fill=pc)
        ink = fg or ((20, 20, 20) if sum(pc) > 400 else (250, 250, 250))
    else:
        ink = fg or (20, 20, 20)
    for i, ln in enumerate(lines):
        d.text((x0, y0 + i * (fpx + 2)), ln, font=f, fill=ink)
    return img


def book_cover(rng: random.Random, size: int, title: str, cover: tuple[int, int, int]) -> Image.Image:
    """A book cover: a coloured board with the title on a white band and a decorative stripe."""
    img = Image.new("RGB", (size, size), cover)
    d = ImageDraw.Draw(img)
    band_y = rng.randint(int(size * 0.15), int(size * 0.45))
    fpx = max(8, int(size * 0.2))
    f = font(fpx)
    lines = title.split(" ")
    while max(d.textbbox((0, 0), ln, font=f)[2] for ln in lines) > size - 6 and fpx > 8:
        fpx -= 1
        f = font(fpx)
    band_h = len(lines) * (fpx + 2) + 4
    d.rectangle((0, band_y, size, band_y + band_h), fill=(245, 245, 240))
    for i, ln in enumerate(lines):
        w = d.textbbox((0, 0), ln, font=f)[2]
        d.text(((size - w) // 2, band_y + 2 + i * (fpx + 2)), ln, font=f, fill=(20, 20, 20))
    stripe_y = min(size - 6, band_y + band_h + rng.randint(4, 10))
    d.rectangle((0, stripe_y, size, stripe_y + 3), fill=tuple(max(0, c - 60) for c in cover))
    return img


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 handwritten digits (1797 images, values 0..16) and their labels; no download."""
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def digit_image(rng: random.Random, size: int, pixels: np.ndarray) -> Image.Image:
    """An 8x8 digit scaled up (ink colour and a little jitter vary), on the light background."""
    img = background(rng, size)
    inner = int(size * rng.uniform(0.6, 0.85))
    g = Image.fromarray((pixels / 16.0 * 255).astype(np.uint8), "L").resize((inner, inner), Image.BILINEAR)
    ink = Image.new("RGB", (inner, inner), rng.choice([(20, 20, 20), (30, 30, 120), (120, 20, 20)]))
    x, y = rng.randint(0, size - inner), rng.randint(0, size - inner)
    img.paste(ink, (x, y), g)
    return img


def obscure(rng: random.Random, img: Image.Image) -> Image.Image:
    """Make a photo useless for the question: very dark, or blurred into a smear (VizWiz-style failures)."""
    if rng.random() < 0.5:
        arr = np.asarray(img).astype(np.float32) * rng.uniform(0.05, 0.15)
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    return img.filter(ImageFilter.GaussianBlur(radius=img.size[0] / 5))
