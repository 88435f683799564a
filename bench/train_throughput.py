"""Training throughput and evaluation time with 1 and 2 Ray Train workers on CPU.

Two layouts, each configuration in its own process (its own local Ray instance) over the same catalog:
MobileNetV2 with the offline weights, top blocks unfrozen (phase 2 only, the expensive phase), three epochs.
- `own`: each worker brings its own core, as on a cluster where a worker is a node or a GPU: the process is
  pinned (`taskset`) to as many cores as workers, with two logical CPUs per core (the worker's, and one for Ray
  Data's decode tasks). Training images/s should double from 1 to 2 workers, and evaluation time (each worker
  scores its own share of validation and test, the figures summed) should halve.
- `shared`: both configurations on all the machine's cores (logical CPUs = workers + 2): the compute is the
  same, so this shows what the multi-worker path itself costs (all-reduce, streaming shards, summing metrics).
Reported per run: the warm epochs' training images/s (median of epochs 2-3), the validation time per epoch
(median of epochs 2-3: the first traces the graphs), and the end's calibration + test time; ratios are 2
workers against 1 in the same run.

    python bench/train_throughput.py [--image-size 128] [--images 480] [--layouts own,shared]
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results" / "train_throughput.json"
EPOCHS = 3


def one_run(catalog_dir: str, workdir: str, workers: int, size: int, layout: str) -> dict:
    from artnet import presets
    from artnet.config import override
    from artnet.train import trainer

    job = override(presets.preset("mobilenet"), {
        "catalog": catalog_dir, "workdir": workdir, "name": f"throughput-{layout}-{workers}w-{int(time.time())}",
        "data.image_size": str(size), "model.weights": str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"),
        "train.head_epochs": "0", "train.finetune_epochs": str(EPOCHS), "train.patience": "0",
        "scaling.num_workers": str(workers), "train.batch_size": "16"})
    import mlflow
    import ray

    # Logical CPUs beyond the workers' own: Ray Data's decode tasks need theirs.
    ray.init(num_cpus=2 * workers if layout == "own" else workers + 2)
    result = trainer.fit(job)
    client = mlflow.MlflowClient(result["tracking_uri"])

    def warm(key: str) -> float:
        values = [m.value for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)]
        return round(float(np.median(values[1:])), 2)

    rate = warm("images_per_s")
    return {"workers": workers, "images_per_s": rate, "images_per_s_per_replica": round(rate / workers, 1),
            "val_seconds": warm("val_seconds"), "test_seconds": round(result["metrics"]["test_seconds"], 2),
            "val_images": int(result["metrics"]["val_images"]), "test_images": int(result["metrics"]["test_images"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=480, help="training images (from the 3 largest painters)")
    parser.add_argument("--layouts", default="own,shared")
    parser.add_argument("--worker", type=int)
    parser.add_argument("--layout", choices=("own", "shared"), default="own")
    parser.add_argument("--catalog")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench_throughput"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_run(args.catalog, args.workdir, args.worker, args.image_size, args.layout)))
        return
    from artnet.config import CatalogConfig
    from artnet.data import catalog

    cat = catalog.build(CatalogConfig(source=str(SHARED / "data" / "paintings"), top_k=3, split=(0.8, 0.1, 0.1)))
    train_rows = [i for i, s in enumerate(cat.manifest["split"].to_pylist()) if s == "train"][: args.images]
    keep = set(train_rows) | {i for i, s in enumerate(cat.manifest["split"].to_pylist()) if s != "train"}
    cat.manifest = cat.manifest.take(sorted(keep))
    catalog_dir = str(Path(args.workdir) / "catalog")
    catalog.write(cat, catalog_dir, CatalogConfig(source=str(SHARED / "data" / "paintings")))
    result = {"command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]), "image_size": args.image_size,
              "train_images": len(train_rows), "epochs": EPOCHS, "cpu_cores": os.cpu_count(), "layouts": {}}
    for layout in args.layouts.split(","):
        runs = []
        for workers in (1, 2):
            cores = ",".join(str(i) for i in range(workers if layout == "own" else os.cpu_count()))
            out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--worker", str(workers),
                                  "--layout", layout, "--catalog", catalog_dir, "--workdir", args.workdir,
                                  "--image-size", str(args.image_size)], capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(layout, runs[-1], flush=True)
        one, two = runs
        result["layouts"][layout] = {
            "runs": runs, "training_scaling_1_to_2_workers": round(two["images_per_s"] / one["images_per_s"], 2),
            "val_time_2_vs_1_workers": round(two["val_seconds"] / one["val_seconds"], 2),
            "test_time_2_vs_1_workers": round(two["test_seconds"] / one["test_seconds"], 2)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
