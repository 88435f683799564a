"""Typed, frozen configuration. Every field is checked in `validate()` before any cluster work starts, and
each error names the field and how to fix it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from artnet.errors import ConfigError


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
                raise ConfigError(f"data.augment.{name}", f"is {value}", "use 0 (off) or a positive amount")
        if self.zoom >= 1:
            raise ConfigError("data.augment.zoom", f"is {self.zoom}", "keep the zoom range below 1 (e.g. 0.15)")
        if self.shift >= 0.5:
            raise ConfigError("data.augment.shift", f"is {self.shift}", "keep shifts below half the crop (e.g. 0.1)")


@dataclass(frozen=True)
class PipelineConfig:
    """How images flow from storage to the training workers."""

    image_size: int = 0  # 0: the backbone's default input size (299 for InceptionV3)
    batch_size: int = 32  # per consumer
    max_pixels: int = 64_000_000  # larger images are refused as decompression bombs
    decode_batch: int = 128  # images per decode task: Ray's per-task overhead a small share (32 ran 0.74x as fast)
    eval_cache_mb: int = 2048  # decoded validation kept in each worker's memory between epochs, up to this size
    shuffle: bool = True
    seed: int | None = None  # None: fresh augmentation randomness every epoch
    # Bad-data budget: the share of a run's images that may be unusable (unreadable or undecodable) before it
    # stops, and how many failed reads with no success at all stop it at once (wrong credentials, endpoint...).
    max_bad_share: float = 0.05
    fail_fast_reads: int = 32
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.image_size and self.image_size < 32:
            raise ConfigError("data.image_size", f"is {self.image_size}",
                              "use 0 (the backbone's default) or 32 or more (InceptionV3 needs at least 75)")
        if self.batch_size < 1:
            raise ConfigError("data.batch_size", f"is {self.batch_size}", "use 1 or more")
        if self.decode_batch < 1:
            raise ConfigError("data.decode_batch", f"is {self.decode_batch}", "use 1 or more")
        if self.eval_cache_mb < 0:
            raise ConfigError("data.eval_cache_mb", f"is {self.eval_cache_mb}",
                              "use 0 (decode validation every epoch) or a size in MB, e.g. 2048")
        if not 0 <= self.max_bad_share < 1:
            raise ConfigError("data.max_bad_share", f"is {self.max_bad_share}",
                              "use a share in [0, 1), e.g. 0.05 (0: any unusable image stops the run)")
        if self.fail_fast_reads < 1:
            raise ConfigError("data.fail_fast_reads", f"is {self.fail_fast_reads}", "use 1 or more")
        if self.max_pixels < max(self.image_size, 299) ** 2:
            raise ConfigError("data.max_pixels", f"is {self.max_pixels}",
                              "allow at least image_size**2 pixels (default 64,000,000)")
        self.augment.validate()


def replace(cfg, **changes):
    """`dataclasses.replace` that ignores None values, so CLI options left unset keep the defaults."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


BACKBONES = ("inception_v3", "mobilenet_v2", "mobilenet", "tiny")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
CLASS_BALANCES = ("none", "weights", "logit_adjust")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone + dense head. `weights`: "imagenet" (Keras download/cache), a local file, an s3:// URI, or
    "none". `head_halving` makes the study's chain: width, width/2, ... for `head_depth` layers."""

    backbone: str = "inception_v3"
    weights: str = "imagenet"
    weights_sha256: str = ""
    alpha: float = 1.0  # MobileNet width multiplier
    head_depth: int = 2
    head_width: int = 512
    head_halving: bool = True
    dropout: float = 0.5
    head_weights: str = ""  # start from a head trained on cached features (a file or s3:// URI from `artnet tune`)

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError("model.backbone", f"is {self.backbone!r}", f"use one of {', '.join(BACKBONES)}")
        if self.alpha != 1.0 and not self.backbone.startswith("mobilenet"):
            raise ConfigError("model.alpha", f"is {self.alpha}, but only MobileNet backbones have a width multiplier",
                              "leave model.alpha at 1.0, or use a mobilenet backbone")
        if self.head_depth < 0:
            raise ConfigError("model.head_depth", f"is {self.head_depth}", "use 0 (linear head) or more layers")
        if self.head_width < 1:
            raise ConfigError("model.head_width", f"is {self.head_width}", "use a positive number of units")
        if self.head_halving and self.head_depth and self.head_width >> (self.head_depth - 1) < 1:
            raise ConfigError("model.head_depth", f"{self.head_depth} halvings of {self.head_width} units reach 0",
                              "use fewer layers or a wider first layer")
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout", f"is {self.dropout}", "use a rate in [0, 1), e.g. 0.5")
        if self.weights_sha256 and len(self.weights_sha256) != 64:
            raise ConfigError("model.weights_sha256", "is not a 64-hex-digit sha256", "paste `sha256sum FILE` output")


