"""The feature cache at WikiArt scale: writing it, and loading a manifest's features from it on the driver.

    python bench/feature_cache.py                      # 10k and 100k rows (float32 and float16), 1M rows (float16)
    python bench/feature_cache.py --sizes 10000 --budget-gb 4

Synthetic features (random, 2048-d, 1,000 painters, splits 80/10/10, one row per painting: views 0) for a
synthetic manifest. For each size:
- write: at 10k and 100k the real writer (`embeddings.write_features`, files of at least MIN_ROWS_PER_FILE
  rows) against the one it replaced (`write_parquet` with no minimum: one file per block), both through Ray Data
  from blocks of 128 rows, as the decode stage makes them. Files, rows per file and seconds.
- load: the cache is written directly with pyarrow in the layout the real writer makes (10k-row files, rows in a
  random order), then `embeddings.load` (new) and the load it replaced (`old_load`, kept below as it was) each read
  it in a process of its own; seconds and peak resident memory above the process's baseline (ru_maxrss less the
  resident size just before the load), and whether both returned the same arrays. At 10k and 100k (float32) both
  loads also read the old writer's many small files: what a sweep paid before, and what it pays on a cache
  written before this change.
A load whose resident memory passes --budget-gb is stopped there and reported as such (a lower bound).

Writes bench/results/feature_cache.json and prints a markdown table. Not a test: minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DIM, PAINTERS, BLOCK_ROWS, FILE_ROWS = 2048, 1000, 128, 10_000


# ------------------------------------------------------------------------------------ the load it replaced

def old_cached(directory: str, columns: list[str], image_filter=None) -> pa.Table | None:
    from artnet.data import storage

    if not storage.exists(directory):
        return None
    fs = storage.resolve(directory)[0]
    files = [i.path for i in storage.list_files(directory) if i.path.endswith(".parquet")]
    if not files:
        return None
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns, filter=image_filter)


def old_load(manifest: pa.Table, directory: str, views: int, splits: tuple[str, ...] = ("train", "val", "test")):
    """`embeddings.load` before this change, as it was (a join, a sort, `take`, `combine_chunks`, `to_numpy`,
    `np.ascontiguousarray` to float32)."""
    from artnet.data import storage
    from artnet.errors import UserError
    from artnet.search.embeddings import FEATURES, requested
    from artnet.search.heads import Features

    need = requested(manifest.filter(pc.is_in(manifest["split"], pa.array(list(splits)))), views)
    need = need.select(["image", "view", "label", "split"])
    found = old_cached(storage.join(directory, FEATURES), ["image", "view", "features"],
                       pads.field("image").isin(pc.unique(need["image"])))
    if found is None:
        raise UserError(directory, "holds no features for this manifest (no image could be decoded)",
                        "check the images the catalog lists (see the bad-image counts)")
    index = found.select(["image", "view"]).append_column("index", pa.array(np.arange(found.num_rows)))
    table = need.join(index, keys=["image", "view"], join_type="inner")
    table = table.sort_by([("image", "ascending"), ("view", "ascending")])
    features = found["features"].take(table["index"])
    table = table.append_column("features", features)
    out = {}
    for split in splits:
        part = table.filter(pc.equal(table["split"], split))
        dim = part.schema.field("features").type.list_size
        x = part["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        out[split] = Features(np.ascontiguousarray(x, np.float32), part["label"].to_numpy().astype(np.int64))
    return out


# ---------------------------------------------------------------------------------------------- synthetic data

def manifest_of(rows: int) -> pa.Table:
    ids = np.arange(rows)
    label = (ids * 7919) % PAINTERS
    spot = (ids * 2654435761) % 10
    return pa.table({"uri": pc.binary_join_element_wise(pa.array(np.char.add("s3://wikiart/p", label.astype(str))),
                                                        pa.array(ids.astype(str)), "/"),
                     "row": pa.array(np.full(rows, -1, np.int64)), "label": pa.array(label, pa.int32()),
                     "split": pa.array(np.where(spot < 8, "train", np.where(spot < 9, "val", "test")))})


def features_of(ids: np.ndarray, dtype: str) -> np.ndarray:
    """Random features for a chunk of rows (seeded by its first id)."""
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    return rng.standard_normal((len(ids), DIM), np.float32).astype(dtype)


def rows_table(images: pa.Array, ids: np.ndarray, dtype: str) -> pa.Table:
    x = features_of(ids, dtype)
    return pa.table({"image": images, "view": pa.array(np.zeros(len(ids), np.int32)),
                     "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)})


def write_direct(manifest: pa.Table, directory: Path, dtype: str) -> dict:
    """The cache as the real writer lays it out (FILE_ROWS-row files, rows in no particular order), by pyarrow."""
    from artnet.search.embeddings import FEATURES, image_ids

    folder = directory / FEATURES
    folder.mkdir(parents=True, exist_ok=True)
    images = image_ids(manifest)
    order = np.random.default_rng(1).permutation(manifest.num_rows)
    start = time.time()
    for k in range(0, len(order), FILE_ROWS):
        ids = order[k:k + FILE_ROWS]
        pq.write_table(rows_table(images.take(pa.array(ids)), ids, dtype),
                       folder / f"part-{k // FILE_ROWS:05d}.parquet")
    return {"files": len(list(folder.glob("*.parquet"))), "s": time.time() - start}


def write_ray(manifest: pa.Table, directory: Path, dtype: str, old: bool) -> dict:
    """Through Ray Data from BLOCK_ROWS-row blocks: the real writer, or write_parquet as it was called before."""
    import ray

    from artnet.search import embeddings

    images = embeddings.image_ids(manifest)

    def make(batch: dict) -> pa.Table:
        ids = batch["id"]
        return rows_table(images.take(pa.array(ids)), ids, dtype)

    ds = ray.data.range(manifest.num_rows, override_num_blocks=max(1, manifest.num_rows // BLOCK_ROWS))
    ds = ds.map_batches(make, batch_size=None, batch_format="numpy")
    folder = directory / embeddings.FEATURES
    start = time.time()
    if old:
        ds.write_parquet(str(folder))
    else:
        embeddings.write_features(ds, str(folder))
    seconds = time.time() - start
    rows = sorted(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))
    return {"files": len(rows), "s": seconds, "rows": sum(rows), "rows_per_file_min": rows[0],
            "rows_per_file_median": rows[len(rows) // 2], "rows_per_file_max": rows[-1]}


# ------------------------------------------------------------------------------------------ measured steps

def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def digest(data: dict) -> str:
    """Of the float32 values and labels of every split: the same arrays give the same digest in either dtype."""
    h = hashlib.blake2b(digest_size=12)
    for split in sorted(data):
        x = data[split].x
        for i in range(0, len(x), 65536):
            h.update(np.ascontiguousarray(x[i:i + 65536], np.float32).tobytes())
        h.update(data[split].y.tobytes())
    return h.hexdigest()


def step_load(args) -> dict:
    from artnet.search import embeddings

    manifest = pq.read_table(args.manifest)
    load = old_load if args.impl == "old" else embeddings.load
    base = resident()
    start = time.time()
    data = load(manifest, args.cache, 0)
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"s": seconds, "peak_bytes": peak - base, "peak_rss_bytes": peak, "base_rss_bytes": base,
            "rows": sum(len(f.y) for f in data.values()), "out_bytes": sum(f.x.nbytes for f in data.values()),
            "dtype": str(data["train"].x.dtype), "digest": digest(data)}


def step_build(args) -> dict:
    rows, dtype, directory = args.rows, args.dtype, Path(args.dir)
    manifest = manifest_of(rows)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(manifest, directory / "manifest.parquet")
    out = {"direct": write_direct(manifest, directory / "direct", dtype)}
    if args.ray:
        import ray

        ray.init(num_cpus=2, object_store_memory=2 << 30, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        write_ray(manifest.slice(0, 1024), directory / "warm_up", dtype, old=True)  # Ray Data's first-use costs
        shutil.rmtree(directory / "warm_up")
        out["ray_old"] = write_ray(manifest, directory / "ray_old", dtype, old=True)
        out["ray_new"] = write_ray(manifest, directory / "ray_new", dtype, old=False)
        ray.shutdown()
    return out


def child(argv: list[str], budget: int | None = None) -> dict:
    """Run one step in a process of its own; stop it once its resident memory passes `budget` bytes."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    watched, peak, start = psutil.Process(proc.pid), 0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if budget and peak > budget:
            proc.kill()
            proc.wait()
            return {"stopped_over_budget": True, "s_until_stopped": time.time() - start, "peak_rss_bytes": peak}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{argv} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run(rows: int, dtype: str, workdir: Path, budget: int, with_ray: bool) -> dict:
    directory = workdir / f"{rows}-{dtype}"
    shutil.rmtree(directory, ignore_errors=True)
    built = child(["_build", "--rows", str(rows), "--dtype", dtype, "--dir", str(directory)]
                  + (["--ray"] if with_ray else []))
    manifest = str(directory / "manifest.parquet")
    record = {"rows": rows, "dtype": dtype, "dim": DIM, "painters": PAINTERS, "write": built, "load": {}}
    for impl in ("new", "old"):
        record["load"][impl] = child(["_load", "--impl", impl, "--cache", str(directory / "direct"),
                                      "--manifest", manifest], budget)
    if with_ray:  # the old writer's small files (caches written before): what a sweep paid, what it pays now
        for impl in ("old", "new"):
            record["load"][f"{impl}_small_files"] = child(["_load", "--impl", impl, "--cache",
                                                           str(directory / "ray_old"), "--manifest", manifest], budget)
    new, old = record["load"]["new"], record["load"]["old"]
    if "s" in old:
        record["same_arrays"] = new["digest"] == old["digest"]
        record["ratio_new_old"] = {"load_s": new["s"] / old["s"], "peak_bytes": new["peak_bytes"] / old["peak_bytes"]}
    shutil.rmtree(directory, ignore_errors=True)
    return record


