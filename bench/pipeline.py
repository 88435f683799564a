"""Decode + augment throughput: the artnet Ray Data pipeline vs a tf.data baseline, per CPU core.

Each measurement runs in its own process with its CPU budget fixed (Ray: `num_cpus`; tf.data: thread pools),
reads every image of the set once to warm up, then reports the median of three timed passes. Two sets: the 256-px shared
paintings and synthetic full-size (1500x1200) JPEGs made from them. Writes bench/results/pipeline.json.

    python bench/pipeline.py [--small 600] [--large 200] [--size 299]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAINTINGS = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared")) / "data" / "paintings"
RESULTS = REPO / "bench" / "results" / "pipeline.json"


def make_sets(workdir: Path, small: int, large: int) -> dict[str, list[str]]:
    from PIL import Image

    files = sorted(PAINTINGS.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    picked = [files[i] for i in rng.choice(len(files), size=min(small, len(files)), replace=False)]
    big_dir = workdir / "large"
    big_dir.mkdir(parents=True, exist_ok=True)
    big = []
    for i, src in enumerate(picked[:large]):
        # Upscaled painting plus canvas-like grain: file sizes (~0.5-1 MB) and entropy like WikiArt originals.
        img = Image.open(src).convert("RGB").resize((1500, 1200), Image.Resampling.BICUBIC)
        arr = np.asarray(img, np.float32) + rng.normal(0, 6, (1200, 1500, 3))
        path = big_dir / f"large_{i}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)
        big.append(str(path))
    return {"paintings_256px": [str(p) for p in picked], "synthetic_1500x1200": big}


def run_ray(paths: list[str], cpus: int, size: int) -> float:
    import pyarrow as pa
    import ray

    from artnet.config import PipelineConfig
    from artnet.data import pipeline

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = pa.table({"key": paths, "uri": paths, "row": [-1] * len(paths), "painter": ["x"] * len(paths),
                         "label": pa.array([0] * len(paths), pa.int32()), "split": ["train"] * len(paths)})
    ds = pipeline.build_dataset(manifest, "train", PipelineConfig(image_size=size), train=True)

    def one_pass() -> int:
        return sum(len(b["label"]) for b in ds.iter_batches(batch_size=32, batch_format="numpy"))

    return timed(one_pass)


def timed(one_pass, repeats: int = 3) -> float:
    """Median images/s over `repeats` passes after one warm-up pass (single passes varied up to 2x for tf.data)."""
    one_pass()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = one_pass()
        rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def run_tfdata(paths: list[str], cpus: int, size: int) -> float:
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(cpus)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    def load(path):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        img = tf.image.resize(img, (int(size * 1.15), int(size * 1.15)))
        img = tf.image.random_crop(img, (size, size, 3))
        img = tf.image.random_flip_left_right(img)
        img = tf.image.random_brightness(img, 0.15 * 255)
        img = tf.image.random_contrast(img, 0.85, 1.15)
        img = tf.image.random_saturation(img, 0.85, 1.15)
        return tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8)

    options = tf.data.Options()
    options.threading.private_threadpool_size = cpus
    ds = (tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths)).map(load, num_parallel_calls=cpus)
          .batch(32).prefetch(2).with_options(options))

    def one_pass() -> int:
        return sum(int(b.shape[0]) for b in ds)

    return timed(one_pass)


def measure(kind: str, paths_file: Path, cpus: int, size: int) -> float:
    # Pinned to `cpus` cores so every thread and process of the run (Ray's driver, raylet and workers; TF's
    # thread pools) shares exactly that budget: images/s per core is then a fair comparison.
    cores = ",".join(str(i) for i in range(cpus))
    out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--worker", kind, "--paths", str(paths_file), "--cpus", str(cpus),
                          "--size", str(size)], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{kind} on {cpus} CPU(s) failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=600)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--worker", choices=("ray", "tfdata"))
    parser.add_argument("--paths")
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        paths = json.loads(Path(args.paths).read_text())
        print(run_ray(paths, args.cpus, args.size) if args.worker == "ray" else run_tfdata(paths, args.cpus, args.size))
        return
    if not PAINTINGS.is_dir():
        sys.exit(f"needs the shared paintings at {PAINTINGS} (set ARTNET_SHARED)")
    results = {"image_size": args.size, "cpu_cores_on_machine": os.cpu_count(), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp), args.small, args.large)
        for name, paths in sets.items():
            paths_file = Path(tmp) / f"{name}.json"
            paths_file.write_text(json.dumps(paths))
            row = {"images": len(paths)}
            for kind in ("tfdata", "ray"):
                for cpus in (1, 2):
                    rate = measure(kind, paths_file, cpus, args.size)
                    row[f"{kind}_{cpus}cpu_images_per_s"] = round(rate, 1)
                    print(f"{name}: {kind} on {cpus} CPU(s): {rate:.1f} images/s", flush=True)
            row["ray_vs_tfdata_per_core_1cpu"] = round(row["ray_1cpu_images_per_s"] / row["tfdata_1cpu_images_per_s"], 2)
            row["ray_vs_tfdata_per_core_2cpu"] = round(row["ray_2cpu_images_per_s"] / row["tfdata_2cpu_images_per_s"], 2)
            row["ray_scaling_1_to_2cpu"] = round(row["ray_2cpu_images_per_s"] / row["ray_1cpu_images_per_s"], 2)
            row["tfdata_scaling_1_to_2cpu"] = round(row["tfdata_2cpu_images_per_s"] / row["tfdata_1cpu_images_per_s"], 2)
            results["sets"][name] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
