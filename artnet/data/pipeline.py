"""Ray Data pipeline: manifest rows -> bytes from storage -> decoded, augmented uint8 images, streamed to
training consumers.

Each pass (epoch) takes the split's rows in a fresh order without a shuffle stage: the rows live in the object
store once, the dataset's blocks are only block numbers, and each decode task takes its rows of this pass's
permutation (`pass_order`, drawn from the seed and the pass) before reading their bytes. Ray's `random_shuffle`
is an all-to-all whose cost grows with the square of the block count: over manifest rows alone it took 142 us
a row per epoch at 10k rows and 778 us at 100k (1M: over an hour); this design takes 61, 36 and 39 us at 10k,
100k and 1M, Ray's per-task cost (`bench/data_path.py`). Nothing heavy moves and nothing is materialised.
Images that cannot be read or decoded are dropped in the decode tasks and counted in a named `BadImageTally`
actor that the driver reads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from artnet.config import ConfigError, PipelineConfig
from artnet.errors import UserError
from artnet.data import storage, transforms

log = logging.getLogger(__name__)

IO_THREADS = 16  # concurrent object reads per decode task


@ray.remote(num_cpus=0)
class BadImageTally:
    """Counts skipped images by reason and cause, each image once however many epochs meet it, keeps the first
    few URIs, and enforces the bad-data budget: a run stops (rather than "succeed" on what is left) once more
    than `max_bad_share` of its `total` images are unusable, or when its first `fail_fast_reads` reads all failed."""

    def __init__(self, total: int = 0, max_bad_share: float = 1.0, fail_fast_reads: int = 0):
        self.reasons: dict[str, tuple[str, str]] = {}
        self.total, self.max_bad_share, self.fail_fast_reads = total, max_bad_share, fail_fast_reads
        self.used = 0  # images decoded (not unique: only "any success yet" matters)
        self.retries = 0  # reads tried again after a transient storage fault (and then read)
        self.stopped: tuple[str, str] | None = None  # (why, the fix) once the budget is spent

    def ok(self, count: int, retries: int = 0) -> None:
        self.used += count
        self.retries += retries

    def add(self, reason: str, uri: str, cause: str = "unreadable") -> tuple[str, str] | None:
        """Record a skipped image; returns (why the run must stop, the fix) once it must."""
        self.reasons.setdefault(uri, (reason, cause))
        bad = len(self.reasons)
        if self.stopped is None and self.fail_fast_reads and not self.used and bad >= self.fail_fast_reads:
            self.stopped = self._verdict(f"the first {bad} images all failed")
        if self.stopped is None and self.total and bad > self.max_bad_share * self.total:
            self.stopped = self._verdict(f"{bad} of {self.total} images are unusable, over the budget of "
                                         f"{self.max_bad_share:.0%}")
        return self.stopped

    def verdict(self) -> tuple[str, str] | None:
        """Why the run was stopped, if the budget stopped it: what the driver reports, whatever wrapped the
        error on its way out of the training workers."""
        return self.stopped

    def _verdict(self, what: str) -> tuple[str, str]:
        causes = Counter(cause for _, cause in self.reasons.values())
        cause = causes.most_common(1)[0][0]
        examples = [uri for uri, (_, c) in self.reasons.items() if c == cause][:3]
        return f"{what}; mostly {cause} ({causes[cause]}), e.g. {', '.join(examples)}", storage.FAULT_FIXES[cause]

    def summary(self) -> dict:
        """Counts, and every skipped file with its reason (the run's `bad_images.json`: within the budget, at most
        a few percent of the collection)."""
        return {"total": len(self.reasons), "by_reason": dict(Counter(r for r, _ in self.reasons.values())),
                "by_cause": dict(Counter(c for _, c in self.reasons.values())),
                "files": {uri: reason for uri, (reason, _) in self.reasons.items()}, "storage_retries": self.retries}


def new_tally(total: int = 0, cfg: PipelineConfig | None = None):
    """A tally actor for one run of `total` images (0: no budget); pass it to `build_dataset` and read
    `.summary.remote()` afterwards."""
    cfg = cfg or PipelineConfig()
    return BadImageTally.remote(total, cfg.max_bad_share, cfg.fail_fast_reads if total else 0)


class _ParquetRows:
    """Random access to image bytes stored inside Parquet files (one row group cached per worker at a time
    per file, which suits batches of rows that were catalogued file by file)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.groups: OrderedDict[tuple[str, int], list] = OrderedDict()

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _layout(uri: str, settings: storage.S3Settings) -> tuple[pq.ParquetFile, np.ndarray]:
        fs, path = storage.resolve(uri, settings)
        pf = pq.ParquetFile(path, filesystem=fs)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        return pf, starts

    def get(self, uri: str, row: int, settings: storage.S3Settings) -> bytes:
        pf, starts = self._layout(uri, settings)
        group = int(np.searchsorted(starts, row, side="right") - 1)
        cache_key = (uri, group)
        if cache_key not in self.groups:
            column = pf.read_row_group(group, columns=["image"]).column("image").to_pylist()
            self.groups[cache_key] = column
            if len(self.groups) > self.capacity:
                self.groups.popitem(last=False)
        value = self.groups[cache_key][row - int(starts[group])]
        return value["bytes"] if isinstance(value, dict) else value


