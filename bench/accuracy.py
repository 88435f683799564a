"""Accuracy on the real paintings in ../shared/data/paintings with the offline MobileNetV2 ImageNet weights,
through the production path (catalog -> Ray Data -> Ray Train -> MLflow). Not a test: it takes a while on CPUs.

    python bench/accuracy.py top3            # Van Gogh, Degas, Picasso (2,018 paintings)
    python bench/accuracy.py min40           # every painter with >= 40 paintings (47)
    python bench/accuracy.py top3 --set train.finetune_epochs=8 ...

Writes bench/results/accuracy_<task>.json (test accuracy, top-3, macro-F1, split seed, epochs, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from artnet import presets
from artnet.cli import parse_assignments, run_catalog
from artnet.config import CatalogConfig, override
from artnet.data import catalog
from artnet.train import trainer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
TASKS = {"top3": {"top_k": 3}, "min40": {"min_paintings": 40}}
BASELINES = {"top3": {"study": 0.76, "frozen_features_logreg": 0.889, "majority": 0.436},
             "min40": {"frozen_features_logreg": 0.649}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    workdir = Path(args.workdir) / args.task
    cat_dir = str(workdir / "catalog")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), seed=args.seed, **TASKS[args.task]), cat_dir)
    job = override(presets.preset("mobilenet"), {
        "catalog": cat_dir, "workdir": str(workdir), "name": f"accuracy-{args.task}-{int(time.time())}",
        "model.weights": str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"),
        **parse_assignments(args.set)})
    start = time.time()
    result = trainer.fit(job)
    metrics = result["metrics"]
    _, painters = catalog.load(cat_dir)
    import mlflow

    val = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "val_accuracy")
    out = {
        "task": args.task, "painters": len(painters), "split_seed": args.seed,
        "test_accuracy": metrics.get("test_accuracy"), "test_top3_accuracy": metrics.get("test_top3_accuracy"),
        "test_macro_f1": metrics.get("test_macro_f1"), "test_images": metrics.get("test_images"),
        "val_accuracy_last_epoch": sorted(val, key=lambda m: m.step)[-1].value if val else None,
        "epochs_run": metrics.get("epoch"), "wall_s": round(time.time() - start, 1),
        "overrides": args.set, "baselines": BASELINES[args.task], "mlflow_run": result["run_id"],
        "cpu_cores": os.cpu_count(),
    }
    path = REPO / "bench" / "results" / f"accuracy_{args.task}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
