import threading
from collections import Counter

import numpy as np
import pytest

from artnet.config import CatalogConfig, PipelineConfig
from artnet.data import catalog, pipeline, storage
from conftest import PAINTINGS, bad_files, odd_but_good_files, requires_paintings, write_folder_set

PAINTERS = {"Claude_Monet": 14, "Edgar_Degas": 10}
CFG = PipelineConfig(image_size=48, batch_size=8, decode_batch=4, seed=0)
ALL_TRAIN = CatalogConfig(source="", split=(1.0, 0.0, 0.0))


def collect(ds, by_key: bool = False) -> dict[str, np.ndarray]:
    """Every row of one pass; `by_key` sorts them (parallel decode tasks finish in any order)."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label", "key")}
    order = np.argsort(out["key"]) if by_key else slice(None)
    return {k: v[order] for k, v in out.items()}


def manifest_of(source: str):
    cfg = CatalogConfig(source=source, split=(1.0, 0.0, 0.0))
    return catalog.build(cfg).manifest


def test_local_folder_with_bad_and_odd_images(tmp_path, ray_local):
    write_folder_set(tmp_path, PAINTERS, extra={"Claude_Monet": bad_files(), "Edgar_Degas": odd_but_good_files()})
    manifest = manifest_of(str(tmp_path))
    bad = pipeline.new_tally()
    out = collect(pipeline.build_dataset(manifest, "train", CFG, train=True, bad_images=bad))
    good = sum(PAINTERS.values()) + len(odd_but_good_files())
    assert out["image"].shape == (good, 48, 48, 3) and out["image"].dtype == np.uint8
    assert Counter(out["label"].tolist()) == {0: 14, 1: 10 + len(odd_but_good_files())}
    summary = ray_local.get(bad.summary.remote())
    assert summary["total"] == len(bad_files())
    assert summary["by_reason"] == {"empty": 1, "not_an_image": 2, "corrupt": 2, "too_large": 1}
    assert sorted(uri.rsplit("/", 1)[1] for uri in summary["files"]) == sorted(bad_files())
    assert len(set(out["key"].tolist())) == good


def test_missing_object_is_counted_not_fatal(tmp_path, ray_local):
    write_folder_set(tmp_path, PAINTERS)
    manifest = manifest_of(str(tmp_path))
    (tmp_path / "Edgar_Degas" / "Edgar_Degas_1.jpg").unlink()  # vanished after cataloguing
    bad = pipeline.new_tally()
    out = collect(pipeline.build_dataset(manifest, "train", CFG, train=False, bad_images=bad))
    assert len(out["label"]) == sum(PAINTERS.values()) - 1
    assert ray_local.get(bad.summary.remote())["by_reason"] == {"unreadable": 1}


def test_eval_is_deterministic_and_train_shuffles_each_pass(tmp_path, ray_local):
    write_folder_set(tmp_path, PAINTERS)
    manifest = manifest_of(str(tmp_path))
    evaluation = pipeline.build_dataset(manifest, "train", CFG, train=False)
    a, b = collect(evaluation, by_key=True), collect(evaluation, by_key=True)
    np.testing.assert_array_equal(a["image"], b["image"])
    train = pipeline.build_dataset(manifest, "train", PipelineConfig(image_size=48, decode_batch=4), train=True)
    orders = [collect(train)["key"].tolist() for _ in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) and len({tuple(o) for o in orders}) > 1


def test_pipeline_reads_from_s3(tmp_path, s3_bucket, ray_local):
    write_folder_set(tmp_path, PAINTERS, extra={"Claude_Monet": {"truncated.jpg": bad_files()["truncated.jpg"]}})
    for f in tmp_path.rglob("*.jpg"):
        storage.write_bytes(f"s3://{s3_bucket}/pipeline/{f.relative_to(tmp_path)}", f.read_bytes())
    manifest = manifest_of(f"s3://{s3_bucket}/pipeline")
    bad = pipeline.new_tally()
    local = collect(pipeline.build_dataset(manifest_of(str(tmp_path)), "train", CFG, train=False), by_key=True)
    remote = collect(pipeline.build_dataset(manifest, "train", CFG, train=False, bad_images=bad), by_key=True)
    np.testing.assert_array_equal(remote["image"], local["image"])
    assert ray_local.get(bad.summary.remote())["by_reason"] == {"corrupt": 1}


def test_pipeline_reads_image_bytes_inside_parquet(tmp_path, ray_local):
    from test_catalog import hf_parquet

    hf_parquet(tmp_path / "a.parquet", [0, 1, 0, 1, 1, 0, 0], ["Monet", "Degas"])
    manifest = manifest_of(str(tmp_path))
    out = collect(pipeline.build_dataset(manifest, "train", CFG, train=False))
    assert out["image"].shape == (7, 48, 48, 3)
    assert sorted(out["label"].tolist()) == sorted([1, 0, 1, 0, 0, 1, 1])  # label = sorted name index


def test_two_consumers_cover_the_epoch_without_overlap(tmp_path, ray_local):
    write_folder_set(tmp_path, {"A": 23, "B": 18})
    manifest = manifest_of(str(tmp_path))
    ds = pipeline.build_dataset(manifest, "train", CFG, train=True)
    seen: list[list[str]] = [[], []]

    def consume(i, it):
        for batch in it.iter_batches(batch_size=4, batch_format="numpy"):
            seen[i].extend(batch["key"].tolist())

    threads = [threading.Thread(target=consume, args=(i, it)) for i, it in enumerate(ds.streaming_split(2, equal=False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen[0] and seen[1], "both consumers got data"
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(manifest["key"].to_pylist())


def test_empty_split_is_a_clear_error(tmp_path, ray_local):
    write_folder_set(tmp_path, {"A": 3})
    with pytest.raises(ValueError, match="no 'val' images"):
        pipeline.build_dataset(manifest_of(str(tmp_path)), "val", CFG, train=False)


@requires_paintings
def test_real_paintings_stream_through(ray_local):
    cat = catalog.build(CatalogConfig(source=str(PAINTINGS), top_k=3))
    bad = pipeline.new_tally()
    out = collect(pipeline.build_dataset(cat.manifest, "val", PipelineConfig(image_size=96), train=True,
                                         bad_images=bad))
    expected = sum(s == "val" for s in cat.manifest["split"].to_pylist())
    assert out["image"].shape == (expected, 96, 96, 3)
    assert ray_local.get(bad.summary.remote())["total"] == 0
    assert set(out["label"].tolist()) == {0, 1, 2}


def test_decode_tasks_are_large_but_every_cpu_gets_several():
    assert pipeline.decode_block_rows(1_000_000, 128, 16) == 128
    assert pipeline.decode_block_rows(200, 128, 2) == 25, "4 tasks per CPU, not 2 tasks for the whole split"
    assert pipeline.decode_block_rows(200, 128, 64) == 16, "not 1-image tasks on a large cluster"
    assert pipeline.decode_block_rows(40, 8, 4) == 8, "decode_batch stays the upper bound"
    assert pipeline.decode_block_rows(0, 128, 2) == 16