_parquet_rows = _ParquetRows()


def _rng_for(key: str, seed: int | None, pass_index: int) -> np.random.Generator:
    """An image's augmentation randomness: with a seed, a function of (seed, image, pass), so a run repeats
    and every epoch still sees each painting differently."""
    if seed is None:
        return np.random.default_rng()
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "big"), pass_index])


def pass_index() -> int:
    """Which pass over its dataset the running Ray Data task serves (0 for the first). Ray Data counts a
    dataset's finished executions in the `DataContext` every task receives (the counter behind its own
    `reseed_after_execution` seeds); under Ray Train each epoch is one execution."""
    return int(getattr(ray.data.DataContext.get_current(), "_execution_idx", 0))


def pass_order(n: int, seed: int, pass_index: int, groups: np.ndarray | None = None) -> np.ndarray:
    """The row order of one pass, drawn from (seed, pass): a permutation of n rows, or with `groups` (each row's
    Parquet row group) the groups in random order and each group's rows in random order. Decode tasks take
    consecutive runs of this order, so a row group is read by at most 1 + its rows / rows per task tasks instead
    of by nearly one task per row (a row group is the smallest unit Parquet can read)."""
    rng = np.random.default_rng([seed, pass_index])
    if groups is None:
        return rng.permutation(n)
    rank = rng.permutation(int(groups.max()) + 1)[groups]
    return np.lexsort((rng.random(n), rank))


def row_groups(rows: pa.Table, settings: storage.S3Settings) -> np.ndarray | None:
    """Each row's Parquet row group as a dense id (an image in its own file is a group of one), or None when
    every image is its own file. Reads each Parquet file's footer once."""
    positions = rows["row"].to_numpy()
    inside = positions >= 0
    if not inside.any():
        return None
    ids, uris, offset = np.empty(rows.num_rows, np.int64), rows["uri"].to_numpy(zero_copy_only=False), 0
    for uri in np.unique(uris[inside]):
        chosen = inside & (uris == uri)
        _, starts = _ParquetRows._layout(uri, settings)
        ids[chosen] = offset + np.searchsorted(starts, positions[chosen], side="right") - 1
        offset += len(starts) - 1
    ids[~inside] = offset + np.arange(int((~inside).sum()))
    return ids


_orders: dict[tuple, np.ndarray] = {}


def _pass_order_of(ref, table: pa.Table, seed: int) -> np.ndarray:
    """This pass's order, drawn once per decode worker process (1M rows: ~20 ms) and kept for the pass's
    other tasks."""
    key = (ref.hex(), seed, pass_index())
    if key not in _orders:
        _orders.clear()
        groups = table["group"].to_numpy() if "group" in table.column_names else None
        _orders[key] = pass_order(table.num_rows, seed, key[2], groups)
    return _orders[key]


_rows_cache: dict[str, pa.Table] = {}


def _shared_rows(ref) -> pa.Table:
    """The split's rows, fetched once per worker process (zero-copy from the node's object store)."""
    if ref.hex() not in _rows_cache:
        _rows_cache.clear()
        _rows_cache[ref.hex()] = ray.get(ref)
    return _rows_cache[ref.hex()]


def take_rows(batch: dict[str, np.ndarray], *, rows, step: int, seed: int | None) -> pa.Table:
    """Block numbers -> their manifest rows for this pass: block b is rows [b*step, (b+1)*step) of the pass's
    order (`seed` None: manifest order)."""
    table = _shared_rows(rows)
    spans = [np.arange(b * step, min((b + 1) * step, table.num_rows)) for b in batch["block"]]
    positions = np.concatenate(spans) if spans else np.empty(0, np.int64)
    if seed is not None:
        positions = _pass_order_of(rows, table, seed)[positions]
    return table.take(positions)


_io_pool: ThreadPoolExecutor | None = None


