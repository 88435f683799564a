"""Backbone features of a manifest, computed once with Ray Data batch inference and cached as Parquet (local or
s3://), so head-only search trials never run the CNN.

The cache lives in `<cache>/<spec digest>/`, where the spec is everything that changes a feature vector:
backbone, a checksum of its weights, width multiplier, input size, augmentation and the views' seed (view v of
an image is the same whatever number of views a request asks for) and the stored dtype (float32, or float16 with
`search.feature_dtype`). Inside, `features/` holds rows (image, view, features) with `image` = the manifest's
`uri#row`, in Parquet files of at least `MIN_ROWS_PER_FILE` rows. View 0 is the centre crop every split uses;
views 1..K are seeded augmentations of training images. A request computes only the (image, view) pairs the
cache lacks, so any manifest whose images are already there (a painter-count subset of a catalogued collection,
a second sweep) computes nothing. Pairs whose image cannot be decoded are listed in `undecodable/`, so they are
not retried each time.

`load` reads a manifest's features file by file, batch by batch, straight into one preallocated array per split:
the driver holds the matrix once (at a million paintings it is tens of GB), never a join's or a sort's copy of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from artnet import console
from artnet.config import JobConfig, replace
from artnet.data import pipeline, storage
from artnet.errors import UserError
from artnet.model import backbones
from artnet.search.heads import Features

SPEC_FILE = "spec.json"
FEATURES, UNDECODABLE = "features", "undecodable"
# Rows per cache file at least (Ray Data bundles blocks to this before writing): one file per decode block was
# ~33k files of 128 rows at WikiArt scale, each a request and a footer to read.
MIN_ROWS_PER_FILE = 10_000
# Rows `load` decodes at a time, per thread: decoding a batch of the list column takes several times its size
# (100k x 2048 float32 rows on 2 cores: 512 peaked at 0.95 GB for 0.78 GB of features, 2048 at 1.14 GB, both
# in the same time).
READ_BATCH_ROWS = 512
READ_BUFFER_BYTES = 8 << 20  # Parquet column chunks are streamed in pieces this big, not read whole
READ_THREADS = 8


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a feature vector depends on; its digest names the cache folder."""

    backbone: str
    weights: str  # sha256 of the weights file, or "imagenet@keras-<version>", or "none@seed-<seed>"
    alpha: float
    image_size: int
    seed: int
    augment: dict
    max_pixels: int
    dtype: str = "float32"  # how the features are stored: float32 or float16

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["dtype"] == "float32":  # float32 caches written before the field existed keep their folder
            del fields["dtype"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def spec_of(job: JobConfig, seed: int) -> EmbeddingSpec:
    """The spec of a resolved job (image size filled in, local paths absolute)."""
    import keras

    weights = job.model.weights
    if weights == "imagenet":
        weights_id = f"imagenet@keras-{keras.__version__}"
    elif weights in ("none", ""):
        weights_id = f"none@seed-{seed}"
    else:
        weights_id = backbones.sha256_of(backbones.fetch_weights(weights, job.model.weights_sha256))
    return EmbeddingSpec(backbone=job.model.backbone, weights=weights_id, alpha=job.model.alpha,
                         image_size=job.data.image_size, seed=seed,
                         augment=dataclasses.asdict(job.data.augment), max_pixels=job.data.max_pixels,
                         dtype=job.search.feature_dtype)


def cache_of(job: JobConfig) -> str:
    """The feature cache of a job: `search.cache`, else <workdir>/embeddings."""
    return job.search.cache or storage.join(job.workdir, "embeddings")


def image_ids(manifest: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(manifest["uri"], pc.cast(manifest["row"], pa.string()), "#")


def requested(manifest: pa.Table, views: int) -> pa.Table:
    """(image, view, uri, row, label, split) for every pair a manifest needs: view 0 of every image, and views
    1..`views` of training images."""
    base = manifest.select(["uri", "row", "label", "split"]).append_column("image", image_ids(manifest))
    tables = [base.append_column("view", pa.array(np.zeros(base.num_rows, np.int32)))]
    train = base.filter(pc.equal(base["split"], "train"))
    for v in range(1, views + 1):
        tables.append(train.append_column("view", pa.array(np.full(train.num_rows, v, np.int32))))
    return pa.concat_tables(tables)


def _parquet_files(directory: str) -> list[str]:
    """The Parquet files under a cache folder, as paths of its filesystem (none when it does not exist)."""
    if not storage.exists(directory):
        return []
    return [i.path for i in storage.list_files(directory) if i.path.endswith(".parquet")]


def _cached(directory: str, columns: list[str], image_filter=None) -> pa.Table | None:
    files = _parquet_files(directory)
    if not files:
        return None
    fs = storage.resolve(directory)[0]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns, filter=image_filter)


def ensure(manifest: pa.Table, job: JobConfig, cache: str, views: int, seed: int = 0) -> dict:
    """Compute whatever (image, view) pairs of `manifest` the cache lacks. Returns where the features are
    and how many pairs were computed, reused and undecodable."""
    spec = spec_of(job, seed)
    directory = storage.join(cache, spec.digest())
    if not storage.exists(storage.join(directory, SPEC_FILE)):
        storage.write_bytes(storage.join(directory, SPEC_FILE), json.dumps(dataclasses.asdict(spec), indent=2).encode())
    need = requested(manifest, views)
    missing = _without(need, [storage.join(directory, FEATURES), storage.join(directory, UNDECODABLE)])
    computed = bad = 0
    if missing.num_rows:
        _compute(missing, job, spec, storage.join(directory, FEATURES))
        still = _without(missing, [storage.join(directory, FEATURES)])
        if still.num_rows:  # recorded, so the next request does not try them again
            _write_undecodable(storage.join(directory, UNDECODABLE), still.select(["image", "view"]))
        bad, computed = still.num_rows, missing.num_rows - still.num_rows
    return {"directory": directory, "spec": spec, "computed": computed, "reused": need.num_rows - missing.num_rows,
            "undecodable": bad}


def _without(pairs: pa.Table, folders: list[str]) -> pa.Table:
    """The (image, view) rows of `pairs` that none of the cache folders holds."""
    for folder in folders:
        have = _cached(folder, ["image", "view"])
        if have is not None and pairs.num_rows:
            pairs = pairs.join(have, keys=["image", "view"], join_type="left anti")
    return pairs


def _write_undecodable(folder: str, pairs: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pairs.cast(pa.schema([("image", pa.string()), ("view", pa.int32())])), sink)
    storage.write_bytes(storage.join(folder, f"{uuid.uuid4().hex}.parquet"), sink.getvalue().to_pybytes())


class Embedder:
    """A Ray Data actor: the feature extractor is built (and its weights loaded) once per actor, then each
    batch of decoded images becomes (image, view, features) rows."""

    def __init__(self, job: JobConfig, seed: int, dtype: str = "float32"):
        import keras
        import tensorflow as tf

        from artnet.model import classifier

        tf.config.threading.set_inter_op_parallelism_threads(1)
        keras.utils.set_random_seed(seed)  # untrained ("none") weights are then the same in every actor
        self.model = classifier.build_feature_extractor(backbones.get(job.model.backbone), job.model,
                                                        job.data.image_size)
        # A traced graph, not eager calls: on 2,018 paintings at 224 px the actor peaked at 2.0 GB resident
        # and took 27.7 s, against 6.7 GB and 41.5 s eager.
        self.embed = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict) -> pa.Table:
        keys = [str(k) for k in batch["key"]]
        images = [k.rsplit("|", 1)[0] for k in keys]
        views = [int(k.rsplit("|", 1)[1]) for k in keys]
        features = self.embed(batch["image"].astype(np.float32)).numpy()
        dim = features.shape[1] if features.ndim == 2 else int(self.model.output_shape[-1])
        column = pa.FixedSizeListArray.from_arrays(pa.array(features.astype(self.dtype).ravel()), dim)
        return pa.table({"image": pa.array(images, pa.string()), "view": pa.array(views, pa.int32()),
                         "features": column})


