"""Who painted it: a logged model ranks the painters of images, files or whole folders/prefixes.

A few files are answered in this process. Folders and `s3://` prefixes go through Ray Data: rows of (uri, row)
stream into an actor pool where the model is loaded once per actor, each batch is read, decoded and answered,
and the rows stream out to Parquet. The model is a `model.bundle.ModelBundle`: its painter names and
calibration come with it. Unreadable images become rows with an error, never a crash.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from artnet.config import PipelineConfig
from artnet.data import storage, transforms
from artnet.model import bundle as bundle_lib

FORMATS = ("table", "json", "parquet")
IN_PROCESS_MAX = 32  # more files than this (or any folder) go through Ray Data
PREDICT_BATCH = 32

TOP_K_TYPE = pa.list_(pa.struct([("painter", pa.string()), ("probability", pa.float64())]))
SCHEMA = pa.schema([("uri", pa.string()), ("painter", pa.string()), ("probability", pa.float64()),
                    ("unknown", pa.bool_()), ("top_k", TOP_K_TYPE), ("error", pa.string())])


def answer(probabilities: np.ndarray, unknown: np.ndarray, painters: list[str], k: int) -> list[dict]:
    """Per image: the closest painter, its calibrated probability, the unknown flag and the top k."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [{"painter": painters[row[0]], "probability": float(p[row[0]]), "unknown": bool(flag),
             "top_k": [{"painter": painters[j], "probability": float(p[j])} for j in row], "error": None}
            for p, row, flag in zip(probabilities, order, unknown)]


def predict_images(model: bundle_lib.ModelBundle, uris: list[str], rows: list[int], data: list, k: int,
                   max_pixels: int) -> list[dict]:
    """Rows in SCHEMA's shape for images whose bytes (or read errors) are in `data`."""
    out: list[dict] = []
    images, where = [], []
    for uri, row, item in zip(uris, rows, data):
        name = uri if row < 0 else f"{uri}#{row}"
        out.append({"uri": name, "painter": None, "probability": None, "unknown": None, "top_k": None,
                    "error": None})
        if isinstance(item, Exception):
            out[-1]["error"] = f"unreadable: {type(item).__name__}: {item}"
            continue
        try:
            images.append(model.preprocess(item, max_pixels))
            where.append(len(out) - 1)
        except transforms.BadImage as e:
            out[-1]["error"] = str(e)
    if images:
        probabilities = model.probabilities(np.stack(images))
        for i, found in zip(where, answer(probabilities, model.calibration.unknown(probabilities), model.painters, k)):
            out[i].update(found)
    return out


class Predictor:
    """Ray Data actor: the model is loaded once per actor; a batch of (uri, row) becomes SCHEMA rows."""

    def __init__(self, model_uri: str, tracking_uri: str | None, k: int, max_pixels: int,
                 settings: storage.S3Settings):
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.model = bundle_lib.load(model_uri, tracking_uri)
        self.k, self.max_pixels, self.settings = k, max_pixels, settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        from artnet.data import pipeline

        uris, rows = batch["uri"].to_pylist(), batch["row"].to_pylist()
        data = pipeline.fetch(uris, rows, self.settings)
        found = predict_images(self.model, uris, rows, data, self.k, self.max_pixels)
        table = pa.Table.from_pylist(found, schema=SCHEMA)
        return table.append_column("label", batch["label"]) if "label" in batch.column_names else table


def list_sources(sources: list[str]) -> tuple[list[str], bool]:
    """(every file URI under the sources, whether any source was a folder or prefix)."""
    uris, any_folder = [], False
    for source in sources:
        source = storage.absolute(source)
        infos = storage.list_files(source)
        if len(infos) != 1 or storage.to_uri(source, infos[0].path).rstrip("/") != source.rstrip("/"):
            any_folder = True
        uris.extend(storage.to_uri(source, info.path) for info in infos)
    return uris, any_folder


def rows_of(uris: list[str]) -> pa.Table:
    return pa.table({"uri": pa.array(uris, pa.string()), "row": pa.array([-1] * len(uris), pa.int64())})