@dataclass(frozen=True)
class TrainConfig:
    """Two phases: the head on a frozen backbone, then the top `unfreeze_blocks` blocks at a lower rate.
    `lr` is the rate for a global batch of 256 and scales linearly with the real global batch."""

    head_epochs: int = 5
    finetune_epochs: int = 5
    unfreeze_blocks: int = 2
    batch_size: int = 32  # per replica
    lr: float = 1e-3
    finetune_lr_factor: float = 0.1
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    patience: int = 3  # epochs without val-loss improvement before a phase stops early; 0 = never
    precision: str = "auto"  # auto: mixed_bfloat16 on GPUs >= compute 8.0, mixed_float16 below, float32 on CPUs
    seed: int = 0
    # Unbalanced painters: "weights" weighs each painting by 1/(its painter's share), "logit_adjust" trains
    # with log-prior offsets on the logits (Menon et al. 2021) so small painters are not argued away.
    class_balance: str = "none"
    # "Unknown painter": the share of known painters' validation paintings whose calibrated confidence is
    # allowed to fall below the threshold stored with the model (0 = never answer "unknown").
    false_flag_rate: float = 0.1
    # XLA-compile each step's forward and backward pass (the first step of a phase compiles): usually faster on
    # GPUs, rarely on CPUs.
    jit_compile: bool = False

    def validate(self) -> None:
        if self.head_epochs < 0 or self.finetune_epochs < 0 or self.head_epochs + self.finetune_epochs == 0:
            raise ConfigError("train.head_epochs", f"head {self.head_epochs} + finetune {self.finetune_epochs} epochs",
                              "train at least one epoch in total, neither negative")
        if self.unfreeze_blocks < 0:
            raise ConfigError("train.unfreeze_blocks", f"is {self.unfreeze_blocks}", "use 0 or more blocks")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size", f"is {self.batch_size}", "use a per-replica batch of 1 or more")
        if not 0 < self.lr < 1:
            raise ConfigError("train.lr", f"is {self.lr}", "use a learning rate in (0, 1), e.g. 1e-3")
        if not 0 < self.finetune_lr_factor <= 1:
            raise ConfigError("train.finetune_lr_factor", f"is {self.finetune_lr_factor}", "use a factor in (0, 1]")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"is {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.label_smoothing", f"is {self.label_smoothing}", "use a value in [0, 1)")
        if self.class_balance not in CLASS_BALANCES:
            raise ConfigError("train.class_balance", f"is {self.class_balance!r}",
                              f"use one of {', '.join(CLASS_BALANCES)}")
        if not 0 <= self.false_flag_rate < 0.5:
            raise ConfigError("train.false_flag_rate", f"is {self.false_flag_rate}",
                              "use a share in [0, 0.5), e.g. 0.1 (0 turns the unknown-painter flag off)")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers: one per node (or GPU group); each runs MirroredStrategy over its GPUs."""

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: int = 1
    cpus_per_worker: int = 1
    # A custom Ray resource each training worker takes one unit of (e.g. "trainer": start the nodes meant for
    # training with `ray start --resources='{"trainer": 2}'`): workers land only there. Empty: any node.
    worker_resource: str = ""
    # How long a job waits for the nodes it asked the autoscaler for (cloud GPU nodes take minutes to boot
    # and pull the image) before it is refused.
    wait_for_nodes_s: float = 900.0

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("scaling.num_workers", f"is {self.num_workers}", "use 1 or more workers")
        if self.use_gpu and self.gpus_per_worker < 1:
            raise ConfigError("scaling.gpus_per_worker", f"is {self.gpus_per_worker}", "use 1 or more with use_gpu")
        if not self.use_gpu and self.gpus_per_worker != 1:
            raise ConfigError("scaling.gpus_per_worker", f"is {self.gpus_per_worker} but scaling.use_gpu is off",
                              "add --use-gpu, or leave gpus_per_worker at 1")
        if self.cpus_per_worker < 1:
            raise ConfigError("scaling.cpus_per_worker", f"is {self.cpus_per_worker}", "use 1 or more")
        if self.wait_for_nodes_s < 0:
            raise ConfigError("scaling.wait_for_nodes_s", f"is {self.wait_for_nodes_s}",
                              "use 0 (refuse unless the nodes are up) or a number of seconds, e.g. 900")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. An empty tracking_uri means $MLFLOW_TRACKING_URI, else sqlite in the work directory."""

    tracking_uri: str = ""
    experiment: str = "artnet"
    artifact_location: str = ""  # empty: <workdir>/mlartifacts for a local store

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment", "is empty", "name the MLflow experiment, e.g. artnet")


