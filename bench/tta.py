"""Test-time augmentation on a trained model: how much averaging several views of each painting adds.

One of the levers issue 7 names for the 47-painter target. Takes a model `artnet train` logged (by default the
newest run of `bench/accuracy.py min40` in its work folder), scores the catalogue's validation and test splits with
a fixed set of views decided before looking at either (the centre crop as trained; its mirror image; the centre
and four corners at 1.15x zoom, each mirrored too: 12 views) and averages the views' logits. Validation is
reported beside test so that whether TTA helps can be read off the split the protocol may be chosen on.

    python bench/tta.py [--workdir work/bench/min40] [--run RUN_ID]
Writes bench/results/tta_<catalogue folder name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ZOOM, SHIFT = 1.15, 0.065  # a corner crop at 1.15x reaches 0.065 of the side from the centre: no reflected border
PROTOCOLS = {"centre": 1, "centre + mirror": 2, "12 views": 12}


def views():
    """The views, in the order `PROTOCOLS` takes prefixes of: the centre crop as trained, its mirror, then the
    centre and four corners at ZOOM, each also mirrored."""
    from artnet.data.transforms import Affine

    crops = [Affine(zoom=ZOOM, shift_x=dx, shift_y=dy, flip=flip) for flip in (False, True)
             for dx, dy in ((0, 0), (-SHIFT, -SHIFT), (SHIFT, -SHIFT), (-SHIFT, SHIFT), (SHIFT, SHIFT))]
    return [Affine(), Affine(flip=True), *crops]


def view_logits(model, uris: list[str], max_pixels: int, batch: int = 64) -> np.ndarray:
    """(views, images, painters) logits; each image is read and decoded once for all its views."""
    from artnet.data import storage, transforms

    size, settings, chosen, out = model.image_size, storage.S3Settings.from_env(), views(), []
    for start in range(0, len(uris), batch):
        part = uris[start:start + batch]
        images = np.empty((len(chosen), len(part), size, size, 3), np.uint8)
        for i, uri in enumerate(part):
            img = transforms.decode(storage.read_bytes(uri, settings), size, max_pixels)
            for v, view in enumerate(chosen):
                transforms.affine_crop(img, size, view, out=images[v, i])
                if model.standardize:
                    transforms.standardize(images[v, i])
        out.append(np.stack([model.logits(images[v]) for v in range(len(chosen))]))
    return np.concatenate(out, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench" / "min40"))
    parser.add_argument("--run", help="the MLflow run whose model to score (default: the newest with a model)")
    args = parser.parse_args()
    import mlflow

    from artnet import metrics
    from artnet.config import PipelineConfig
    from artnet.data import catalog, pipeline
    from artnet.model import bundle

    workdir = Path(args.workdir).resolve()
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs(client.search_experiments()[0].experiment_id if not args.run else
                              client.get_run(args.run).info.experiment_id, order_by=["start_time DESC"])
    run = next(r for r in runs if (not args.run or r.info.run_id == args.run) and "artnet.model_uri" in r.data.tags)
    model = bundle.load(run.data.tags["artnet.model_uri"], tracking)
    manifest, painters = catalog.load(str(workdir / "catalog"))
    started, result = time.perf_counter(), {"run": run.info.run_id, "model": run.data.tags["artnet.model_uri"],
                                            "painters": len(painters), "zoom": ZOOM, "shift": SHIFT}
    for split in ("val", "test"):
        rows = pipeline.split_rows(manifest, split)
        logits = view_logits(model, rows["uri"].to_pylist(), PipelineConfig().max_pixels)
        labels = rows["label"].to_numpy()
        result[split] = {"images": len(labels)}
        for name, n in PROTOCOLS.items():
            scores, _ = metrics.evaluate_logits(labels, logits[:n].mean(0), len(painters))
            result[split][name] = {k: round(scores[k], 4) for k in ("accuracy", "top3_accuracy", "balanced_accuracy",
                                                                     "macro_f1")}
        print(split, json.dumps(result[split]), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = RESULTS / f"tta_{workdir.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
