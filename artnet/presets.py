"""Named starting points for a job, as dotted overrides on the defaults (so `--set` can refine them)."""

from __future__ import annotations

from artnet.config import ConfigError, JobConfig, override
from artnet.model.classifier import STUDY_HEAD

PRESETS: dict[str, dict[str, str]] = {
    # The production default: InceptionV3 at 299 px, a two-layer head, top two Inception blocks fine-tuned.
    "inception": {},
    # The study this project grew from: frozen InceptionV3 features, a deep halving head 512 -> 8, 50% dropout.
    "study": {**{f"model.{k}": str(getattr(STUDY_HEAD, k)) for k in ("head_depth", "head_width", "head_halving",
                                                                      "dropout")},
              "train.unfreeze_blocks": "0", "train.finetune_epochs": "0",
              "train.head_epochs": "10"},
    # MobileNetV2 with the offline ImageNet weights: real transfer learning that fits a CPU.
    "mobilenet": {"model.backbone": "mobilenet_v2", "data.image_size": "224", "model.head_depth": "1",
                  "model.head_width": "256", "model.dropout": "0.3", "train.unfreeze_blocks": "4",
                  "train.lr": "0.01", "train.label_smoothing": "0.1", "train.head_epochs": "4",
                  "train.finetune_epochs": "6"},
    # Seconds-to-minutes on a laptop CPU: the tiny backbone on small images (the synthetic demo set).
    "demo": {"model.backbone": "tiny", "model.weights": "none", "data.image_size": "64", "model.head_depth": "1",
             "model.head_width": "64", "model.dropout": "0.2", "train.head_epochs": "3",
             "train.finetune_epochs": "5", "train.unfreeze_blocks": "2", "train.batch_size": "16",
             "train.lr": "0.3", "train.warmup_epochs": "0.5", "data.batch_size": "64"},
}


def preset(name: str) -> JobConfig:
    if name not in PRESETS:
        raise ConfigError("preset", f"is {name!r}", f"use one of {', '.join(PRESETS)}")
    return override(JobConfig(), PRESETS[name])