SEARCH_ALGORITHMS = ("random", "optuna")


@dataclass(frozen=True)
class SearchConfig:
    """`artnet tune`: head-only trials on cached features, per painter count, then the best head fine-tuned."""

    samples: int = 16  # trials per painter count
    algorithm: str = "random"  # or "optuna" (model-based; needs the optuna package)
    metric: str = "val_loss"  # chooses the config and drives early stopping; val_* metrics only
    epochs: int = 30  # head epochs a trial may run (ASHA's max_t)
    grace_epochs: int = 3  # epochs before ASHA may stop a trial (at most search.epochs)
    views: int = 4  # augmented views per training image in the feature cache
    cache: str = ""  # feature cache: a path or s3:// prefix; empty: <workdir>/embeddings
    painter_counts: tuple[int, ...] = ()  # top-K painters by paintings; empty: all painters of the catalog
    max_concurrent: int = 0  # trials at once; 0: one per CPU, one CPU left for Ray's own work
    finetune: bool = True  # fine-tune each count's best head end to end on images (Ray Train)
    # Fine-tuning trials per count when the space has fine-tuning fields (see search.space.FINETUNE_FIELDS):
    # each an `artnet train` job on the images under Ray Tune, starting from the count's best head.
    finetune_samples: int = 4
    # How cached features are stored and handed to trials: "float16" halves the cache, the driver's copy and the
    # object-store copy (heads still compute in float32); a float16 cache is another cache than a float32 one.
    feature_dtype: str = "float32"

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError("search.samples", f"is {self.samples}", "run 1 or more trials per painter count")
        if self.algorithm not in SEARCH_ALGORITHMS:
            raise ConfigError("search.algorithm", f"is {self.algorithm!r}", f"use one of {', '.join(SEARCH_ALGORITHMS)}")
        if self.metric not in VAL_METRICS:
            raise ConfigError("search.metric", f"is {self.metric!r}",
                              f"choose on validation: one of {', '.join(VAL_METRICS)} (never a test metric)")
        if self.epochs < 1:
            raise ConfigError("search.epochs", f"is {self.epochs}", "let a trial run 1 or more epochs")
        if self.grace_epochs < 1:
            raise ConfigError("search.grace_epochs", f"is {self.grace_epochs}",
                              "give every trial 1 or more epochs before it may be stopped")
        if self.views < 0:
            raise ConfigError("search.views", f"is {self.views}", "use 0 (centre crops only) or more views")
        if any(k < 2 for k in self.painter_counts):
            raise ConfigError("search.painter_counts", f"is {self.painter_counts}", "use counts of 2 or more painters")
        if self.finetune_samples < 1:
            raise ConfigError("search.finetune_samples", f"is {self.finetune_samples}", "run 1 or more trials")
        if self.max_concurrent < 0:
            raise ConfigError("search.max_concurrent", f"is {self.max_concurrent}", "use 0 (automatic) or more")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError("search.feature_dtype", f"is {self.feature_dtype!r}",
                              "use float32 (exact features) or float16 (half the memory)")


