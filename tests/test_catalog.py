import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artnet import cli
from artnet.config import CatalogConfig, ConfigError
from artnet.data import catalog, storage
from conftest import PAINTINGS, jpeg_bytes, painting, requires_paintings, write_folder_set

PAINTERS = {"Claude_Monet": 12, "Edgar_Degas": 8, "Paul_Klee": 3}


def painters_of(cat: catalog.Catalog) -> dict[str, int]:
    counts = cat.counts()
    return {p: sum(c.values()) for p, c in counts.items()}


def test_folder_per_painter(tmp_path):
    write_folder_set(tmp_path, PAINTERS, extra={"Paul_Klee": {"notes.txt": b"not an image"}})
    cat = catalog.build(CatalogConfig(source=str(tmp_path)))
    assert painters_of(cat) == PAINTERS
    assert cat.painters == sorted(PAINTERS)
    assert cat.skipped == {"not_an_image_file": 1}
    labels = dict(zip(cat.manifest["painter"].to_pylist(), cat.manifest["label"].to_pylist()))
    assert labels == {p: i for i, p in enumerate(sorted(PAINTERS))}


def test_flat_folder_of_painter_numbered_files(tmp_path):
    for name, count in PAINTERS.items():
        for n in range(count):
            (tmp_path / f"{name}_{n}.jpg").write_bytes(jpeg_bytes(painting(n)))
    (tmp_path / "untitled.jpg").write_bytes(jpeg_bytes(painting(99)))
    cat = catalog.build(CatalogConfig(source=str(tmp_path)))
    assert painters_of(cat) == PAINTERS
    assert cat.skipped == {"unlabelled": 1}


def test_csv_index_in_painter_by_numbers_style(tmp_path):
    (tmp_path / "train").mkdir()
    rows = ["filename,artist,title,style"]
    for n in range(6):
        (tmp_path / "train" / f"{n}.jpg").write_bytes(jpeg_bytes(painting(n)))
        rows.append(f"{n}.jpg,{'Rembrandt' if n % 2 else 'Titian'},t{n},Baroque")
    rows.append("missing.jpg,Titian,gone,Baroque")
    rows.append("5.jpg,,no artist,Baroque")
    (tmp_path / "train_info.csv").write_text("\n".join(rows) + "\n")
    cat = catalog.build(CatalogConfig(source=str(tmp_path / "train_info.csv")))
    assert painters_of(cat) == {"Rembrandt": 3, "Titian": 3}
    assert cat.skipped == {"missing_file": 1, "unlabelled": 1}
    assert all(u.startswith(str(tmp_path / "train")) for u in cat.manifest["uri"].to_pylist())


