"""Typed, frozen configuration. Every field is checked in `validate()` before any cluster work starts, and
each error names the field and how to fix it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        super().__init__(f"config field '{field_name}': {problem}. Fix: {fix}")


@dataclass(frozen=True)
class CatalogConfig:
    """Which paintings go into a manifest and how they are split."""

    source: str = ""
    painters: tuple[str, ...] = ()
    top_k: int = 0  # 0 = no top-K filter
    min_paintings: int = 1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("catalog.source", "is empty", "pass a folder, a CSV/Parquet file or an s3:// prefix")
        if self.top_k < 0:
            raise ConfigError("catalog.top_k", f"is {self.top_k}", "use 0 (keep all painters) or a positive count")
        if self.min_paintings < 1:
            raise ConfigError("catalog.min_paintings", f"is {self.min_paintings}", "use 1 or more")
        if self.top_k and self.painters:
            raise ConfigError("catalog.top_k", "is set together with catalog.painters",
                              "choose painters either by count (--top-k) or by name (--painters), not both")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError("catalog.split", f"is {self.split}",
                              "give three non-negative fractions train,val,test that add up to 1, e.g. 0.8,0.1,0.1")
        if self.split[0] == 0:
            raise ConfigError("catalog.split", "gives the train split no images", "make the first fraction > 0")


@dataclass(frozen=True)
class AugmentConfig:
    """The study's augmentations (rotation, shifts, shear, zoom, flips, whitening) plus colour jitter.
    Angles in degrees, shifts as a fraction of the crop, zoom as a +/- fraction."""

    rotation: float = 15.0
    shift: float = 0.1
    shear: float = 8.0
    zoom: float = 0.15
    hflip: bool = True
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    standardize: bool = False

    def validate(self) -> None:
        for name in ("rotation", "shift", "shear", "zoom", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"augment.{name}", f"is {value}", "use 0 (off) or a positive amount")
        if self.zoom >= 1:
            raise ConfigError("augment.zoom", f"is {self.zoom}", "keep the zoom range below 1 (e.g. 0.15)")
        if self.shift >= 0.5:
            raise ConfigError("augment.shift", f"is {self.shift}", "keep shifts below half the crop (e.g. 0.1)")


@dataclass(frozen=True)
class PipelineConfig:
    """How images flow from storage to the training workers."""

    image_size: int = 299
    batch_size: int = 32  # per consumer
    max_pixels: int = 64_000_000  # larger images are refused as decompression bombs
    decode_batch: int = 32  # images per Ray Data map task call (fewer, larger tasks: less overhead)
    shuffle: bool = True
    seed: int | None = None  # None: fresh augmentation randomness every epoch
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.image_size < 32:
            raise ConfigError("pipeline.image_size", f"is {self.image_size}",
                              "use 32 or more (InceptionV3 needs at least 75, its default is 299)")
        if self.batch_size < 1:
            raise ConfigError("pipeline.batch_size", f"is {self.batch_size}", "use 1 or more")
        if self.decode_batch < 1:
            raise ConfigError("pipeline.decode_batch", f"is {self.decode_batch}", "use 1 or more")
        if self.max_pixels < self.image_size ** 2:
            raise ConfigError("pipeline.max_pixels", f"is {self.max_pixels}",
                              "allow at least image_size**2 pixels (default 64,000,000)")
        self.augment.validate()


def replace(cfg, **changes):
    """`dataclasses.replace` that ignores None values, so CLI options left unset keep the defaults."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
