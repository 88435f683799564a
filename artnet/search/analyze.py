"""`artnet analyze`: a cross-validated report of a head on cached features (the study's planned
`KerasClassifier` analysis): per-painter precision/recall/F1 and a confusion matrix, from out-of-fold
predictions over the train and validation splits (the test split is left alone)."""

from __future__ import annotations

import json

import numpy as np

from artnet import console, metrics
from artnet.config import JobConfig
from artnet.data import catalog, storage
from artnet.search import embeddings, estimator


def analyze(job: JobConfig, folds: int, out: str) -> dict:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from artnet.track import plots
    from artnet.train import trainer

    console.import_tensorflow()
    job.validate()
    manifest, painters = catalog.load(job.catalog)
    job = trainer.resolve(job)
    console.init_ray()
    cached = embeddings.ensure(manifest, job, embeddings.cache_of(job), 0, job.train.seed)
    data = embeddings.load(manifest, cached["directory"], 0)
    x = np.concatenate([data["train"].x, data["val"].x])
    y = np.concatenate([data["train"].y, data["val"].y])
    folds_ = StratifiedKFold(folds, shuffle=True, random_state=job.train.seed)
    probabilities = cross_val_predict(estimator.from_job(job), x, y, cv=folds_, method="predict_proba")
    scores, cm = metrics.evaluate_logits(y, np.log(np.clip(probabilities, 1e-12, 1)), len(painters))
    stats = metrics.per_class(cm)
    report = {"folds": folds, "images": int(len(y)), **{k: v for k, v in scores.items() if k != "images"},
              "per_painter": {p: {k: float(stats[k][i]) for k in ("precision", "recall", "f1", "support")}
                              for i, p in enumerate(painters)}}
    storage.write_bytes(storage.join(out, "report.json"), json.dumps(report, indent=2).encode())
    plots.confusion_matrix(cm, painters, storage.join(out, "confusion_matrix.png"),
                           title=f"{folds}-fold cross-validation, head on {job.model.backbone} features")
    return report


def format_report(report: dict) -> str:
    width = max(len("painter"), *(len(p) for p in report["per_painter"]))
    lines = [f"{'painter':<{width}}  precision  recall     f1  images"]
    for painter, s in report["per_painter"].items():
        lines.append(f"{painter:<{width}}  {s['precision']:>9.3f}  {s['recall']:>6.3f}  {s['f1']:>5.3f}  "
                     f"{int(s['support']):>6}")
    lines.append(f"{report['folds']}-fold cross-validated over {report['images']} train+val images: accuracy "
                 f"{report['accuracy']:.3f}, balanced {report['balanced_accuracy']:.3f}, "
                 f"macro-F1 {report['macro_f1']:.3f}, top-3 {report['top3_accuracy']:.3f}")
    return "\n".join(lines)