def hf_parquet(path, artists, names=None):
    images = [{"bytes": jpeg_bytes(painting(i)), "path": f"img_{path.stem}_{i}.jpg"} for i in range(len(artists))]
    table = pa.table({"image": images, "artist": artists})
    if names:
        meta = {"info": {"features": {"artist": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, path, row_group_size=3)


def test_parquet_with_class_indices_and_names_in_metadata(tmp_path):
    names = ["Claude Monet", "Edgar Degas", "Paul Klee"]
    hf_parquet(tmp_path / "train-0.parquet", [0, 1, 1, 2, 0], names)
    hf_parquet(tmp_path / "train-1.parquet", [2, 2, None], names)
    cat = catalog.build(CatalogConfig(source=str(tmp_path)))
    assert painters_of(cat) == {"Claude Monet": 2, "Edgar Degas": 2, "Paul Klee": 3}
    assert cat.skipped == {"unlabelled": 1}
    rows = cat.manifest.to_pylist()
    klee = [r for r in rows if r["uri"].endswith("train-1.parquet")]
    assert [r["row"] for r in klee] == [0, 1]


@pytest.mark.parametrize("damage", ["truncated", "not_parquet"])
def test_a_damaged_parquet_file_is_named_not_skipped(tmp_path, damage):
    hf_parquet(tmp_path / "train-0.parquet", ["Goya", "Rubens"])
    hf_parquet(tmp_path / "train-1.parquet", ["Goya", "Rubens"])
    data = (tmp_path / "train-1.parquet").read_bytes()
    (tmp_path / "train-1.parquet").write_bytes(data[:len(data) // 2] if damage == "truncated" else b"<html>" * 50)
    with pytest.raises(ConfigError, match=r"catalog.source.*train-1.parquet is not a readable Parquet file") as err:
        catalog.build(CatalogConfig(source=str(tmp_path)))
    assert "re-export or remove" in err.value.fix


def test_parquet_with_artist_names(tmp_path):
    hf_parquet(tmp_path / "data.parquet", ["Goya", "Goya", "Rubens"])
    cat = catalog.build(CatalogConfig(source=str(tmp_path / "data.parquet")))
    assert painters_of(cat) == {"Goya": 2, "Rubens": 1}


def test_filters_top_k_min_and_explicit(tmp_path):
    write_folder_set(tmp_path, PAINTERS)
    src = str(tmp_path)
    assert catalog.build(CatalogConfig(source=src, top_k=2)).painters == ["Claude_Monet", "Edgar_Degas"]
    assert catalog.build(CatalogConfig(source=src, min_paintings=5)).painters == ["Claude_Monet", "Edgar_Degas"]
    assert catalog.build(CatalogConfig(source=src, painters=("Paul_Klee",))).painters == ["Paul_Klee"]
    with pytest.raises(ConfigError, match="did you mean 'Paul_Klee'"):
        catalog.build(CatalogConfig(source=src, painters=("Paul_Kle",)))
    with pytest.raises(ConfigError) as err:
        catalog.build(CatalogConfig(source=src, min_paintings=50))
    assert err.value.field == "catalog.min_paintings"
    with pytest.raises(ConfigError) as err:
        catalog.build(CatalogConfig(source=src, top_k=len(PAINTERS) + 1))
    assert err.value.field == "catalog.top_k" and f"the source has {len(PAINTERS)}" in str(err.value)


def splits(keys, seed=0):
    return {k: catalog.split_of(k, (0.8, 0.1, 0.1), seed) for k in keys}


def test_split_is_stable_when_images_and_painters_come_and_go():
    rnd = random.Random(1)
    base = [f"Painter_{p}/img_{i}.jpg" for p in range(20) for i in range(rnd.randint(5, 80))]
    before = splits(base)
    for trial in range(20):
        kept = rnd.sample(base, k=len(base) // 2)
        added = [f"Painter_{rnd.randint(0, 40)}/new_{trial}_{i}.jpg" for i in range(200)]
        after = splits(kept + added)
        assert all(after[k] == before[k] for k in kept)


def test_split_is_stratified_per_painter_and_depends_on_seed():
    for painter in range(5):
        keys = [f"P{painter}/{i}.jpg" for i in range(2000)]
        share = {s: sum(v == s for v in splits(keys).values()) / len(keys) for s in catalog.SPLITS}
        assert abs(share["train"] - 0.8) < 0.03 and abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.1) < 0.02
    keys = [f"x/{i}" for i in range(500)]
    assert splits(keys, seed=0) != splits(keys, seed=1)


def test_catalog_from_s3_prefix(tmp_path, s3_bucket):
    write_folder_set(tmp_path, PAINTERS)
    for f in tmp_path.rglob("*.jpg"):
        storage.write_bytes(f"s3://{s3_bucket}/wikiart/{f.relative_to(tmp_path)}", f.read_bytes())
    cat = catalog.build(CatalogConfig(source=f"s3://{s3_bucket}/wikiart"))
    assert painters_of(cat) == PAINTERS
    assert all(u.startswith(f"s3://{s3_bucket}/wikiart/") for u in cat.manifest["uri"].to_pylist())
    local = catalog.build(CatalogConfig(source=str(tmp_path)))
    assert sorted(cat.manifest["split"].to_pylist()) == sorted(local.manifest["split"].to_pylist()), \
        "the same relative keys split the same way wherever the data lives"
    catalog.write(cat, f"s3://{s3_bucket}/catalogs/run1", CatalogConfig(source="x"))
    manifest, painters = catalog.load(f"s3://{s3_bucket}/catalogs/run1")
    assert painters == sorted(PAINTERS) and manifest.num_rows == sum(PAINTERS.values())


def test_cli_catalog_writes_manifest_and_prints_table(tmp_path, capsys):
    write_folder_set(tmp_path / "src", PAINTERS)
    out = tmp_path / "out"
    assert cli.main(["catalog", str(tmp_path / "src"), "--out", str(out), "--top-k", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Claude_Monet" in printed and "Paul_Klee" not in printed and "all" in printed
    labels = json.loads((out / "labels.json").read_text())
    assert labels["painters"] == ["Claude_Monet", "Edgar_Degas"] and labels["seed"] == 3
    assert pq.read_table(out / "manifest.parquet").num_rows == 20


@pytest.mark.parametrize("argv,field", [
    (["--split", "0.5,0.5,0.5"], "catalog.split"),
    (["--top-k", "-1"], "catalog.top_k"),
    (["--top-k", "2", "--painters", "A,B"], "catalog.top_k"),
    (["--min-paintings", "0"], "catalog.min_paintings"),
])
def test_cli_bad_config_fails_fast_naming_the_field(tmp_path, capsys, argv, field):
    assert cli.main(["catalog", str(tmp_path / "does-not-matter"), "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err
    assert f"'{field}'" in err and "Fix:" in err
    assert not (tmp_path / "o").exists()


@requires_paintings
def test_real_paintings_top3():
    cat = catalog.build(CatalogConfig(source=str(PAINTINGS), top_k=3, seed=0))
    assert painters_of(cat) == {"Vincent_van_Gogh": 877, "Edgar_Degas": 702, "Pablo_Picasso": 439}
    assert cat.skipped.get("not_an_image_file") == 2  # README.md and artists.csv


def test_catalog_options_left_unset_keep_the_config_defaults():
    parser = cli.build_parser()
    unset = cli.catalog_config(parser.parse_args(["catalog", "src", "--out", "o"]), "src")
    assert unset == CatalogConfig(source="src")
    given = cli.catalog_config(parser.parse_args(["catalog", "src", "--out", "o", "--min-paintings", "40", "--split",
                                                  "0.7,0.2,0.1", "--seed", "3", "--top-k", "5"]), "src")
    assert (given.min_paintings, given.split, given.seed, given.top_k) == (40, (0.7, 0.2, 0.1), 3, 5)
