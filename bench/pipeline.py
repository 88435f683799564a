"""Decode + augment throughput: the artnet Ray Data pipeline vs a tf.data baseline, per CPU core.

Both pipelines get their CPUs the same way: each measurement is its own process pinned (`taskset`) to the first
N cores, so every thread and process it starts (Ray's driver, raylet and decode workers; TensorFlow's pools)
shares exactly that budget; Ray is told `num_cpus=N`, tf.data gets N inter-op and map threads, one intra-op
thread and no autotuner, OpenCV one thread per call. Each reads the set once to warm up, then times `--passes`
passes (min, median, max reported; ratios from medians). A 1 -> 2 CPU speed-up above 2.2x cannot be real, so such a run is
marked unreliable instead of reported. Sets: 256-px shared paintings, and full-size (1500x1200) JPEGs made from
shared paintings (upscaled, with canvas-like grain: file sizes and entropy like WikiArt originals). From the
per-core rate it derives how many cores one GPU needs (bench/results/pipeline.json, README table).

    python bench/pipeline.py [--small 2000] [--large 800] [--size 299] [--passes 5]
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
MAX_SCALING = 2.2  # 1 -> 2 CPUs: anything above this means one of the two runs was disturbed
TARGETS = {"synthetic_1500x1200": 1.5, "paintings_256px": 1.0}  # Ray vs tf.data per core (issue 11)

# Training images/s one GPU consumes, and where the figure comes from. NVIDIA's DeepLearningExamples report
# ResNet-50 v1.5 training (TensorFlow, mixed precision + XLA, batch 256, one GPU) at 2,375 img/s on an A100 and
# 1,270 on a V100; InceptionV3 at 299 px costs 5.7 GFLOPs an image against ResNet-50's 4.1, so it is scaled by
# 4.1/5.7. MobileNetV2 at 224 px (0.3 GFLOPs) is memory-bound, not FLOP-bound: assumed 3x ResNet-50. Phase 1
# (frozen backbone) runs no backward pass through the backbone: about 2x the fine-tuning rate.
GPU_RATES = {
    ("inception_v3", 299, "A100"): 2375 * 4.1 / 5.7,
    ("inception_v3", 299, "V100"): 1270 * 4.1 / 5.7,
    ("mobilenet_v2", 224, "A100"): 2375 * 3,
    ("mobilenet_v2", 224, "V100"): 1270 * 3,
}
FROZEN_SPEEDUP = 2.0


def make_sets(workdir: Path, small: int, large: int) -> dict[str, list[str]]:
    from PIL import Image

    files = sorted(PAINTINGS.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    picked = [files[i] for i in rng.choice(len(files), size=min(small, len(files)), replace=False)]
    big_dir = workdir / "large"
    big_dir.mkdir(parents=True, exist_ok=True)
    big = []
    for i, src in enumerate(picked[:large]):
        img = Image.open(src).convert("RGB").resize((1500, 1200), Image.Resampling.BICUBIC)
        arr = np.asarray(img, np.float32) + rng.normal(0, 6, (1200, 1500, 3))
        path = big_dir / f"large_{i}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)
        big.append(str(path))
    return {"paintings_256px": [str(p) for p in picked], "synthetic_1500x1200": big}


def timed(one_pass, passes: int) -> list[float]:
    """images/s of each of `passes` passes after one warm-up pass."""
    one_pass()
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        n = one_pass()
        rates.append(n / (time.perf_counter() - start))
    return rates


def run_ray(paths: list[str], cpus: int, size: int, passes: int, shuffle: bool = True) -> list[float]:
    import pyarrow as pa
    import ray

    from artnet.config import PipelineConfig
    from artnet.data import pipeline

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = pa.table({"key": paths, "uri": paths, "row": [-1] * len(paths), "painter": ["x"] * len(paths),
                         "label": pa.array([0] * len(paths), pa.int32()), "split": ["train"] * len(paths)})
    ds = pipeline.build_dataset(manifest, "train", PipelineConfig(image_size=size, shuffle=shuffle), train=True)

    def one_pass() -> int:
        return sum(len(b["label"]) for b in ds.iter_batches(batch_size=32, batch_format="numpy"))

    return timed(one_pass, passes)


def run_tfdata(paths: list[str], cpus: int, size: int, passes: int) -> list[float]:
    """What a user writes instead: full decode, resize, random crop, flip and colour jitter in tf.data."""
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
    # Fixed parallelism, as for Ray. With the autotuner on, passes on one pinned core came out at either 471 or
    # ~880 images/s (the same pass time to 0.1%, switching between passes): it idles the pipeline at times.
    options.autotune.enabled = False
    ds = (tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths)).map(load, num_parallel_calls=cpus)
          .batch(32).prefetch(2).with_options(options))

    def one_pass() -> int:
        return sum(int(b.shape[0]) for b in ds)

    return timed(one_pass, passes)


def run_decode(paths: list[str], cpus: int, size: int, passes: int) -> list[float]:
    """The floor: artnet's decode alone (PIL, JPEG draft mode), bytes already in memory, in this process."""
    from artnet.data import transforms

    blobs = [Path(p).read_bytes() for p in paths]

    def one_pass() -> int:
        for data in blobs:
            transforms.decode(data, size, 64_000_000)
        return len(blobs)

    return timed(one_pass, passes)


