"""Catalog: list the paintings of a source, label them, choose painters, split, and write a manifest.

One reader per source layout behind `read_source` (folder per painter, flat `<Painter>_<n>.jpg`, a CSV index
in the Painter-by-Numbers style, Parquet files with image bytes in the Hugging Face WikiArt style). Readers only
list; nothing is decoded here, so cataloguing 100k images on S3 costs one listing.

The split is hash-stable: an image's split depends only on (seed, its key), so adding or removing images or
painters never moves another image between train/val/test. Each painter is split by the same fractions, which
makes the split stratified (up to sampling noise on very small painters).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artnet.config import CatalogConfig, ConfigError
from artnet.data import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
LAYOUTS = ("auto", "folder", "flat", "csv", "parquet")
MANIFEST = "manifest.parquet"
LABELS = "labels.json"

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),       # identity of the image inside the source; the split hashes it
    ("uri", pa.string()),       # file to read: the image itself, or the Parquet file holding it
    ("row", pa.int64()),        # row inside that Parquet file, -1 for image files
    ("painter", pa.string()),
    ("label", pa.int32()),
    ("split", pa.string()),
])


@dataclass
class Listing:
    """What a reader found: one entry per image, plus the files it passed over and why."""

    keys: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    painters: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def add(self, key: str, uri: str, painter: str, row: int = -1) -> None:
        self.keys.append(key)
        self.uris.append(uri)
        self.rows.append(row)
        self.painters.append(painter)


@dataclass
class Catalog:
    manifest: pa.Table
    painters: list[str]          # index = label
    skipped: dict[str, int]      # listing-time skips (non-image files, missing files, unlabelled rows)

    def counts(self) -> dict[str, dict[str, int]]:
        """painter -> split -> number of images."""
        out = {p: dict.fromkeys(SPLITS, 0) for p in self.painters}
        for painter, split in zip(self.manifest["painter"].to_pylist(), self.manifest["split"].to_pylist()):
            out[painter][split] += 1
        return out


# ---------------------------------------------------------------------------------------------- pure helpers

def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def painter_from_flat_name(name: str) -> str | None:
    """`Vincent_van_Gogh_12.jpg` -> `Vincent_van_Gogh`; None when the name has no `_<n>` suffix."""
    stem = posixpath.splitext(posixpath.basename(name))[0]
    painter, sep, number = stem.rpartition("_")
    return painter if sep and painter and number.isdigit() else None


def split_of(key: str, fractions: tuple[float, float, float], seed: int) -> str:
    """Hash-stable split: a uniform number from (seed, key) falls into one of the fraction intervals."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def largest(counts: dict[str, int], k: int) -> list[str]:
    """The k painters with most paintings, ties broken by name."""
    return sorted(counts, key=lambda p: (-counts[p], p))[:k]


def select_painters(counts: dict[str, int], cfg: CatalogConfig) -> list[str]:
    """Painters kept by the filters, sorted by name (the sorted position is the label)."""
    if cfg.painters:
        unknown = [p for p in cfg.painters if p not in counts]
        if unknown:
            hints = {p: difflib.get_close_matches(p, list(counts), n=1) for p in unknown}
            hint_text = ", ".join(f"{p!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for p, h in hints.items())
            raise ConfigError("catalog.painters", f"unknown painter(s) {hint_text}",
                              "use names exactly as the source labels them (see `artnet catalog` output)")
        chosen = [p for p in cfg.painters if counts[p] >= cfg.min_paintings]
    else:
        chosen = [p for p, n in counts.items() if n >= cfg.min_paintings]
        if cfg.top_k > len(chosen) and chosen:  # a smaller task than asked for is not what the user wanted
            raise ConfigError("catalog.top_k", f"asks for {cfg.top_k} painters; the source has {len(chosen)} with "
                              f"{cfg.min_paintings}+ paintings", f"use --top-k {len(chosen)} or less, or lower "
                              "--min-paintings")
        if cfg.top_k:
            chosen = largest({p: counts[p] for p in chosen}, cfg.top_k)
    return sorted(chosen)


# -------------------------------------------------------------------------------------------------- readers

def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path.replace("\\", "/"), root.replace("\\", "/"))


def read_folder_or_flat(source: str, layout: str, files: list) -> Listing:
    fs_root = storage.resolve(source)[1]
    listing = Listing()
    for info in files:
        rel = _relative(info.path, fs_root)
        if not is_image_name(rel):
            listing.skipped["not_an_image_file"] += 1
            continue
        depth = rel.count("/")
        if layout == "folder":
            painter = rel.split("/", 1)[0] if depth >= 1 else None
        else:
            painter = painter_from_flat_name(rel) if depth == 0 else None
        if painter is None:
            listing.skipped["unlabelled"] += 1
            continue
        listing.add(rel, storage.to_uri(source, info.path), painter)
    return listing