def mb(n) -> str:
    return f"{n / 2**20:,.0f}"


def table(records: list[dict]) -> str:
    head = ["rows", "dtype", "files: old writer / new", "write s old / new", "features MB", "load s old / new",
            "load s new/old", "peak MB old / new", "peak new/old", "same arrays",
            "old writer's files, load s old / new", "peak MB old / new"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        w, new, old = r["write"], r["load"]["new"], r["load"]["old"]
        files = f"{w['ray_old']['files']:,} / {w['ray_new']['files']:,}" if "ray_new" in w else \
            f"- / {w['direct']['files']:,} (pyarrow)"
        write_s = f"{w['ray_old']['s']:.1f} / {w['ray_new']['s']:.1f}" if "ray_new" in w else "-"
        if "s" in old:
            load_s, ratio_s = f"{old['s']:.2f} / {new['s']:.2f}", f"{r['ratio_new_old']['load_s']:.2f}"
            peak = f"{mb(old['peak_bytes'])} / {mb(new['peak_bytes'])}"
            ratio_p = f"{r['ratio_new_old']['peak_bytes']:.2f}"
            same = "yes" if r["same_arrays"] else "NO"
        else:
            load_s = f"> {old['s_until_stopped']:.0f} (stopped) / {new['s']:.2f}"
            ratio_s, same = "-", "-"
            peak = f"> {mb(old['peak_rss_bytes'])} rss (stopped) / {mb(new['peak_bytes'])}"
            ratio_p = f"< {new['peak_bytes'] / old['peak_rss_bytes']:.2f}"
        small_old, small_new = r["load"].get("old_small_files"), r["load"].get("new_small_files")
        small_s = small_peak = "-"
        if small_old and "s" in small_old and "s" in small_new:
            small_s = f"{small_old['s']:.2f} / {small_new['s']:.2f}"
            small_peak = f"{mb(small_old['peak_bytes'])} / {mb(small_new['peak_bytes'])}"
        lines.append("| " + " | ".join([f"{r['rows']:,}", r["dtype"], files, write_s, mb(new["out_bytes"]), load_s,
                                        ratio_s, peak, ratio_p, same, small_s, small_peak]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        parser = argparse.ArgumentParser()
        parser.add_argument("step")
        parser.add_argument("--impl"), parser.add_argument("--cache"), parser.add_argument("--manifest")
        parser.add_argument("--rows", type=int), parser.add_argument("--dtype"), parser.add_argument("--dir")
        parser.add_argument("--ray", action="store_true")
        args = parser.parse_args()
        print(json.dumps(step_load(args) if args.step == "_load" else step_build(args)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000:float32,10000:float16,100000:float32,100000:float16,1000000:float16",
                        help="rows:dtype,... (Ray Data writes are measured for float32 sizes up to 100k)")
    parser.add_argument("--budget-gb", type=float, default=9.0, help="stop a load whose resident memory passes this")
    parser.add_argument("--workdir", default="/tmp/artnet-bench-feature-cache")
    parser.add_argument("--out", default=str(RESULTS / "feature_cache.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    records = []
    for entry in args.sizes.split(","):
        rows, dtype = entry.split(":")
        started = time.time()
        records.append(run(int(rows), dtype, workdir, int(args.budget_gb * 2**30),
                           with_ray=dtype == "float32" and int(rows) <= 100_000))
        print(f"{entry}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    text = table(records)
    print(text)
    import platform

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "budget_gb": args.budget_gb, "records": records, "table": text}, indent=2))


if __name__ == "__main__":
    main()
