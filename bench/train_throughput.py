"""Training throughput (images/s per replica) and scaling from 1 to 2 Ray Train workers on CPU.

Each configuration runs in its own process (its own local Ray instance) over the same catalog: MobileNetV2
with the offline weights, top blocks unfrozen (phase 2 only, the expensive phase), two epochs; the second,
warm epoch is the one reported. The 1-worker run is the baseline of the ratio.

    python bench/train_throughput.py [--image-size 128] [--images 480]
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results" / "train_throughput.json"


def one_run(catalog_dir: str, workdir: str, workers: int, size: int) -> dict:
    from artnet import presets
    from artnet.config import override
    from artnet.train import trainer

    job = override(presets.preset("mobilenet"), {
        "catalog": catalog_dir, "workdir": workdir, "name": f"throughput-{workers}w-{int(time.time())}", "data.image_size": str(size),
        "model.weights": str(SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"),
        "train.head_epochs": "0", "train.finetune_epochs": "2", "train.patience": "0",
        "scaling.num_workers": str(workers), "train.batch_size": "16"})
    import mlflow
    import ray

    # Logical CPUs beyond the cores: each training worker holds one, and Ray Data's decode tasks need their own.
    ray.init(num_cpus=workers + 2)
    result = trainer.fit(job)
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "images_per_s")
    warm = sorted(history, key=lambda m: m.step)[-1].value
    return {"workers": workers, "images_per_s": round(warm, 1), "images_per_s_per_replica": round(warm / workers, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=480, help="training images (from the 3 largest painters)")
    parser.add_argument("--worker", type=int)
    parser.add_argument("--catalog")
    parser.add_argument("--workdir", default=str(REPO / "work" / "bench_throughput"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_run(args.catalog, args.workdir, args.worker, args.image_size)))
        return
    from artnet.config import CatalogConfig
    from artnet.data import catalog

    cat = catalog.build(CatalogConfig(source=str(SHARED / "data" / "paintings"), top_k=3, split=(0.8, 0.1, 0.1)))
    train_rows = [i for i, s in enumerate(cat.manifest["split"].to_pylist()) if s == "train"][: args.images]
    keep = set(train_rows) | {i for i, s in enumerate(cat.manifest["split"].to_pylist()) if s != "train"}
    cat.manifest = cat.manifest.take(sorted(keep))
    catalog_dir = str(Path(args.workdir) / "catalog")
    catalog.write(cat, catalog_dir, CatalogConfig(source=str(SHARED / "data" / "paintings")))
    runs = []
    for workers in (1, 2):
        out = subprocess.run([sys.executable, __file__, "--worker", str(workers), "--catalog", catalog_dir,
                              "--workdir", args.workdir, "--image-size", str(args.image_size)],
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    result = {"image_size": args.image_size, "train_images": len(train_rows), "cpu_cores": os.cpu_count(),
              "runs": runs, "scaling_1_to_2_workers": round(runs[1]["images_per_s"] / runs[0]["images_per_s"], 2)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
