"""Pure image transforms: bytes -> RGB uint8 array of a fixed size.

Decoding accepts any mode PIL can read (greyscale, CMYK, palette, alpha, 16-bit) and always yields RGB. Large
JPEGs are decoded with PIL's draft mode (a DCT-domain downscale, ~2x faster than a full decode). Training
augmentation is one affine resample (rotation, shift, shear, zoom, flip together) followed by colour jitter,
so each image is resampled once. Everything is deterministic for a given numpy Generator.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from artnet.config import AugmentConfig

# We enforce our own pixel limit (PipelineConfig.max_pixels); PIL's warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

FILL = (128, 128, 128)  # mid-grey for pixels an affine transform pulls from outside the image


class BadImage(ValueError):
    """An input that is not a usable image. `reason` is a short tag used to count skips."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):  # survives Ray's pickling with its reason intact
        return BadImage, (self.reason, self.detail)


def decode(data: bytes, target: int, max_pixels: int) -> Image.Image:
    """Decode to an RGB image whose shorter side is at least `target` where the source allows it."""
    if not data:
        raise BadImage("empty", "zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage("not_an_image", str(e)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} is over the {max_pixels:,}-pixel limit")
    if img.format == "JPEG":
        img.draft("RGB" if img.mode == "RGB" else None, (target, target))
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # truncated data, broken chunks, codec errors: all mean "unusable"
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    factor = min(img.size) // target
    return img.reduce(factor) if factor >= 2 else img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) > 255:  # 16-bit data: map 0..65535 onto 0..255
            arr = arr / 257.0
        grey = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # paintings are shown on white
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise BadImage("unsupported_mode", f"cannot convert mode {mode} to RGB: {e}") from None


@dataclass(frozen=True)
class Affine:
    """One geometric augmentation. rotation/shear in degrees, shifts as a fraction of the crop, zoom > 1 zooms in."""

    rotation: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    shear: float = 0.0
    zoom: float = 1.0
    flip: bool = False


IDENTITY = Affine()


def sample_affine(rng: np.random.Generator, cfg: AugmentConfig) -> Affine:
    return Affine(
        rotation=float(rng.uniform(-cfg.rotation, cfg.rotation)),
        shift_x=float(rng.uniform(-cfg.shift, cfg.shift)),
        shift_y=float(rng.uniform(-cfg.shift, cfg.shift)),
        shear=float(rng.uniform(-cfg.shear, cfg.shear)),
        zoom=float(rng.uniform(1 - cfg.zoom, 1 + cfg.zoom)),
        flip=bool(cfg.hflip and rng.random() < 0.5),
    )


def affine_matrix(t: Affine, src_size: tuple[int, int], size: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients mapping output pixels to source pixels: the centred square crop of the source,
    transformed by `t`. IDENTITY gives the plain centre crop resized to `size`."""
    width, height = src_size
    side = min(width, height)
    theta, shear = math.radians(t.rotation), math.radians(t.shear)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shr = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    flip = np.diag([-1.0 if t.flip else 1.0, 1.0])
    a = (side / size / t.zoom) * rot @ shr @ flip
    centre_src = np.array([width / 2 + t.shift_x * side, height / 2 + t.shift_y * side])
    offset = centre_src - a @ np.array([size / 2, size / 2])
    return (a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1])


def mirror_pad(img: Image.Image, margin: int) -> Image.Image:
    """Reflect-pad by `margin` pixels on every side (numpy's 'reflect'), built from PIL crops and flips: about
    10x faster than np.pad on the images we see here."""
    width, height = img.size
    if margin >= min(width, height) - 1:  # beyond one reflection: rare tiny images, let numpy do it
        return Image.fromarray(np.pad(np.asarray(img), ((margin, margin), (margin, margin), (0, 0)), mode="reflect"))
    flip_lr, flip_tb = Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM
    out = Image.new(img.mode, (width + 2 * margin, height + 2 * margin))
    out.paste(img, (margin, margin))
    out.paste(img.crop((1, 0, margin + 1, height)).transpose(flip_lr), (0, margin))
    out.paste(img.crop((width - margin - 1, 0, width - 1, height)).transpose(flip_lr), (width + margin, margin))
    full = width + 2 * margin
    out.paste(out.crop((0, margin + 1, full, 2 * margin + 1)).transpose(flip_tb), (0, 0))
    out.paste(out.crop((0, height - 1, full, height + margin - 1)).transpose(flip_tb), (0, height + margin))
    return out


def affine_crop(img: Image.Image, size: int, t: Affine = IDENTITY) -> Image.Image:
    """Resample once. A transformed crop can reach past the image; the source is then mirrored outwards just
    far enough: reflected paint looks like paint, while a grey border would be a cue unrelated to the painter."""
    a, b, c, d, e, f = affine_matrix(t, img.size, size)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    xs, ys = corners @ np.array([a, b]) + c, corners @ np.array([d, e]) + f
    width, height = img.size
    margin = math.ceil(max(0.0, -xs.min(), xs.max() - width, -ys.min(), ys.max() - height))
    if margin:
        margin += 1
        img, c, f = mirror_pad(img, margin), c + margin, f + margin
    return img.transform((size, size), Image.Transform.AFFINE, (a, b, c, d, e, f),
                         resample=Image.Resampling.BILINEAR, fillcolor=FILL)


GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def colour_jitter(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """Brightness b, contrast c (about the image mean m) and saturation s, factors drawn from [1-x, 1+x].
    All three are linear in RGB, so they fold into one 3x4 colour matrix that PIL applies in a single pass:
    out = c*b*S @ x + (1-c)*b*m, where S = s*I + (1-s)*1*grey_weights^T."""
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    mean = float(np.asarray(img).mean())
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), GREY_WEIGHTS)
    matrix = np.concatenate([c * b * sat, np.full((3, 1), (1 - c) * b * mean)], axis=1)
    return img.convert("RGB", tuple(float(v) for v in matrix.ravel()))


def standardize(arr: np.ndarray) -> np.ndarray:
    """Per-image whitening, mapped back onto the 0..255 range (mean 127.5, std 64) so that the model's own
    preprocessing, which expects raw RGB, still applies."""
    std = max(float(arr.std()), 1.0)
    return (arr - arr.mean()) / std * 64.0 + 127.5


def preprocess(data: bytes, size: int, max_pixels: int, augment: AugmentConfig,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8. With `rng` the training augmentations apply; without, a centre crop."""
    img = decode(data, size, max_pixels)
    if rng is None:
        out = affine_crop(img, size)
    else:
        out = colour_jitter(affine_crop(img, size, sample_affine(rng, augment)), rng, augment)
    if not augment.standardize:
        return np.asarray(out, dtype=np.uint8)
    return np.clip(np.rint(standardize(np.asarray(out, np.float32))), 0, 255).astype(np.uint8)
