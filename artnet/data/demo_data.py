"""A small synthetic painting set so `make demo` runs offline. Each fictional painter has a palette, a stroke
length, width and direction, and a canvas texture; every painting is drawn from those with its own randomness.
A stand-in for real data only: point `artnet catalog` at real paintings for real results."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from artnet.data import storage

ADJECTIVES = ("Bold", "Quiet", "Restless", "Patient", "Wild", "Gentle", "Stern", "Bright", "Misty", "Brisk")
NOUNS = ("Dabber", "Swirler", "Hatcher", "Stippler", "Glazer", "Scumbler", "Blender", "Etcher")


def painter_names(n: int) -> list[str]:
    return [f"{ADJECTIVES[i % len(ADJECTIVES)]}_{NOUNS[(i * 3) % len(NOUNS)]}" + (f"_{i // len(ADJECTIVES)}" if i >= len(ADJECTIVES) else "")
            for i in range(n)]


def painter_style(index: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, index])
    base_hue = index / 7.0
    palette = []
    for _ in range(4):
        hue = (base_hue + rng.normal(0, 0.04)) % 1.0
        palette.append(tuple(int(255 * c) for c in _hsv_to_rgb(hue, rng.uniform(0.4, 0.9), rng.uniform(0.35, 0.95))))
    return {
        "palette": palette,
        "stroke_length": float(rng.uniform(6, 60)),
        "stroke_width": int(rng.integers(1, 9)),
        "angle": float(rng.uniform(0, np.pi)),
        "angle_spread": float(rng.uniform(0.1, 1.5)),
        "texture": float(rng.uniform(0, 30)),
        "strokes": int(rng.integers(150, 600)),
    }


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def paint(style: dict, rng: np.random.Generator, size: int = 256) -> Image.Image:
    background = np.array(style["palette"][0], np.float32)
    canvas = np.clip(background + rng.normal(0, style["texture"] + 1, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for _ in range(style["strokes"]):
        x, y = rng.uniform(0, size, 2)
        angle = style["angle"] + rng.normal(0, style["angle_spread"])
        length = style["stroke_length"] * rng.uniform(0.5, 1.5)
        colour = style["palette"][int(rng.integers(1, len(style["palette"])))]
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
        draw.line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))], fill=colour,
                  width=style["stroke_width"])
    return img.filter(ImageFilter.SMOOTH)


def write_demo_set(out: str, painters: int = 3, per_painter: int = 60, seed: int = 0, size: int = 256) -> list[str]:
    """Write `<out>/<Painter>/<Painter>_<n>.jpg`; returns the painter names. Local path or s3:// prefix."""
    names = painter_names(painters)
    for index, name in enumerate(names):
        style = painter_style(index, seed)
        for n in range(per_painter):
            buf = io.BytesIO()
            paint(style, np.random.default_rng([seed, index, n]), size).save(buf, "JPEG", quality=90)
            storage.write_bytes(storage.join(out, name, f"{name}_{n + 1}.jpg"), buf.getvalue())
    return names


def demo_set_exists(out: str) -> bool:
    return storage.is_local(out) and os.path.isdir(out) and any(os.scandir(out))
