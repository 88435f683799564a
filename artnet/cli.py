"""`artnet` command line: demo-data, catalog, preview, train, demo. Each command parses options into a config,
validates it (failing before any cluster work, naming the field), then makes one call into the package."""

from __future__ import annotations

import argparse
import os
import sys
import time

from artnet import catalog, demo_data, storage
from artnet.config import AugmentConfig, CatalogConfig, ConfigError, JobConfig, PipelineConfig, override


def _float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_catalog_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=0, help="keep the K painters with most paintings")
    p.add_argument("--painters", type=_name_tuple, default=(), help="comma-separated painter names to keep")
    p.add_argument("--min-paintings", type=int, default=1, help="drop painters with fewer paintings")
    p.add_argument("--split", type=_float_tuple, default=(0.8, 0.1, 0.1), help="train,val,test fractions")
    p.add_argument("--seed", type=int, default=0, help="split seed (an image keeps its split for a given seed)")
    p.add_argument("--layout", choices=catalog.LAYOUTS, default="auto", help="source layout (default: detect)")


def catalog_config(args: argparse.Namespace, source: str) -> CatalogConfig:
    cfg = CatalogConfig(source=source, painters=args.painters, top_k=args.top_k, min_paintings=args.min_paintings,
                        split=args.split, seed=args.seed)
    cfg.validate()
    return cfg


def _yaml_overrides(path: str) -> dict[str, str]:
    import yaml

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return dict(walk(yaml.safe_load(storage.read_bytes(path)) or {}))


def parse_assignments(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(item, "is not KEY=VALUE", "write e.g. --set train.lr=0.001")
        out[key.strip()] = value.strip()
    return out


TRAIN_FLAGS = {"backbone": "model.backbone", "weights": "model.weights", "image_size": "data.image_size",
               "workers": "scaling.num_workers", "use_gpu": "scaling.use_gpu", "head_epochs": "train.head_epochs",
               "finetune_epochs": "train.finetune_epochs", "unfreeze_blocks": "train.unfreeze_blocks",
               "batch_size": "train.batch_size", "lr": "train.lr", "max_failures": "max_failures",
               "storage_path": "storage_path", "workdir": "workdir", "name": "name"}


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="inception", help="starting point: inception (default), study, mobilenet, demo")
    p.add_argument("--config", help="YAML file of overrides (nested sections or dotted keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--name", help="job name: re-running a name resumes it")
    p.add_argument("--workdir", help="local outputs (default ./work)")
    p.add_argument("--storage-path", help="checkpoints: a path or s3:// prefix (default WORKDIR/ray_results)")
    p.add_argument("--backbone", help="inception_v3, mobilenet_v2, mobilenet or tiny")
    p.add_argument("--weights", help="imagenet, none, a weights file or an s3:// URI")
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers (one per node or GPU group)")
    p.add_argument("--use-gpu", action="store_const", const=True)
    p.add_argument("--head-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--unfreeze-blocks", type=int)
    p.add_argument("--batch-size", type=int, help="per replica")
    p.add_argument("--lr", type=float, help="learning rate for a global batch of 256")
    p.add_argument("--max-failures", type=int)