def fetch(uris: list[str], rows: list[int], settings: storage.S3Settings,
          retried: list | None = None) -> list[bytes | Exception]:
    """The bytes of every image of a batch, or the error that stopped each. Object-store reads run concurrently
    (an S3 GET is tens of milliseconds of waiting); images inside Parquet go through the row-group cache.
    Transient storage faults are retried (see `storage.read_bytes`), each retry appended to `retried`."""
    global _io_pool
    if _io_pool is None:
        _io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="artnet-read")

    def read(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri, settings, retried)
        except Exception as e:  # missing object, permissions, network: the run goes on without this image
            return e

    files = dict(zip((i for i, r in enumerate(rows) if r < 0),
                     _io_pool.map(read, [u for u, r in zip(uris, rows) if r < 0])))
    out: list[bytes | Exception] = []
    for i, (uri, row) in enumerate(zip(uris, rows)):
        if row < 0:
            out.append(files[i])
            continue
        try:
            out.append(_parquet_rows.get(uri, row, settings))
        except Exception as e:
            out.append(e)
    return out


def load_images(batch: pa.Table, *, cfg: PipelineConfig, train: bool, settings: storage.S3Settings,
                bad_images=None) -> dict[str, np.ndarray]:
    """One Ray Data batch of manifest rows -> {"image", "label", "key"}; unusable images are dropped and counted."""
    uris, rows = batch["uri"].to_pylist(), batch["row"].to_pylist()
    size = cfg.image_size
    images = np.empty((len(uris), size, size, 3), np.uint8)  # each image decodes straight into its slot
    labels, keys, retried = [], [], []
    epoch = pass_index()
    for key, uri, row, label, data in zip(batch["key"].to_pylist(), uris, rows, batch["label"].to_pylist(),
                                          fetch(uris, rows, settings, retried)):
        if isinstance(data, Exception):
            reason, detail = "unreadable", f"{type(data).__name__}: {data}"
        else:
            try:
                rng = _rng_for(key, cfg.seed, epoch) if train else None
                transforms.preprocess(data, size, cfg.max_pixels, cfg.augment, rng, out=images[len(labels)])
                labels.append(label)
                keys.append(key)
                continue
            except transforms.BadImage as e:
                reason, detail = e.reason, str(e)
        where = uri if row < 0 else f"{uri}#{row}"
        log.warning("skipping %s (%s)", where, detail)
        if bad_images is not None:
            # Waited on, so the count is complete once the batch is out (bad images are rare: cheap).
            stop = ray.get(bad_images.add.remote(reason, where, storage.fault_class(reason, detail)))
            if stop:
                raise UserError("the data", *stop)
    if bad_images is not None and (labels or retried):
        bad_images.ok.remote(len(labels), len(retried))
    return {
        "image": images[:len(labels)],
        "label": np.asarray(labels, dtype=np.int32),
        "key": np.asarray(keys, dtype=object),
    }


def configure_data_context() -> None:
    """Ray Data settings artnet's datasets run with (read when a dataset executes, from the context captured
    when it is built).

    Ray Data reserves half of the cluster's CPUs per operator by default; with one heavy operator (decode)
    that idles half of them (measured: 2 CPUs ran one decode task at a time). And it wraps an exception raised
    in a map function in a `UserCodeException` that loses the original on its way to the driver; raising the
    original keeps a user error (a `UserError` with its fix) intact.

    Ray Data's downstream-capacity backpressure stops the executor reading the output of decode tasks that
    have finished while the trainer has blocks queued; `ray.wait` then returns at once on those finished tasks
    and the scheduling loop spins (measured: ~3,000 loops a second, 0.6-0.9 of a core in `streaming_split`'s
    coordinator for the first 3-6 s of every epoch, beside the trainer). Off, the object-store budget still
    bounds what is buffered (its backpressure holds new tasks back instead of spinning on finished ones).
    """
    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False
    ctx.raise_original_map_exception = True
    ctx.downstream_capacity_backpressure_ratio = None


def build_dataset(manifest: pa.Table, split: str, cfg: PipelineConfig, *, train: bool,
                  bad_images=None, settings: storage.S3Settings | None = None) -> ray.data.Dataset:
    """A lazy, streaming dataset of one split. With `train`, rows are reshuffled on every pass (epoch) and
    augmented; otherwise images are centre-cropped in manifest order."""
    return decode_rows(split_rows(manifest, split), cfg, augment=train, shuffle=train and cfg.shuffle,
                       bad_images=bad_images, settings=settings)


def split_rows(manifest: pa.Table, split: str) -> pa.Table:
    rows = manifest.filter(pc.equal(manifest["split"], split))
    if rows.num_rows == 0:
        raise ValueError(f"the manifest has no '{split}' images")
    return rows


