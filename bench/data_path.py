"""Per-epoch cost of the data path itself as the collection grows: 10k, 100k and 1M manifest rows.

What is measured is everything between the manifest and the decode stage: planning a pass, ordering its rows,
handing each decode task its rows. The decode stage is replaced by one that only counts the rows it gets (same
batch size and CPUs), so the figure is the data path's overhead per image, not decoding (the synthetic rows name
files that are never read). Two designs run side by side, each size in its own process and Ray instance (2 CPUs):

- `before`: the manifest cut into decode-sized blocks and `random_shuffle`d every epoch (what `pipeline` did
  until the shuffle redesign): an all-to-all whose task and object count grows with the square of the blocks.
- `after`: `pipeline.pass_rows`, the design in use: block numbers only, each task takes its rows of the pass's
  permutation.

Reported per size and design: build seconds (once per job), seconds of each epoch (the first includes starting
Ray's workers), us per row of the warm epochs' median, the driver's peak RSS and the object store's peak use
while epochs run. `before` at 1M rows is not run (hours an epoch): its figure is projected from its own 10k and
100k runs, and marked so. Target (issue 9): `after`'s per-row overhead at 1M within 1.5x of its value at 10k.

    python bench/data_path.py [--sizes 10000,100000,1000000] [--epochs 3]
Writes bench/results/data_path.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "data_path.json"
DECODE_BATCH = 128
CPUS = 2
PAINTERS = 1000
TARGET = 1.5  # after: us per row at the largest size / at the smallest


def manifest(n: int):
    import numpy as np
    import pyarrow as pa

    painter = np.arange(n) % PAINTERS
    keys = [f"painter_{p:04d}/painting_{i:07d}.jpg" for i, p in enumerate(painter)]
    return pa.table({"key": keys, "uri": [f"s3://wikiart/images/{k}" for k in keys],
                     "row": pa.array(np.full(n, -1), pa.int64()), "label": pa.array(painter, pa.int32())})


def count_rows(batch) -> dict:
    import numpy as np

    return {"label": np.asarray(batch["label"])}


class Peaks:
    """Samples the driver's RSS and the object store's use while epochs run (peak of each)."""

    def __init__(self):
        self.rss = self.store = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        from ray._private.internal_api import memory_summary

        rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        self.rss = max(self.rss, rss)
        found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
        if found:
            self.store = max(self.store, int(found.group(1)) * 2**20)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()


def one_size(n: int, design: str, epochs: int) -> dict:
    import ray

    from artnet.data import pipeline

    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    pipeline.configure_data_context()
    rows = manifest(n)
    start = time.perf_counter()
    if design == "after":
        ds = pipeline.pass_rows(rows, DECODE_BATCH, shuffle=True, seed=0)
    else:
        step = pipeline.decode_block_rows(n, DECODE_BATCH, CPUS)
        ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, n, step)]).random_shuffle(seed=0)
    ds = ds.map_batches(count_rows, batch_size=None, batch_format="pyarrow", num_cpus=1)  # one task a block, as decode
    build = time.perf_counter() - start
    peaks = Peaks()
    peaks.sample()
    peaks.thread.start()
    times = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            seen += len(batch["label"])
        times.append(time.perf_counter() - start)
        assert seen == n, f"an epoch gave {seen} of {n} rows"
    peaks.stop.set()
    peaks.thread.join()
    warm = sorted(times[1:] or times)
    median = warm[len(warm) // 2]
    return {"rows": n, "design": design, "build_s": round(build, 2), "epoch_s": [round(t, 2) for t in times],
            "us_per_row": round(median / n * 1e6, 2), "driver_peak_rss_mb": round(peaks.rss / 2**20),
            "object_store_peak_mb": round(peaks.store / 2**20)}


def measure(n: int, design: str, epochs: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", design, "--rows", str(n), "--epochs", str(epochs)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{design} at {n} rows failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--worker", choices=("before", "after"))
    parser.add_argument("--rows", type=int)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_size(args.rows, args.worker, args.epochs)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for design in ("after", "before"):
        for n in sizes:
            if design == "before" and n > 100_000:
                continue
            runs.append(measure(n, design, args.epochs))
            print(json.dumps(runs[-1]), flush=True)
    before = [r for r in runs if r["design"] == "before"]
    if len(before) >= 2 and sizes[-1] > before[-1]["rows"]:
        # Per-row cost ~ rows**k between the two measured sizes, carried on to the largest size.
        (a, b), big = before[-2:], sizes[-1]
        k = math.log(b["us_per_row"] / a["us_per_row"]) / math.log(b["rows"] / a["rows"])
        us = b["us_per_row"] * (big / b["rows"]) ** k
        runs.append({"rows": big, "design": "before", "projected": True, "us_per_row": round(us, 1),
                     "epoch_s": [round(us * big / 1e6)], "basis": f"per-row cost ~ rows^{k:.2f} from "
                     f"{a['rows']} and {b['rows']} rows"})
    after = [r for r in runs if r["design"] == "after"]
    ratio = after[-1]["us_per_row"] / after[0]["us_per_row"]
    results = {"command": "python bench/data_path.py " + " ".join(sys.argv[1:]), "cpus": CPUS,
               "decode_batch": DECODE_BATCH, "runs": runs,
               "after_us_per_row_largest_vs_smallest": round(ratio, 2), "target": TARGET, "met": ratio <= TARGET}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