def job_config(args: argparse.Namespace) -> JobConfig:
    """Preset, then YAML, then flags, then --set: later wins. Validated here, before any Ray work."""
    from artnet import presets, train

    job = presets.preset(args.preset)
    if args.config:
        job = override(job, _yaml_overrides(args.config))
    flags = {TRAIN_FLAGS[k]: str(v) for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    job = override(job, {**flags, **parse_assignments(args.set), "catalog": args.catalog})
    return train.resolve(job)


def print_result(result: dict) -> None:
    m = result["metrics"]
    print(f"\ntest accuracy {m.get('test_accuracy', float('nan')):.3f}, top-3 {m.get('test_top3_accuracy', float('nan')):.3f}, "
          f"macro-F1 {m.get('test_macro_f1', float('nan')):.3f} over {len(result['painters'])} painters")
    bad = result["bad_images"]
    print(f"bad images skipped: {bad['total']} {bad['by_reason'] or ''}")
    print(f"checkpoints: {result['checkpoint']}")
    print(f"MLflow run {result['run_id']} in {result['tracking_uri']}")
    print(f"browse it:   mlflow ui --backend-store-uri {result['tracking_uri']}")


def run_catalog(cfg: CatalogConfig, out: str, layout: str = "auto") -> catalog.Catalog:
    cat = catalog.build(cfg, layout)
    catalog.write(cat, out, cfg)
    print(catalog.format_table(cat))
    print(f"wrote {storage.join(out, catalog.MANIFEST)} and {storage.join(out, catalog.LABELS)}")
    return cat


def preview(manifest_dir: str, cfg: PipelineConfig, batches: int, grid_png: str | None) -> dict:
    """Stream a few augmented training batches through Ray Data and report shapes, speed and skipped images."""
    import ray

    from artnet import pipeline, plots

    manifest, painters = catalog.load(manifest_dir)
    ray.init(ignore_reinit_error=True)
    bad = pipeline.new_tally()
    ds = pipeline.build_dataset(manifest, "train", cfg, train=True, bad_images=bad)
    start, seen, first = time.perf_counter(), 0, None
    for i, batch in enumerate(ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy")):
        first = first if first is not None else batch
        seen += len(batch["label"])
        print(f"batch {i}: image {batch['image'].shape} {batch['image'].dtype}, labels {batch['label'].tolist()}")
        if i + 1 >= batches:
            break
    elapsed = time.perf_counter() - start
    summary = ray.get(bad.summary.remote())
    print(f"{seen} images in {elapsed:.1f}s ({seen / elapsed:.1f} images/s); skipped bad images: {summary['total']} "
          f"{summary['by_reason'] or ''}")
    if grid_png and first is not None:
        plots.image_grid(first["image"][:16], [painters[j] for j in first["label"][:16]], grid_png)
        print(f"augmented samples: {grid_png}")
    return summary


def demo(workdir: str) -> dict:
    """Synthetic data -> catalog -> a preview of augmented batches -> training, all local."""
    from artnet import presets, train

    data, out = storage.join(workdir, "data"), storage.join(workdir, "catalog")
    if not demo_data.demo_set_exists(data):
        print(f"writing the synthetic demo set to {data} (a stand-in: see README for real data)")
        demo_data.write_demo_set(data, painters=3, per_painter=80)
    run_catalog(CatalogConfig(source=data, split=(0.7, 0.15, 0.15)), out)
    preview(out, PipelineConfig(image_size=128, batch_size=16), batches=2,
            grid_png=storage.join(workdir, "augmented_samples.png"))
    # A fresh job name each time: the same name would resume the finished demo instead of training again.
    job = override(presets.preset("demo"), {"catalog": out, "workdir": workdir, "name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}"})
    result = train.fit(job)
    print_result(result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artnet", description="Given a painting, name the painter.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write a small synthetic painting set (offline demo stand-in)")
    p.add_argument("out")
    p.add_argument("--painters", type=int, default=3)
    p.add_argument("--per-painter", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("catalog", help="list, label, filter and split a source into a manifest")
    p.add_argument("source", help="folder, CSV index, Parquet file/folder, or s3:// prefix")
    p.add_argument("--out", required=True, help="where manifest.parquet and labels.json go (path or s3://)")
    add_catalog_options(p)

    p = sub.add_parser("preview", help="stream a few augmented batches from a manifest through Ray Data")
    p.add_argument("manifest_dir")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--png", default=None, help="write a grid of augmented samples here")

    p = sub.add_parser("train", help="fine-tune on a catalogued manifest with Ray Train; tracked in MLflow")
    p.add_argument("catalog", help="folder or s3:// prefix written by `artnet catalog`")
    add_train_options(p)

    p = sub.add_parser("demo", help="the whole flow on the synthetic demo set, locally")
    p.add_argument("--workdir", default="work/demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter hides the per-epoch lines; local Ray workers inherit this setting.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo-data":
            names = demo_data.write_demo_set(args.out, args.painters, args.per_painter, args.seed)
            print(f"wrote {args.per_painter} paintings each by {', '.join(names)} to {args.out}")
        elif args.command == "catalog":
            run_catalog(catalog_config(args, args.source), args.out, args.layout)
        elif args.command == "preview":
            cfg = PipelineConfig(image_size=args.image_size, batch_size=args.batch_size, augment=AugmentConfig())
            cfg.validate()
            preview(args.manifest_dir, cfg, args.batches, args.png)
        elif args.command == "train":
            from artnet import train

            print_result(train.fit(job_config(args)))
        elif args.command == "demo":
            demo(args.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