def eval_shards(manifest: pa.Table, split: str, cfg: PipelineConfig, n: int, *, bad_images=None) -> list:
    """One evaluation split dealt into `n` disjoint datasets (rows r, r+n, ...), one per training worker: the
    workers evaluate it together and sum their tallies, so every row counts exactly once."""
    rows = split_rows(manifest, split)
    return [decode_rows(rows.take(list(range(r, rows.num_rows, n))), cfg, augment=False, bad_images=bad_images)
            for r in range(n)]


BLOCKS_PER_CPU = 4
MIN_BLOCK_ROWS = 16


def decode_block_rows(rows: int, decode_batch: int, cpus: int) -> int:
    """Rows per decode task: `decode_batch` (large, so Ray's per-task overhead is a small share), but small
    enough that every CPU gets a few tasks (a short split must not decode in one or two tasks), and never under
    `MIN_BLOCK_ROWS` (a small split on a large cluster must not become one-image tasks)."""
    spread = math.ceil(rows / (BLOCKS_PER_CPU * max(cpus, 1)))
    return max(1, min(decode_batch, max(spread, MIN_BLOCK_ROWS)))


def decode_rows(rows: pa.Table, cfg: PipelineConfig, *, augment: bool, shuffle: bool = False, bad_images=None,
                settings: storage.S3Settings | None = None) -> ray.data.Dataset:
    """Manifest rows (key, uri, row, label) -> {"image", "label", "key"} through CPU decode tasks; with
    `augment` each image gets the training augmentations (random per `key` and pass, or per pass without a
    seed), with `shuffle` each pass takes the rows in a new order."""
    cfg.validate()
    if not cfg.image_size:
        raise ConfigError("data.image_size", "is 0 (backbone default) but no backbone resolved it",
                          "set an explicit size, or build datasets through artnet.train")
    configure_data_context()
    settings = settings or storage.S3Settings.from_env()
    if shuffle and (groups := row_groups(rows, settings)) is not None:
        rows = rows.append_column("group", pa.array(groups))
    # batch_size None: each decode task takes exactly one block of `pass_rows` (`decode_block_rows` sized it). A
    # batch size here would be the fused task's minimum *input* rows: it bundled 128 one-row blocks into one task.
    return pass_rows(rows, cfg.decode_batch, shuffle, cfg.seed).map_batches(
        load_images,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={"cfg": cfg, "train": augment, "settings": settings, "bad_images": bad_images},
    )


def mixing_rows(rows: pa.Table, cfg: PipelineConfig) -> int:
    """Rows a training worker mixes before batching (Ray Data's local shuffle buffer): none when every image is
    its own file (each pass arrives in a global random order), four decode tasks' worth when images sit inside
    Parquet (they arrive row group by row group, see `pass_order`)."""
    return 4 * cfg.decode_batch if pc.any(pc.greater_equal(rows["row"], 0)).as_py() else 0


def pass_rows(rows: pa.Table, decode_batch: int, shuffle: bool, seed: int | None = None) -> ray.data.Dataset:
    """Manifest rows in blocks sized for decode tasks, in a new order every pass when `shuffle` (reproducible
    from `seed`; without one, from a seed drawn here; row group by row group where `rows` has a `group`
    column). Per pass the driver plans one tiny block per decode task and moves no rows: the rows are put into
    the object store once."""
    step = decode_block_rows(rows.num_rows, decode_batch, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, math.ceil(rows.num_rows / step))
    if shuffle and seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    numbers = ray.data.from_arrow([pa.table({"block": [b]}) for b in range(blocks)])
    return numbers.map_batches(take_rows, batch_size=None, batch_format="numpy",
                               fn_kwargs={"rows": ray.put(rows), "step": step, "seed": seed if shuffle else None})


def inference_pool(use_gpu: bool):
    """(actors, per-actor resources) for a model-in-an-actor stage (features, predictions): one actor per GPU
    the cluster has or its autoscaler can add (Ray Data's pending actors ask for those nodes), else up to 4 CPU
    actors that leave at least one CPU to the decode tasks (a pool that takes every CPU starves them,
    ray#44687). `use_gpu` on a cluster that has and can add no GPU is refused, not run on CPUs."""
    from artnet import cluster
    from artnet.errors import ConfigError

    can = cluster.current()
    if not use_gpu:
        return max(1, min(4, int(can.total("CPU")) - 1)), {"num_cpus": 1}
    gpus = int(can.total("GPU", grown=True))
    if not gpus:
        raise ConfigError("scaling.use_gpu", "is on, but no node has a GPU and the autoscaler can add none",
                          "drop --use-gpu, or add GPU nodes (a GPU node type in cluster.yaml)")
    return gpus, {"num_gpus": 1}