RUNNERS = {"ray": run_ray, "tfdata": run_tfdata, "decode": run_decode,
           "ray_unshuffled": lambda *args: run_ray(*args, shuffle=False)}


def measure(kind: str, paths_file: Path, cpus: int, size: int, passes: int) -> dict:
    cores = ",".join(str(i) for i in range(cpus))
    out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--worker", kind, "--paths",
                          str(paths_file), "--cpus", str(cpus), "--size", str(size), "--passes", str(passes)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{kind} on {cpus} CPU(s) failed:\n{out.stderr[-3000:]}")
    rates = json.loads(out.stdout.strip().splitlines()[-1])
    return {"min": round(min(rates), 1), "median": round(float(np.median(rates)), 1), "max": round(max(rates), 1)}


def compare(row: dict, target: float) -> dict:
    """Per-core ratios and scaling from the medians; a run with an impossible speed-up is not reported."""
    med = {key: row[key]["median"] for key in row if key.endswith("cpu")}
    scaling = {kind: med[f"{kind}_2cpu"] / med[f"{kind}_1cpu"] for kind in ("tfdata", "ray")}
    out = {f"{kind}_scaling_1_to_2cpu": round(s, 2) for kind, s in scaling.items()}
    disturbed = [kind for kind, s in scaling.items() if s > MAX_SCALING]
    if disturbed:
        out["unreliable"] = f"{', '.join(disturbed)} sped up more than {MAX_SCALING}x from 1 to 2 CPUs: re-run"
        return out
    for cpus in (1, 2):
        ratio = med[f"ray_{cpus}cpu"] / med[f"tfdata_{cpus}cpu"]
        out[f"ray_vs_tfdata_per_core_{cpus}cpu"] = round(ratio, 2)
    out["target_per_core"] = target
    out["met"] = all(out[f"ray_vs_tfdata_per_core_{c}cpu"] >= target for c in (1, 2)) and scaling["ray"] >= 1.8
    return out


def cores_per_gpu(per_core: float) -> list[dict]:
    """CPU cores one GPU needs so it never waits for input, in each training phase."""
    rows = []
    for (backbone, size, gpu), rate in GPU_RATES.items():
        rows.append({"backbone": backbone, "image_size": size, "gpu": gpu, "gpu_images_per_s": round(rate),
                     "cores_finetune": round(rate / per_core, 1),
                     "cores_frozen_backbone": round(rate * FROZEN_SPEEDUP / per_core, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=800)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--worker", choices=tuple(RUNNERS))
    parser.add_argument("--paths")
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        paths = json.loads(Path(args.paths).read_text())
        print(json.dumps(RUNNERS[args.worker](paths, args.cpus, args.size, args.passes)))
        return
    if not PAINTINGS.is_dir():
        sys.exit(f"needs the shared paintings at {PAINTINGS} (set ARTNET_SHARED)")
    results = {"command": "python bench/pipeline.py " + " ".join(sys.argv[1:]), "image_size": args.size,
               "passes": args.passes, "cpu_cores_on_machine": os.cpu_count(), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp), args.small, args.large)
        for name, paths in sets.items():
            paths_file = Path(tmp) / f"{name}.json"
            paths_file.write_text(json.dumps(paths))
            row: dict = {"images": len(paths)}
            for kind in ("tfdata", "ray"):
                for cpus in (1, 2):
                    row[f"{kind}_{cpus}cpu"] = rates = measure(kind, paths_file, cpus, args.size, args.passes)
                    print(f"{name}: {kind} on {cpus} CPU(s): {rates} images/s", flush=True)
            # The per-pass order's share: the same pipeline in manifest order (a permutation of row numbers:
            # free since the shuffle stage went; kept as the check that it stays so).
            row["ray_unshuffled_2cpu"] = measure("ray_unshuffled", paths_file, 2, args.size, args.passes)
            print(f"{name}: ray without the manifest shuffle on 2 CPUs: {row['ray_unshuffled_2cpu']}", flush=True)
            floor = measure("decode", paths_file, 1, args.size, args.passes)["median"]
            row["decode_only_1cpu_median"] = floor
            print(f"{name}: decode alone on 1 CPU: {floor} images/s", flush=True)
            row.update(compare(row, TARGETS[name]))
            # No pipeline built on this decoder can beat its decode alone: the ceiling for the per-core ratio.
            row["ceiling_vs_tfdata_per_core_1cpu"] = round(floor / row["tfdata_1cpu"]["median"], 2)
            results["sets"][name] = row
    full = results["sets"]["synthetic_1500x1200"]
    per_core = min(full["ray_1cpu"]["median"], full["ray_2cpu"]["median"] / 2)
    results["cores_per_gpu"] = {"per_core_images_per_s": per_core, "basis": "full-size paintings, Ray pipeline, "
                                "the lower of the 1- and 2-CPU medians per core", "rows": cores_per_gpu(per_core)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