def stream(model_uri: str, tracking_uri: str | None, rows: pa.Table, k: int, use_gpu: bool = False,
           max_pixels: int = PipelineConfig.max_pixels):
    """A Ray dataset of SCHEMA rows (plus `label` when `rows` has one) for manifest-like rows (uri, row)."""
    import ray

    from artnet import console
    from artnet.data import pipeline

    console.init_ray()
    pipeline.configure_data_context()
    ds = ray.data.from_arrow([rows.slice(i, PREDICT_BATCH) for i in range(0, rows.num_rows, PREDICT_BATCH)])
    actors, resources = pipeline.inference_pool(use_gpu)
    actors = max(1, min(actors, -(-rows.num_rows // PREDICT_BATCH)))  # no more actors than batches
    return ds.map_batches(Predictor, batch_size=PREDICT_BATCH, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=actors), **resources,
                          fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri, "k": k,
                                                 "max_pixels": max_pixels,
                                                 "settings": storage.S3Settings.from_env()})


def predict_here(model: bundle_lib.ModelBundle, uris: list[str], k: int) -> pa.Table:
    """A few files answered in this process (no Ray): what one image from the command line needs."""
    from artnet.data import pipeline

    rows = [-1] * len(uris)
    data = pipeline.fetch(uris, rows, storage.S3Settings.from_env())
    return pa.Table.from_pylist(predict_images(model, uris, rows, data, k, PipelineConfig.max_pixels), schema=SCHEMA)


def explain_files(model: bundle_lib.ModelBundle, table: pa.Table, out: str) -> list[str]:
    """A Grad-CAM PNG per answered image of `table` under `out`: the regions that drove its painter."""
    import io

    from PIL import Image

    from artnet.data import pipeline
    from artnet.model import explain

    answered = [row for row in table.to_pylist() if not row["error"]]
    if not answered:
        return []
    uris = [row["uri"] for row in answered]
    data = pipeline.fetch(uris, [-1] * len(uris), storage.S3Settings.from_env())
    images = np.stack([model.preprocess(item, PipelineConfig.max_pixels) for item in data])
    answers = np.array([model.painters.index(r["painter"]) for r in answered])
    overlays, _ = explain.explained(model.model, images, answers)
    written = []
    for uri, picture in zip(uris, overlays):
        stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        target = storage.join(storage.absolute(out), f"{stem}.gradcam.png")
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, "PNG")
        storage.write_bytes(target, buffer.getvalue())
        written.append(target)
    return written


def predict(model_uri: str, sources: list[str], *, k: int = 3, tracking_uri: str | None = None,
            out: str | None = None, use_gpu: bool = False, explain: str | None = None) -> pa.Table | None:
    """Predictions for files, folders or prefixes: returned as a table, or written as Parquet under `out`
    (then None from Ray Data: a bucket's worth of rows streams to storage without passing the driver). A few
    files are answered here; more, or any folder, stream through Ray Data. `explain`: a folder for a Grad-CAM
    PNG per image (files answered here only)."""
    import pyarrow.parquet as pq

    from artnet.config import ConfigError

    uris, any_folder = list_sources(sources)
    in_process = not any_folder and len(uris) <= IN_PROCESS_MAX
    if explain and not in_process:
        raise ConfigError("--explain", f"works on up to {IN_PROCESS_MAX} image files, not on folders or prefixes",
                          "name the files to explain")
    if in_process:
        model = bundle_lib.load(model_uri, tracking_uri)
        table = predict_here(model, uris, k)
        if explain:
            explain_files(model, table, explain)
        if out:
            fs, path = storage.resolve(storage.absolute(out))
            fs.create_dir(path, recursive=True)
            pq.write_table(table, f"{path}/predictions.parquet", filesystem=fs)
        return table
    ds = stream(model_uri, tracking_uri, rows_of(uris), k, use_gpu)
    if out:
        from artnet import cluster

        cluster.refuse_local("--out", storage.absolute(out), cluster.current().nodes,
                             "predictions are written by the actors on their nodes", "predictions")
        fs, path = storage.resolve(storage.absolute(out))
        ds.write_parquet(path, filesystem=fs)
        return None
    return collect(ds)


def collect(ds) -> pa.Table:
    import ray

    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_predictions(out: str, columns: list[str] | None = None) -> pa.Table:
    """The rows (or some columns) written under `out` by `predict`."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(storage.absolute(out))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


def summary(table: pa.Table) -> str:
    """One line: how many images were answered, flagged unknown, or unreadable."""
    errors = sum(1 for e in table["error"].to_pylist() if e)
    unknown = sum(1 for u in table["unknown"].to_pylist() if u)
    answered = table.num_rows - errors
    return f"{table.num_rows} images: {answered} answered ({unknown} unknown painter), {errors} unreadable"


def format_table(table: pa.Table) -> str:
    """A console table: the painter (or "unknown (closest: X)") and the top k with probabilities."""
    lines = []
    for row in table.to_pylist():
        if row["error"]:
            lines.append(f"{row['uri']}\n    error: {row['error']}")
            continue
        verdict = f"unknown (closest: {row['painter']})" if row["unknown"] else row["painter"]
        ranked = ", ".join(f"{t['painter']} {t['probability']:.0%}" for t in row["top_k"])
        lines.append(f"{row['uri']}\n    {verdict}   [{ranked}]")
    return "\n".join(lines)