def _compute(missing: pa.Table, job: JobConfig, spec: EmbeddingSpec, folder: str) -> None:
    """Decode (CPU tasks) and embed (an actor pool) the missing pairs; write them as new Parquet parts."""
    import ray

    console.init_ray()
    rows = missing.append_column("key", pc.binary_join_element_wise(
        missing["image"], pc.cast(missing["view"], pa.string()), "|")).select(["key", "uri", "row", "label", "view"])
    cfg = replace(job.data, seed=spec.seed)  # augmented views are seeded by key: the same every time
    parts = []
    for augment in (False, True):
        chosen = rows.filter(pc.greater(rows["view"], 0) if augment else pc.equal(rows["view"], 0))
        if chosen.num_rows:
            parts.append(pipeline.decode_rows(chosen.drop_columns(["view"]), cfg, augment=augment))
    ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    actors, resources = pipeline.inference_pool(job.scaling.use_gpu)
    # One decode block a call (at most data.decode_batch images): fused with the decode stage, a batch size here
    # would be counted in blocks' worth of input rows and bundle many blocks into one call.
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"job": job, "seed": spec.seed, "dtype": spec.dtype},
                        batch_size=None, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        **resources)
    write_features(ds, folder)


def write_features(ds, folder: str) -> None:
    """Ray Data rows (image, view, features) as new Parquet parts under `folder`: blocks are bundled into files of
    at least `MIN_ROWS_PER_FILE` rows (the last part of a write may be smaller)."""
    fs, path = storage.resolve(folder)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=MIN_ROWS_PER_FILE)


