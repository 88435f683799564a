"""`artnet` command line: demo-data, catalog, preview, train, tune, analyze, promote, predict, demo, doctor. Each
command parses options into a config, validates it (failing before any cluster work, naming the field), then makes one
call into the package.
A user error, wherever it was raised (driver, Ray Train worker, Ray Data task), ends as one `error: ...` line
and exit status 2; tracebacks are for bugs, or for `--debug`."""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa

from artnet import console, doctor
from artnet.config import (AugmentConfig, CatalogConfig, ConfigError, JobConfig, PipelineConfig, RegistryConfig,
                           override, replace)
from artnet.data import catalog, demo_data, storage
from artnet.errors import UserError, find_user_error


def _float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _name_tuple(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_catalog_options(p: argparse.ArgumentParser) -> None:
    """Options left unset keep `CatalogConfig`'s defaults (shown in the help from there)."""
    d = CatalogConfig(source="")
    p.add_argument("--top-k", type=int, help=f"keep the K painters with most paintings (default {d.top_k}: all)")
    p.add_argument("--painters", type=_name_tuple, help="comma-separated painter names to keep (default: all)")
    p.add_argument("--min-paintings", type=int, help=f"drop painters with fewer paintings (default {d.min_paintings})")
    p.add_argument("--split", type=_float_tuple,
                   help=f"train,val,test fractions (default {','.join(str(x) for x in d.split)})")
    p.add_argument("--seed", type=int,
                   help=f"split seed: an image keeps its split for a given seed (default {d.seed})")
    p.add_argument("--layout", choices=catalog.LAYOUTS, default="auto", help="source layout (default: detect)")


def catalog_config(args: argparse.Namespace, source: str) -> CatalogConfig:
    cfg = replace(CatalogConfig(source=source), painters=args.painters, top_k=args.top_k,
                  min_paintings=args.min_paintings, split=args.split, seed=args.seed)
    cfg.validate()
    return cfg


def _yaml_overrides(path: str) -> dict[str, str]:
    import yaml

    if not storage.exists(path):
        raise UserError(path, "the --config file does not exist", "pass an existing YAML file of overrides")

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


SEARCH_FLAGS = {"samples": "search.samples", "painter_counts": "search.painter_counts",
                "algorithm": "search.algorithm", "metric": "search.metric", "search_epochs": "search.epochs",
                "views": "search.views", "cache": "search.cache", "finetune": "search.finetune",
                "finetune_samples": "search.finetune_samples"}


def add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--painter-counts", help="comma-separated: search at each top-K painter count, e.g. 3,5,10,27,47")
    p.add_argument("--samples", type=int, help="trials per painter count")
    p.add_argument("--algorithm", help="random (default) or optuna")
    p.add_argument("--metric", help="validation metric that chooses the config (default val_loss)")
    p.add_argument("--search-epochs", type=int, help="head epochs a trial may run")
    p.add_argument("--views", type=int, help="augmented views per training image in the feature cache")
    p.add_argument("--cache", help="feature cache: a path or s3:// prefix (default WORKDIR/embeddings)")
    p.add_argument("--no-finetune", dest="finetune", action="store_const", const=False,
                   help="stop after the head search (no end-to-end fine-tuning of the best head)")
    p.add_argument("--finetune-samples", type=int,
                   help="fine-tuning trials per count when the space has fine-tuning fields (training jobs)")
    p.add_argument("--space", action="append", default=[], metavar="FIELD=DIST:ARGS",
                   help="a search dimension, e.g. model.dropout=uniform:0.1,0.6 (default: artnet's head space)")
    p.add_argument("--space-file", help="YAML of FIELD: DIST:ARGS entries")


def job_config(args: argparse.Namespace) -> JobConfig:
    """Preset, then YAML, then flags, then --set: later wins. Validated here; `trainer.fit` checks what needs
    the backbone or storage, still before any Ray work."""
    from artnet import presets

    job = presets.preset(args.preset)
    if args.config:
        job = override(job, _yaml_overrides(args.config))
    names = {**TRAIN_FLAGS, **SEARCH_FLAGS}
    flags = {names[k]: str(v) for k, v in vars(args).items() if k in names and v is not None}
    job = override(job, {**flags, **parse_assignments(args.set), "catalog": args.catalog})
    job.validate()
    return job


def bad_counts(summary: dict) -> str:
    """A bad-image tally's summary as a console phrase: "0", or "3 (corrupt 2, empty 1)"."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary["by_reason"].items()))
    return f"{summary['total']} ({reasons})" if reasons else str(summary["total"])


def print_result(result: dict) -> None:
    m = result["metrics"]
    nan = float("nan")
    print(f"\ntest accuracy {m.get('test_accuracy', nan):.3f}, top-3 {m.get('test_top3_accuracy', nan):.3f}, "
          f"balanced accuracy {m.get('test_balanced_accuracy', nan):.3f}, macro-F1 {m.get('test_macro_f1', nan):.3f} "
          f"over {len(result['painters'])} painters")
    bad = result["bad_images"]
    print(f"bad images skipped: {bad_counts(bad)}"
          + (f"; reads retried after storage faults: {bad['storage_retries']}" if bad["storage_retries"] else ""))
    print(f"checkpoints: {result['checkpoint']}")
    print(f"MLflow run {result['run_id']} in {result['tracking_uri']}")
    print(f"browse it:   mlflow ui --backend-store-uri {result['tracking_uri']}")


def tune_sweep(args: argparse.Namespace) -> dict:
    """The search space and job from the command line, both checked before any Ray work; then the sweep."""
    console.import_tensorflow()
    from artnet.search import space, tune

    job = job_config(args)
    yaml_text = storage.read_bytes(args.space_file).decode() if args.space_file else None
    return tune.sweep(job, space.parse_space(space.space_entries(args.space, yaml_text), job))


def print_sweep(result: dict) -> None:
    from artnet.search import tune

    print("\n" + tune.markdown_table(result["rows"]))
    print("summary: " + ", ".join(result["summary"]))
    print(f"MLflow parent run {result['run_id']} in {result['tracking_uri']}")


def run_catalog(cfg: CatalogConfig, out: str, layout: str = "auto") -> catalog.Catalog:
    cat = catalog.build(cfg, layout)
    catalog.write(cat, out, cfg)
    print(catalog.format_table(cat))
    print(f"wrote {storage.join(out, catalog.MANIFEST)} and {storage.join(out, catalog.LABELS)}")
    return cat


def preview(manifest_dir: str, cfg: PipelineConfig, batches: int, grid_png: str | None) -> dict:
    """Stream a few augmented training batches through Ray Data and report shapes, speed and skipped images."""
    import ray

    from artnet.data import pipeline
    from artnet.track import plots

    manifest, painters = catalog.load(manifest_dir)
    console.init_ray()
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
    print(f"{seen} images in {elapsed:.1f}s ({seen / elapsed:.1f} images/s); skipped bad images: {bad_counts(summary)}")
    if grid_png and first is not None:
        plots.image_grid(first["image"][:16], [painters[j] for j in first["label"][:16]], grid_png)
        print(f"augmented samples: {grid_png}")
    return summary


# The real-paintings demo: the mobilenet preset, shortened to a few minutes on 2 CPU cores.
REAL_DEMO = {"data.image_size": "160", "train.head_epochs": "2", "train.finetune_epochs": "2"}


def demo(workdir: str, data: str | None = None, weights: str | None = None) -> dict:
    """Catalogue -> a preview of augmented batches -> training -> a few test paintings named, all local: on real
    paintings (3 painters, MobileNetV2 ImageNet weights) when `data` and `weights` are given, else on a
    synthetic stand-in."""
    from artnet import presets
    from artnet.train import trainer

    out = storage.join(workdir, "catalog")
    if data and weights:
        print(f"demo on real paintings: the 3 painters with most paintings in {data}, MobileNetV2 from {weights}")
        run_catalog(CatalogConfig(source=data, top_k=3), out)
        job = override(presets.preset("mobilenet"), {**REAL_DEMO, "model.weights": weights})
    else:
        data = storage.join(workdir, "data")
        if not demo_data.demo_set_exists(data):
            print(f"writing the synthetic demo set to {data} (a stand-in: see README for real paintings)")
            demo_data.write_demo_set(data, painters=3, per_painter=80)
        run_catalog(CatalogConfig(source=data, split=(0.7, 0.15, 0.15)), out)
        job = presets.preset("demo")
    preview(out, replace(job.data, image_size=job.data.image_size or 128, batch_size=16), batches=1,
            grid_png=storage.join(workdir, "augmented_samples.png"))
    # A fresh job name each time: the same name would resume the finished demo instead of training again.
    job = override(job, {"catalog": out, "workdir": workdir, "name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}"})
    result = trainer.fit(job)
    print_result(result)
    from artnet.serve import registry

    cfg = RegistryConfig(model_name="artnet-demo", tracking_uri=result["tracking_uri"], workdir=workdir)
    print("\n" + registry.promote(result["run_id"], cfg).line())
    show_predictions(registry.champion_uri(cfg.model_name), result["tracking_uri"], out, per_painter=2)
    return result


def show_predictions(model_uri: str, tracking_uri: str, catalog_dir: str, per_painter: int) -> pa.Table:
    """Name the painter of a few test paintings with a logged or registered model."""
    from artnet.model import bundle
    from artnet.serve import predict

    manifest, painters = catalog.load(catalog_dir)
    test = sorted((row for row in manifest.to_pylist() if row["split"] == "test" and row["row"] < 0),
                  key=lambda row: row["key"])
    chosen = [row for p in painters for row in [r for r in test if r["painter"] == p][:per_painter]]
    table = predict.predict_here(bundle.load(model_uri, tracking_uri), [r["uri"] for r in chosen], k=1)
    print(f"\na few test paintings, as {model_uri} sees them:")
    width = max(len(r["key"]) for r in chosen)
    for truth, row in zip(chosen, table.to_pylist()):
        if row["error"]:
            print(f"  {truth['key']:<{width}}  unreadable: {row['error']}")
            continue
        verdict = "right" if row["painter"] == truth["painter"] else f"wrong, painted by {truth['painter']}"
        unknown = " (flagged: unknown painter)" if row["unknown"] else ""
        print(f"  {truth['key']:<{width}}  -> {row['painter']} ({row['probability']:.0%}) {verdict}{unknown}")
    return table


REGISTRY_FLAGS = ("model_name", "metric", "margin", "eval_catalog", "tracking_uri", "workdir")


def add_registry_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", help="registered model (default artnet)")
    p.add_argument("--metric", help="promotion metric on the evaluation set (default balanced_accuracy)")
    p.add_argument("--margin", type=float, help="how much the challenger must beat the champion by (default 0)")
    p.add_argument("--eval-catalog", help="catalog whose test split is the frozen evaluation set (first promotion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db)")
    p.add_argument("--workdir", help="where a local job kept mlflow.db (default ./work)")


def registry_config(args: argparse.Namespace) -> RegistryConfig:
    cfg = override(RegistryConfig(), {k: str(getattr(args, k)) for k in REGISTRY_FLAGS
                                      if getattr(args, k, None) is not None})
    cfg.validate()
    return cfg


def run_promote(args: argparse.Namespace) -> None:
    from artnet.serve import registry

    cfg = registry_config(args)
    if args.rollback:
        before, after = registry.rollback(cfg)
        print(f"{cfg.model_name}: champion moved back from version {before} to version {after}")
        return
    if not args.run_id:
        raise ConfigError("RUN", "is missing", "pass the run id or job name of a finished `artnet train`")
    decision = registry.promote(args.run_id, cfg, dry_run=args.dry_run)
    print(decision.line())
    print(f"evaluated on the test split of {decision.eval_set}; champion: {registry.champion_uri(cfg.model_name)}")


def run_predict(args: argparse.Namespace) -> None:
    import json

    from artnet.serve import predict
    from artnet.track import tracking

    if args.format == "parquet" and not args.out:
        raise ConfigError("--out", "is missing for --format parquet", "name a folder or s3:// prefix for the rows")
    if args.top_k < 1:
        raise ConfigError("--top-k", f"is {args.top_k}", "use 1 or more")
    uri = tracking.resolve_uri(args.tracking_uri or "", args.workdir or "work")
    table = predict.predict(args.model, args.sources, k=args.top_k, tracking_uri=uri,
                            out=args.out if args.format == "parquet" else None, use_gpu=args.use_gpu,
                            explain=args.explain)
    if args.format == "parquet":
        print(predict.summary(predict.read_predictions(args.out, ["error", "unknown"])))
        print(f"wrote predictions under {args.out}")
    elif args.format == "json":
        for row in table.to_pylist():
            print(json.dumps(row))
    else:
        print(predict.format_table(table))
        print(predict.summary(table))
    if args.explain:
        print(f"Grad-CAM maps: {args.explain}/<image>.gradcam.png")


def build_parser() -> argparse.ArgumentParser:
    from artnet.serve import predict

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show Ray's, TensorFlow's and MLflow's own logs")
    common.add_argument("--debug", action="store_true", help="a traceback for user errors too")
    parser = argparse.ArgumentParser(prog="artnet", description="Given a painting, name the painter.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common])

    p = command("demo-data", "write a small synthetic painting set (offline demo stand-in)")
    p.add_argument("out")
    p.add_argument("--painters", type=int, default=3)
    p.add_argument("--per-painter", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)

    p = command("catalog", "list, label, filter and split a source into a manifest")
    p.add_argument("source", help="folder, CSV index, Parquet file/folder, or s3:// prefix")
    p.add_argument("--out", required=True, help="where manifest.parquet and labels.json go (path or s3://)")
    add_catalog_options(p)

    p = command("preview", "stream a few augmented batches from a manifest through Ray Data")
    p.add_argument("manifest_dir")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--png", default=None, help="write a grid of augmented samples here")

    p = command("train", "fine-tune on a catalogued manifest with Ray Train; tracked in MLflow")
    p.add_argument("catalog", help="folder or s3:// prefix written by `artnet catalog`")
    add_train_options(p)

    p = command("tune", "search heads on cached features per painter count (Ray Tune), then fine-tune the best")
    p.add_argument("catalog", help="folder or s3:// prefix written by `artnet catalog`")
    add_train_options(p)
    add_search_options(p)

    p = command("analyze", "cross-validated report of a head on cached features (per-painter scores, confusion)")
    p.add_argument("catalog", help="folder or s3:// prefix written by `artnet catalog`")
    p.add_argument("--out", required=True, help="where report.json and confusion_matrix.png go")
    p.add_argument("--folds", type=int, default=5)
    add_train_options(p)
    add_search_options(p)

    p = command("promote", "register a run's model; it becomes champion if it beats the current one")
    p.add_argument("run_id", nargs="?", metavar="RUN", help="run id or job --name of a finished `artnet train`")
    p.add_argument("--dry-run", action="store_true", help="evaluate and decide, change nothing")
    p.add_argument("--rollback", action="store_true", help="move champion back to the version it replaced")
    add_registry_options(p)

    p = command("predict", "name the painters of images, folders or s3:// prefixes")
    p.add_argument("sources", nargs="+", help="image files, folders or s3:// prefixes")
    p.add_argument("--model", required=True, help="models:/NAME@champion, a run's model URI, or a model folder")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--format", choices=predict.FORMATS, default="table")
    p.add_argument("--out", help="folder or s3:// prefix for Parquet rows (--format parquet)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs")
    p.add_argument("--workdir", help="where a local job kept mlflow.db (default ./work)")
    p.add_argument("--use-gpu", action="store_true", help="one prediction actor per GPU")
    p.add_argument("--explain", metavar="DIR", help="write a Grad-CAM heatmap PNG per image here (files only)")

    p = command("demo", "the whole flow, locally: on real paintings when --data and --weights are given")
    p.add_argument("--workdir", default="work/demo")
    p.add_argument("--data", default=os.environ.get("ARTNET_DATA") or None,
                   help="a folder of paintings, one folder per painter (default $ARTNET_DATA)")
    p.add_argument("--weights", default=os.environ.get("ARTNET_WEIGHTS") or None,
                   help="MobileNetV2 ImageNet weights file (default $ARTNET_WEIGHTS)")

    p = command("doctor", "what a job would get here: GPUs, precision, collectives, S3, Ray, MLflow (exit 2 on a FAIL)")
    doctor.add_options(p)
    return parser


def run(args: argparse.Namespace) -> None:
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
        from artnet.train import trainer

        print_result(trainer.fit(job_config(args)))
    elif args.command == "tune":
        print_sweep(tune_sweep(args))
    elif args.command == "analyze":
        console.import_tensorflow()
        from artnet.search import analyze

        print(analyze.format_report(analyze.analyze(job_config(args), args.folds, args.out)))
        print(f"wrote {storage.join(args.out, 'report.json')} and {storage.join(args.out, 'confusion_matrix.png')}")
    elif args.command == "promote":
        run_promote(args)
    elif args.command == "predict":
        run_predict(args)
    elif args.command == "demo":
        demo(args.workdir, args.data, args.weights)
    elif args.command == "doctor":
        doctor.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    try:
        run(args)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None or args.debug:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
