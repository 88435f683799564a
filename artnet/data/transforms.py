"""Pure image transforms: bytes -> RGB uint8 array of a fixed size.

Decoding (PIL) accepts any mode PIL can read (greyscale, CMYK, palette, alpha, 16-bit) and always yields RGB.
Large JPEGs are decoded with PIL's draft mode (a DCT-domain downscale, ~2x faster than a full decode). Training
augmentation is one affine resample (rotation, shift, shear, zoom, flip together) followed by colour jitter,
so each image is resampled once; both run in OpenCV (SIMD, no intermediate copies: ~4x PIL's resample).
Everything is deterministic for a given numpy Generator.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from artnet.config import AugmentConfig

# We enforce our own pixel limit (PipelineConfig.max_pixels); PIL's warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
# One thread per call: parallelism comes from Ray's decode tasks, one per CPU; OpenCV's own pool would
# oversubscribe the cores those tasks were given.
cv2.setNumThreads(1)


class BadImage(ValueError):
    """An input that is not a usable image. `reason` is a short tag used to count skips."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):  # survives Ray's pickling with its reason intact
        return BadImage, (self.reason, self.detail)


def decode(data: bytes, target: int, max_pixels: int) -> np.ndarray:
    """Decode to an RGB (height, width, 3) uint8 array whose shorter side is at least `target` where the source
    allows it."""
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
        ImageOps.exif_transpose(img, in_place=True)  # in place: the usual no-op would otherwise copy
        img = _to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # truncated data, broken chunks, codec errors: all mean "unusable"
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    factor = min(img.size) // target
    return np.asarray(img.reduce(factor) if factor >= 2 else img)


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


def affine_crop(img: np.ndarray, size: int, t: Affine = IDENTITY, out: np.ndarray | None = None) -> np.ndarray:
    """Resample once (OpenCV's SIMD bilinear warp). A transformed crop can reach past the image; the source is
    then mirrored outwards (numpy's 'reflect'): reflected paint looks like paint, while a grey border would be a
    cue unrelated to the painter. `affine_matrix` uses PIL's convention (pixel edges at integers); OpenCV puts
    pixel centres there, hence the half-pixel terms. Written into `out` when given (a slot of a batch)."""
    a, b, c, d, e, f = affine_matrix(t, (img.shape[1], img.shape[0]), size)
    inverse = np.array([[a, b, c + (a + b) / 2 - 0.5], [d, e, f + (d + e) / 2 - 0.5]])
    return cv2.warpAffine(img, inverse, (size, size), dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def colour_jitter(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness b, contrast c (about the image mean m) and saturation s, factors drawn from [1-x, 1+x].
    All three are linear in RGB, so they fold into one 3x4 colour matrix applied in a single pass, in place:
    out = c*b*S @ x + (1-c)*b*m, where S = s*I + (1-s)*1*grey_weights^T."""
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    mean = float(np.mean(cv2.mean(img)[:3]))
    sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), GREY_WEIGHTS)
    matrix = np.concatenate([c * b * sat, np.full((3, 1), (1 - c) * b * mean)], axis=1)
    return cv2.transform(img, matrix, dst=img)  # in place; rounds and saturates to uint8


def standardize(img: np.ndarray) -> np.ndarray:
    """Per-image whitening, mapped back onto the 0..255 range (mean 127.5, std 64) so that the model's own
    preprocessing, which expects raw RGB, still applies. uint8, in place (rounded, clipped)."""
    means, stds = cv2.meanStdDev(img)
    mean = float(means.mean())  # one mean and std over all pixels and channels
    std = max(float(np.sqrt((stds ** 2 + (means - mean) ** 2).mean())), 1.0)
    scale = 64.0 / std
    return cv2.addWeighted(img, scale, img, 0.0, 127.5 - mean * scale, dst=img)


def preprocess(data: bytes, size: int, max_pixels: int, augment: AugmentConfig,
               rng: np.random.Generator | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, written into `out` when given (a batch's slot: no stacking copy).
    With `rng` the training augmentations apply; without, a centre crop."""
    img = decode(data, size, max_pixels)
    out = affine_crop(img, size, sample_affine(rng, augment) if rng is not None else IDENTITY, out)
    if rng is not None:
        colour_jitter(out, rng, augment)
    return standardize(out) if augment.standardize else out
