""""Unknown painter", measured honestly on the real paintings: painters held out of training entirely.

For each seed, `--held-out` of the 47 painters with >= 40 paintings are removed from the catalog; a head is
trained on the others' cached MobileNetV2 features (the best 47-painter head config of the search sweep),
temperature and threshold are fitted on the known painters' validation split for `--rate` false flags, and then:
the share of known painters' test paintings flagged (false flags), the share of the held-out painters' paintings
flagged (all of their paintings: the model never saw any), the AUROC of the calibrated confidence between the
two, and the test ECE before and after scaling. Uses the same `model.calibration` code as every trained model.

    python bench/unknown.py [--held-out 10] [--rate 0.1] [--seeds 0,1,2]   -> bench/results/unknown.json + .md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from artnet import console, metrics
from artnet.cli import run_catalog
from artnet.config import CatalogConfig
from artnet.data import catalog
from artnet.search import embeddings
from artnet.search.heads import fit_head, logits_of
from artnet.model import calibration as calib
from artnet.train import trainer

from search import SHARED, RESULTS, base_job  # noqa: E402  (bench/ is the script's directory)

# The best 47-painter head config of `python bench/search.py sweep` (bench/results/search_sweep.md).
HEAD = ["model.head_depth=0", "model.dropout=0.3647", "train.lr=0.003021", "train.label_smoothing=0",
        "train.class_balance=none", "train.patience=5"]


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties halved: here positives are unseen painters' paintings scored
    by 1 - confidence."""
    scores = np.concatenate([negatives, positives])
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1.0
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n, p = len(negatives), len(positives)
    return float((ranks[n:].sum() - p * (p + 1) / 2) / (n * p))


def one_seed(manifest, painters, directory, job, held_out: int, rate: float, seed: int, epochs: int) -> dict:
    rng = np.random.default_rng(seed)
    unseen = sorted(rng.choice(painters, held_out, replace=False).tolist())
    known_manifest, known = catalog.subset(manifest, painters, [p for p in painters if p not in unseen])
    unseen_manifest, _ = catalog.subset(manifest, painters, unseen)
    data = embeddings.load(known_manifest, directory, job.search.views)
    head = fit_head(data["train"], len(known), job.model, job.train, epochs, val=data["val"]).model
    val_logits, test_logits = logits_of(head, data["val"].x), logits_of(head, data["test"].x)
    fitted = calib.calibrate(val_logits, data["val"].y, rate)
    unseen_x = np.concatenate([f.x for f in embeddings.load(unseen_manifest, directory, 0).values()])
    known_p, unseen_p = fitted.probabilities(test_logits), fitted.probabilities(logits_of(head, unseen_x))
    test = metrics.evaluate_logits(data["test"].y, test_logits, len(known))[0]
    alternatives = other_scores(data, val_logits, test_logits, logits_of(head, unseen_x), unseen_x, rate)
    return {"seed": seed, "unseen_painters": unseen, "known_painters": len(known),
            "unseen_images": len(unseen_x), "known_test_images": len(data["test"].y),
            "test_accuracy": test["accuracy"], "temperature": fitted.temperature, "threshold": fitted.threshold,
            "false_flags_known_test": float(fitted.unknown(known_p).mean()),
            "flagged_unseen": float(fitted.unknown(unseen_p).mean()),
            "auroc": auroc(1 - known_p.max(1), 1 - unseen_p.max(1)),
            "test_ece_before": calib.expected_calibration_error(metrics.softmax(test_logits), data["test"].y),
            "test_ece_after": calib.expected_calibration_error(known_p, data["test"].y),
            "val_nll_before": fitted.val_nll_before, "val_nll_after": fitted.val_nll_after,
            "other_scores": alternatives}


def other_scores(data, val_logits, test_logits, unseen_logits, unseen_x, rate: float) -> dict:
    """Other "unknown" scores on the same split, threshold from validation at the same rate: (false flags on known
    test, unseen flagged, AUROC). Energy (Liu et al. 2020) on the logits; cosine distance to the 10th nearest
    training feature (Sun et al. 2022) in the backbone's feature space."""
    def energy(logits):
        top = logits.max(1, keepdims=True)
        return -(top[:, 0] + np.log(np.exp(logits - top).sum(1)))

    bank = data["train"].x / np.linalg.norm(data["train"].x, axis=1, keepdims=True)

    def knn(x, k=10):
        return -np.sort((x / np.linalg.norm(x, axis=1, keepdims=True)) @ bank.T, axis=1)[:, -k]

    out = {}
    for name, (val, test, unseen) in {
            "energy": (energy(val_logits), energy(test_logits), energy(unseen_logits)),
            "knn10_cosine": (knn(data["val"].x), knn(data["test"].x), knn(unseen_x))}.items():
        threshold = np.quantile(val, 1 - rate)
        out[name] = {"false_flags_known_test": float((test > threshold).mean()),
                     "flagged_unseen": float((unseen > threshold).mean()), "auroc": auroc(test, unseen)}
    return out


def spread(rows: list[dict], key: str) -> str:
    values = np.array([r[key] for r in rows])
    return f"{values.mean():.3f} ± {values.std():.3f} ({values.min():.3f}-{values.max():.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(Path(__file__).resolve().parents[1] / "work" / "bench"))
    parser.add_argument("--held-out", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--views", type=int, default=1)
    args = parser.parse_args()
    console.setup()
    workdir = Path(args.workdir) / "sweep"  # shares the sweep's catalog and feature cache
    cat_dir = str(workdir / "catalog")
    run_catalog(CatalogConfig(source=str(SHARED / "data" / "paintings"), min_paintings=40), cat_dir)
    manifest, painters = catalog.load(cat_dir)
    job = trainer.resolve(base_job(cat_dir, workdir, "unknown", [*HEAD, f"search.views={args.views}"]))
    console.init_ray()
    start = time.time()
    cached = embeddings.ensure(manifest, job, str(workdir / "embeddings"), views=args.views)
    rows = [one_seed(manifest, painters, cached["directory"], job, args.held_out, args.rate, int(s), args.epochs)
            for s in args.seeds.split(",")]
    out = {"rate": args.rate, "held_out": args.held_out, "painters": len(painters), "runs": rows,
           "features_computed": cached["computed"], "wall_s": round(time.time() - start, 1),
           "cpu_cores": os.cpu_count(),
           "summary": {k: spread(rows, k) for k in ("false_flags_known_test", "flagged_unseen", "auroc",
                                                    "test_ece_before", "test_ece_after", "test_accuracy",
                                                    "temperature")}}
    for name in rows[0]["other_scores"]:
        for key in ("flagged_unseen", "auroc"):
            out["summary"][f"{name} {key}"] = spread([r["other_scores"][name] for r in rows], key)
    table = ["| measure | mean ± sd (min-max) over seeds " + args.seeds + " |", "|---|---|"]
    table += [f"| {k} | {v} |" for k, v in out["summary"].items()]
    print(json.dumps(out["summary"], indent=2))
    print("\n".join(table))
    (RESULTS / "unknown.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "unknown.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