def load(manifest: pa.Table, directory: str, views: int,
         splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Features]:
    """The features of a manifest's `splits`, labelled by this manifest: train gets view 0 and its augmented
    views, val and test view 0 only, each split in (image, view) order, in the cache's dtype. Undecodable images
    are left out (and a pair cached twice counts once).

    Two passes over the cache: the (image, view) keys say which file and row holds each wanted pair; then each
    file's feature column is decoded a batch at a time and its wanted rows copied to their place in one
    preallocated array per split, the only copy of the features the driver makes."""
    folder = storage.join(directory, FEATURES)
    files = _parquet_files(folder)
    if not files:
        raise UserError(directory, "holds no features for this manifest (no image could be decoded)",
                        "check the images the catalog lists (see the bad-image counts)")
    fs = storage.resolve(folder)[0]
    need = requested(manifest.filter(pc.is_in(manifest["split"], pa.array(list(splits)))), views)
    need = need.select(["image", "view", "label", "split"])
    need = need.append_column("slot", pa.array(np.arange(need.num_rows, dtype=np.int64)))
    dim, dtype = _feature_type(files, fs, directory)

    def places(i: int) -> pa.Table:  # the join below keeps the wanted ones
        keys = pq.ParquetFile(files[i], filesystem=fs).read(columns=["image", "view"], use_threads=False)
        keys = keys.append_column("file", pa.array(np.full(keys.num_rows, i, np.int32)))
        return keys.append_column("row", pa.array(np.arange(keys.num_rows, dtype=np.int64)))

    with ThreadPoolExecutor(min(READ_THREADS, len(files), os.cpu_count() or 1)) as pool:
        found = pa.concat_tables(list(pool.map(places, range(len(files)))))
    table = need.join(found, keys=["image", "view"], join_type="inner")
    table = table.sort_by([("image", "ascending"), ("view", "ascending")])
    slot = table["slot"].to_numpy()
    if len(slot) > 1 and (slot[1:] == slot[:-1]).any():
        keep = np.concatenate([[True], slot[1:] != slot[:-1]])
        table = table.filter(pa.array(keep))
    split_of = pc.index_in(table["split"], value_set=pa.array(list(splits))).to_numpy()
    file_of, row_of = table["file"].to_numpy(), table["row"].to_numpy()
    out, targets = {}, []
    place = np.empty(table.num_rows, np.int64)  # each row's index in its split's array
    for k, split in enumerate(splits):
        mine = np.flatnonzero(split_of == k)
        place[mine] = np.arange(len(mine))
        out[split] = Features(np.empty((len(mine), dim), dtype),
                              table["label"].take(pa.array(mine)).to_numpy().astype(np.int64))
        targets.append(out[split].x)

    order = np.lexsort((row_of, file_of))  # file by file, each file's rows ascending
    bounds = np.searchsorted(file_of[order], np.arange(len(files) + 1))

    def copy(i: int) -> None:
        mine = order[bounds[i]:bounds[i + 1]]
        if len(mine):
            _copy_rows(files[i], fs, row_of[mine], split_of[mine], place[mine], targets)
            pa.default_memory_pool().release_unused()  # the batches' buffers, else kept by the allocator

    with ThreadPoolExecutor(min(READ_THREADS, len(files), os.cpu_count() or 1)) as pool:
        list(pool.map(copy, range(len(files))))
    return out


def _feature_type(files: list[str], fs, directory: str) -> tuple[int, np.dtype]:
    """(width, numpy dtype) of the cache's features; every file must agree (a float16 and a float32 part never
    mix in one array)."""
    types = {pq.read_schema(f, filesystem=fs).field("features").type for f in files[:1] + files[-1:]}
    kind = next(iter(types))
    if len(types) > 1 or not pa.types.is_fixed_size_list(kind):
        raise UserError(directory, f"holds features of types {sorted(map(str, types))}",
                        "delete the folder: the next run computes it again")
    return kind.list_size, np.dtype(kind.value_type.to_pandas_dtype())


def _copy_rows(path: str, fs, rows: np.ndarray, split_index: np.ndarray, place: np.ndarray,
               targets: list[np.ndarray]) -> None:
    """Copy rows `rows` (ascending) of one cache file's features to `targets[split_index][place]`, decoding only
    the row groups that hold them, `READ_BATCH_ROWS` at a time."""
    dim, dtype = targets[0].shape[1], pa.from_numpy_dtype(targets[0].dtype)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        meta = parquet.metadata
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        for group in np.unique(np.searchsorted(starts, rows, side="right") - 1):
            start = int(starts[group])
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[int(group)],
                                              columns=["features"], use_threads=False):
                lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
                if hi > lo:
                    column = batch.column(0)
                    if column.type.value_type != dtype or column.type.list_size != dim:
                        raise UserError(path, f"holds {column.type} features, the cache's others {dim} x {dtype}",
                                        "delete the cache folder: the next run computes it again")
                    block = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                    which, at, taken = split_index[lo:hi], place[lo:hi], rows[lo:hi] - start
                    whole = len(taken) == len(block) and np.array_equal(taken, np.arange(len(block)))
                    for k in np.unique(which):
                        mine = which == k
                        if whole and mine.all():  # the batch as it is: no gathered copy
                            targets[k][at] = block
                        else:
                            targets[k][at[mine]] = block[taken[mine]]
                start += batch.num_rows
