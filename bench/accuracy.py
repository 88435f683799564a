"""Accuracy on the real paintings in ../shared/data/paintings with the offline MobileNetV2 ImageNet weights,
through the production path (catalog -> Ray Data -> Ray Train -> MLflow). Not a test: it takes a while on CPUs.

    python bench/accuracy.py top3            # Van Gogh, Degas, Picasso (2,018 paintings)
    python bench/accuracy.py min40           # every painter with >= 40 paintings (47)
    python bench/accuracy.py top3 --set train.finetune_epochs=8 ...

Writes bench/results/accuracy_<task><tag>.json (test accuracy, top-3, balanced accuracy, macro-F1, split seed,
epochs, wall time) with baselines computed in the same run on the same split: the majority painter, and frozen
MobileNetV2 features + logistic regression (`HeadClassifier(head_depth=0)` on the feature cache). The study's
0.76 on 3 painters is a published figure, quoted as such.
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
PUBLISHED = {"top3": {"study": 0.76}, "min40": {}}


def baselines(job, manifest, painters: list[str]) -> dict:
    """Majority painter and frozen features + logistic regression, on this run's split."""
    import numpy as np

    from artnet import console, metrics
    from artnet.search import embeddings, estimator

    resolved = trainer.resolve(job)
    console.init_ray()
    cached = embeddings.ensure(manifest, resolved, embeddings.cache_of(resolved), views=0)
    data = embeddings.load(manifest, cached["directory"], 0)
    logreg = override(resolved, {"model.head_depth": "0", "model.dropout": "0", "train.class_balance": "none",
                                 "train.label_smoothing": "0", "train.lr": "0.01", "search.epochs": "60"})
    clf = estimator.from_job(logreg).fit(data["train"].x, data["train"].y)
    scores, _ = metrics.evaluate_logits(data["test"].y, np.log(clf.predict_proba(data["test"].x) + 1e-12),
                                        len(painters))
    majority = np.bincount(data["train"].y).argmax()
    return {"majority": float(np.mean(data["test"].y == majority)),
            "frozen_features_logreg": scores["accuracy"],
            "frozen_features_logreg_balanced": scores["balanced_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="suffix of the result file, e.g. _long")
    args = parser.parse_args()
    workdir = Path(args.workdir) / args.task
    cat_dir = str(workdir / "catalog")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), seed=args.seed, **TASKS[args.task]), cat_dir)
    job = override(presets.preset("mobilenet"), {
        "catalog": cat_dir, "workdir": str(workdir), "name": f"accuracy-{args.task}-{int(time.time())}",
        "model.weights": str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"),
        **parse_assignments(args.set)})
    manifest, painters = catalog.load(cat_dir)
    computed_baselines = baselines(job, manifest, painters)
    start = time.time()
    result = trainer.fit(job)
    metrics = result["metrics"]
    import mlflow

    val = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "val_accuracy")
    out = {
        "task": args.task, "painters": len(painters), "split_seed": args.seed,
        "test_accuracy": metrics.get("test_accuracy"), "test_top3_accuracy": metrics.get("test_top3_accuracy"),
        "test_macro_f1": metrics.get("test_macro_f1"), "test_images": metrics.get("test_images"),
        "test_balanced_accuracy": metrics.get("test_balanced_accuracy"),
        "test_ece_before": metrics.get("test_ece_before"), "test_ece_after": metrics.get("test_ece_after"),
        "val_accuracy_last_epoch": sorted(val, key=lambda m: m.step)[-1].value if val else None,
        "epochs_run": metrics.get("epoch"), "wall_s": round(time.time() - start, 1),
        "overrides": args.set, "baselines": computed_baselines, "published": PUBLISHED[args.task],
        "mlflow_run": result["run_id"],
        "cpu_cores": os.cpu_count(),
    }
    path = REPO / "bench" / "results" / f"accuracy_{args.task}{args.tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