PROMOTION_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "top3_accuracy")


@dataclass(frozen=True)
class RegistryConfig:
    """`artnet promote`: which registered model, how a challenger is judged against the champion, on what."""

    model_name: str = "artnet"
    metric: str = "balanced_accuracy"  # on the frozen evaluation set (a catalog's test split)
    margin: float = 0.0  # the challenger must beat the champion by more than this
    eval_catalog: str = ""  # empty: the registered model's frozen set, else the challenger's own catalog
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite in workdir
    workdir: str = "work"

    def validate(self) -> None:
        if not self.model_name or "/" in self.model_name or "@" in self.model_name:
            raise ConfigError("registry.model_name", f"is {self.model_name!r}",
                              "use a plain registered-model name, e.g. artnet-painters")
        if self.metric not in PROMOTION_METRICS:
            raise ConfigError("registry.metric", f"is {self.metric!r}", f"use one of {', '.join(PROMOTION_METRICS)}")
        if not 0 <= self.margin < 1:
            raise ConfigError("registry.margin", f"is {self.margin}", "use a score difference in [0, 1), e.g. 0.01")


VAL_METRICS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_top3_accuracy")


@dataclass(frozen=True)
class JobConfig:
    """Everything one training job needs. `catalog` is the folder/prefix holding manifest.parquet."""

    catalog: str = ""
    name: str = "artnet"
    workdir: str = "work"
    storage_path: str = ""  # Ray Train checkpoints; empty: <workdir>/ray_results
    max_failures: int = 0
    data: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def validate(self) -> None:
        if not self.catalog:
            raise ConfigError("catalog", "is empty", "pass the --out folder of `artnet catalog` (holds manifest.parquet)")
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"is {self.name!r}", "use a plain job name without slashes")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"is {self.max_failures}", "use -1 (retry forever), 0 or more")
        for part in (self.data, self.model, self.train, self.scaling, self.tracking, self.search):
            part.validate()


_TUPLE_ITEMS = {"tuple[int, ...]": int, "tuple[float, ...]": float, "tuple[float, float, float]": float}


def _coerce(text: str, current, annotation: str = ""):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, tuple):
        kind = _TUPLE_ITEMS.get(annotation, str)  # "3,5,10", or "(3, 5, 10)" as str() and MLflow params write it
        return tuple(kind(x.strip().strip("'\"")) for x in text.strip("()[] ").split(",") if x.strip())
    if current is None:
        return None if text.lower() == "none" else int(text)
    return type(current)(text)


def override(cfg, assignments: dict[str, str], _prefix: str = ""):
    """Apply dotted `section.field=value` strings (from --set or YAML) to a frozen config tree."""
    for dotted, text in assignments.items():
        head, _, rest = dotted.partition(".")
        names = {f.name for f in dataclasses.fields(cfg)}
        if head not in names:
            raise ConfigError(_prefix + dotted, "is not a config field",
                              f"use one of {', '.join(_prefix + n for n in sorted(names))}")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ConfigError(_prefix + dotted, f"'{head}' has no sub-fields", f"use '{_prefix}{head}=VALUE'")
            cfg = dataclasses.replace(cfg, **{head: override(current, {rest: text}, f"{_prefix}{head}.")})
            continue
        if dataclasses.is_dataclass(current):
            raise ConfigError(_prefix + dotted, "is a section", f"set one of its fields, e.g. {head}.<field>=VALUE")
        try:
            annotation = next(f.type for f in dataclasses.fields(cfg) if f.name == head)
            value = _coerce(str(text), current, str(annotation))
        except ValueError as e:
            raise ConfigError(_prefix + dotted, f"cannot use {text!r} ({e})", f"give a {type(current).__name__} value") from None
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


def flatten(cfg, prefix: str = "") -> dict[str, object]:
    """Dotted name -> value for every leaf field: MLflow params, and the inverse of `override`."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out