FILENAME_COLUMNS = ("filename", "new_filename", "file", "path", "image")
ARTIST_COLUMNS = ("artist", "painter", "label")


def _pick_column(header: list[str], candidates: tuple[str, ...], what: str, source: str) -> str:
    lowered = {h.lower(): h for h in header}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    raise ConfigError("catalog.source", f"{source} has no {what} column (found {', '.join(header)})",
                      f"name one column {' or '.join(candidates)}")


def read_csv_index(source: str) -> Listing:
    """Painter-by-Numbers style: `filename,artist,...`; image files beside the CSV, possibly in subfolders."""
    text = storage.read_bytes(source).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    name_col = _pick_column(header, FILENAME_COLUMNS, "file name", source)
    artist_col = _pick_column(header, ARTIST_COLUMNS, "artist", source)
    base = storage.to_uri(source, posixpath.dirname(storage.resolve(source)[1]))
    fs_base = storage.resolve(base)[1]
    by_rel, by_name = {}, {}
    for info in storage.list_files(base):
        rel = _relative(info.path, fs_base)
        by_rel[rel] = info.path
        by_name.setdefault(posixpath.basename(rel), info.path)
    listing = Listing()
    for row in reader:
        name, artist = (row.get(name_col) or "").strip(), (row.get(artist_col) or "").strip()
        if not artist:
            listing.skipped["unlabelled"] += 1
            continue
        path = by_rel.get(name) or by_name.get(posixpath.basename(name))
        if path is None:
            listing.skipped["missing_file"] += 1
            continue
        listing.add(name, storage.to_uri(source, path), artist)
    return listing


def _label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """Class names stored by Hugging Face datasets in the Parquet schema metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    features = json.loads(meta).get("info", {}).get("features", {})
    names = features.get(column, {}).get("names")
    return list(names) if names else None


def read_parquet_images(source: str, files: list) -> Listing:
    """Hugging Face WikiArt style: an `image` struct {bytes, path} (or plain bytes) and an `artist` name or
    class index whose names live in the schema metadata. Only the small columns are read, never the bytes."""
    fs, fs_root = storage.resolve(source)
    listing = Listing()
    for info in files:
        if not info.path.endswith(".parquet"):
            continue
        try:
            pf = pq.ParquetFile(info.path, filesystem=fs)
            schema = pf.schema_arrow
            artist_col = _pick_column(schema.names, ARTIST_COLUMNS, "artist", info.path)
            names = _label_names(schema, artist_col)
            has_path = "image" in schema.names and pa.types.is_struct(schema.field("image").type)
            table = pf.read(columns=[artist_col] + (["image.path"] if has_path else []))
        except (pa.ArrowException, OSError) as e:  # a whole file of paintings: never skipped in silence
            raise ConfigError("catalog.source", f"{storage.to_uri(source, info.path)} is not a readable Parquet "
                              f"file ({type(e).__name__}: {e})", "re-export or remove that file") from None
        artists = table[artist_col].to_pylist()
        image_paths = [(p or {}).get("path") for p in table["image"].to_pylist()] if has_path else [None] * len(artists)
        rel = _relative(info.path, fs_root) if info.path != fs_root else posixpath.basename(info.path)
        uri = storage.to_uri(source, info.path)
        for row, (artist, image_path) in enumerate(zip(artists, image_paths)):
            if artist is None:
                listing.skipped["unlabelled"] += 1
                continue
            painter = names[artist] if names and isinstance(artist, int) else str(artist)
            listing.add(image_path or f"{rel}#{row}", uri, painter, row)
    return listing


def detect_layout(source: str, files: list) -> str:
    if source.lower().rstrip("/").endswith(".parquet"):
        return "parquet"
    fs_root = storage.resolve(source)[1]
    depths = Counter()
    for info in files:
        rel = _relative(info.path, fs_root)
        if rel.endswith(".parquet"):
            depths["parquet"] += 1
        elif is_image_name(rel):
            depths["folder" if "/" in rel else "flat"] += 1
    if not depths:
        raise ConfigError("catalog.source", f"{source} holds no images and no Parquet files",
                          f"point at a folder of painter folders, <Painter>_<n> images, a CSV index or Parquet "
                          f"files ({', '.join(IMAGE_EXTENSIONS)})")
    return depths.most_common(1)[0][0]


def read_source(source: str, layout: str = "auto") -> Listing:
    if layout not in LAYOUTS:
        raise ConfigError("catalog.layout", f"is {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    if not storage.exists(source):
        raise ConfigError("catalog.source", f"{source} does not exist",
                          "check the path or s3:// prefix (local paths are relative to the current directory)")
    if layout == "csv" or source.lower().endswith(".csv"):
        return read_csv_index(source)
    files = storage.list_files(source)  # one listing serves detection and reading (it is the slow part on S3)
    layout = detect_layout(source, files) if layout == "auto" else layout
    if layout == "parquet":
        return read_parquet_images(source, files)
    return read_folder_or_flat(source, layout, files)


# ---------------------------------------------------------------------------------------------- build/write

def build(cfg: CatalogConfig, layout: str = "auto") -> Catalog:
    cfg.validate()
    listing = read_source(cfg.source, layout)
    if not listing.painters:
        passed = ", ".join(f"{n} {why}" for why, n in sorted(listing.skipped.items())) or "nothing"
        raise ConfigError("catalog.source", f"{cfg.source} has no labelled paintings (passed over: {passed})",
                          "use a folder per painter, <Painter>_<n> file names, a CSV index or Parquet with an "
                          "artist column, or name the layout with --layout")
    painters = select_painters(Counter(listing.painters), cfg)
    if not painters:
        raise ConfigError("catalog.min_paintings", f"no painter has {cfg.min_paintings}+ paintings in {cfg.source}",
                          "lower --min-paintings or point at a larger source")
    label_of = {p: i for i, p in enumerate(painters)}
    keep = [i for i, p in enumerate(listing.painters) if p in label_of]
    keys = [listing.keys[i] for i in keep]
    manifest = pa.table({
        "key": keys,
        "uri": [listing.uris[i] for i in keep],
        "row": [listing.rows[i] for i in keep],
        "painter": [listing.painters[i] for i in keep],
        "label": [label_of[listing.painters[i]] for i in keep],
        "split": [split_of(k, cfg.split, cfg.seed) for k in keys],
    }, schema=MANIFEST_SCHEMA)
    return Catalog(manifest=manifest, painters=painters, skipped=dict(listing.skipped))


def write(catalog: Catalog, out: str, cfg: CatalogConfig) -> None:
    sink = io.BytesIO()
    pq.write_table(catalog.manifest, sink)
    storage.write_bytes(storage.join(out, MANIFEST), sink.getvalue())
    labels = {"painters": catalog.painters, "counts": catalog.counts(), "source": cfg.source,
              "seed": cfg.seed, "split": list(cfg.split), "skipped": catalog.skipped}
    storage.write_bytes(storage.join(out, LABELS), json.dumps(labels, indent=2).encode())


def load(out: str) -> tuple[pa.Table, list[str]]:
    """(manifest, painter names by label) as written by `write`."""
    if not storage.exists(storage.join(out, MANIFEST)):
        raise ConfigError("catalog", f"{out} holds no {MANIFEST}",
                          f"write one first: artnet catalog SOURCE --out {out}")
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, MANIFEST))))
    labels = json.loads(storage.read_bytes(storage.join(out, LABELS)))
    return manifest, labels["painters"]


def digest(manifest: pa.Table) -> str:
    """sha256 of what a manifest says: each image's key, source, label and split, in order."""
    columns = manifest.select(["key", "uri", "row", "label", "split"]).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, columns.schema) as writer:  # the IPC writer serialises slices exactly
        writer.write_table(columns)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def subset(manifest: pa.Table, painters: list[str], keep: list[str]) -> tuple[pa.Table, list[str]]:
    """The rows of the painters in `keep`, relabelled by their sorted names (as `build` labels them);
    splits stay as they were."""
    kept = sorted(keep)
    label_of = {p: i for i, p in enumerate(kept)}
    rows = manifest.filter(pc.is_in(manifest["painter"], pa.array(kept)))
    labels = pa.array([label_of[p] for p in rows["painter"].to_pylist()], pa.int32())
    return rows.set_column(rows.schema.get_field_index("label"), "label", labels), kept


def top_painters(manifest: pa.Table, k: int) -> list[str]:
    """The k painters with most images (ties by name), as `--top-k` chooses them."""
    return sorted(largest(Counter(manifest["painter"].to_pylist()), k))


def format_table(catalog: Catalog) -> str:
    counts = catalog.counts()
    width = max([len("painter")] + [len(p) for p in counts])
    lines = [f"{'label':>5}  {'painter':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'total':>6}"]
    totals = dict.fromkeys(SPLITS, 0)
    for label, painter in enumerate(catalog.painters):
        c = counts[painter]
        for s in SPLITS:
            totals[s] += c[s]
        lines.append(f"{label:>5}  {painter:<{width}}  {c['train']:>6} {c['val']:>6} {c['test']:>6} {sum(c.values()):>6}")
    lines.append(f"{'':>5}  {'all':<{width}}  {totals['train']:>6} {totals['val']:>6} {totals['test']:>6} "
                 f"{sum(totals.values()):>6}")
    if catalog.skipped:
        lines.append("skipped while listing: " + ", ".join(f"{k}={v}" for k, v in sorted(catalog.skipped.items())))
    return "\n".join(lines)
