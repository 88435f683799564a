import threading
from collections import Counter

import numpy as np
import pytest

from artnet import cli
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
    assert cli.bad_counts(summary) == "6 (corrupt 2, empty 1, not_an_image 2, too_large 1)"  # as the console says it
    assert cli.bad_counts({"total": 0, "by_reason": {}}) == "0"
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


def test_a_seeded_run_repeats_and_each_pass_differs(tmp_path, ray_local):
    """With a seed, order and augmentation change from pass to pass (every epoch sees new views) yet a new
    dataset of the same seed repeats the same sequence of passes."""
    write_folder_set(tmp_path, {"A": 20, "B": 20})
    manifest = manifest_of(str(tmp_path))
    cfg = PipelineConfig(image_size=48, decode_batch=4, seed=7)
    first, second = (pipeline.build_dataset(manifest, "train", cfg, train=True) for _ in range(2))
    passes = [collect(first, by_key=True) for _ in range(2)]
    again = [collect(second, by_key=True) for _ in range(2)]
    for p, q in zip(passes, again):
        np.testing.assert_array_equal(p["key"], q["key"])
        np.testing.assert_array_equal(p["image"], q["image"])
    assert not np.array_equal(passes[0]["image"], passes[1]["image"])
    changed = [not np.array_equal(a, b) for a, b in zip(passes[0]["image"], passes[1]["image"])]
    assert sum(changed) >= 0.9 * len(changed), "each image augmented anew in the second pass"
    # Each decode task takes its rows from the pass's permutation, so the images decoded together (and batched
    # together) change from pass to pass, not only the order in which tasks finish.
    tasks = [{frozenset(b["key"].tolist()) for b in first.iter_batches(batch_size=None, batch_format="numpy")}
             for _ in range(2)]
    assert tasks[0] != tasks[1]
    orders = [pipeline.pass_order(40, 7, p) for p in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(40)) and list(orders[0]) != list(orders[1])


def test_decode_tasks_each_take_one_block_so_all_cpus_decode(tmp_path, ray_local):
    """As many decode tasks as `decode_block_rows` blocks (here 40 rows / 4 = 10): the tasks spread over the
    CPUs. (A batch size on the decode stage once made Ray bundle several blocks into one task: one CPU decoded
    while the other idled.)"""
    write_folder_set(tmp_path, {"A": 20, "B": 20})
    ds = pipeline.build_dataset(manifest_of(str(tmp_path)), "train", PipelineConfig(image_size=32, decode_batch=4),
                                train=True)
    assert len(collect(ds)["key"]) == 40
    assert "load_images): 10 tasks executed" in ds.stats()


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


def test_images_inside_parquet_are_read_row_group_by_row_group():
    """A row group is the smallest read Parquet allows: each pass orders rows group by group (groups and rows
    within each in a new random order), so a decode task of `step` rows reads few groups, and each group is read
    by at most 1 + its rows / step tasks, where a plain permutation reads one group per row."""
    groups, step, rows_per_group = np.repeat(np.arange(30), 50), 32, 50

    def reads(order):  # row-group reads of one pass: the distinct groups of each decode task's rows
        return sum(len(set(groups[order[i:i + step]])) for i in range(0, len(order), step))

    orders = [pipeline.pass_order(len(groups), 0, p, groups) for p in range(2)]
    assert reads(orders[0]) <= 30 * (1 + -(-rows_per_group // step))
    assert reads(np.random.default_rng(0).permutation(len(groups))) > 10 * reads(orders[0])
    assert sorted(orders[0]) == list(range(len(groups)))
    first_group = orders[0][:rows_per_group]
    assert len(set(groups[first_group])) == 1 and list(first_group) != sorted(first_group), "rows mixed within"
    assert list(dict.fromkeys(groups[orders[0]])) != list(dict.fromkeys(groups[orders[1]])), "new group order"


def test_a_parquet_training_pass_reads_every_image_once(tmp_path, ray_local):
    from test_catalog import hf_parquet  # row groups of 3 images

    labels = [0, 1, 0, 1, 1, 0, 0, 1, 1, 0]
    hf_parquet(tmp_path / "a.parquet", labels, ["Monet", "Degas"])
    hf_parquet(tmp_path / "b.parquet", labels[:7], ["Monet", "Degas"])
    manifest = manifest_of(str(tmp_path))
    groups = pipeline.row_groups(manifest, storage.S3Settings.from_env())
    assert len(set(groups.tolist())) == 4 + 3
    assert pipeline.mixing_rows(manifest, CFG) == 4 * CFG.decode_batch
    ds = pipeline.build_dataset(manifest, "train", CFG, train=True)
    for _ in range(2):
        out = collect(ds, by_key=True)
        assert out["key"].tolist() == sorted(manifest["key"].to_pylist())
        assert sorted(out["label"].tolist()) == sorted(manifest["label"].to_pylist())


def test_two_consumers_cover_the_epoch_without_overlap(tmp_path, ray_local):
    write_folder_set(tmp_path, {"A": 23, "B": 18})
    manifest = manifest_of(str(tmp_path))
    ds = pipeline.build_dataset(manifest, "train", CFG, train=True)
    seen: list[list[list[str]]] = [[[], []], [[], []]]  # [pass][consumer]

    def consume(i, it):
        for epoch in range(2):  # as Ray Train's workers do: each pass is one execution shared by both
            for batch in it.iter_batches(batch_size=4, batch_format="numpy"):
                seen[epoch][i].extend(batch["key"].tolist())

    threads = [threading.Thread(target=consume, args=(i, it)) for i, it in enumerate(ds.streaming_split(2, equal=False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for epoch in seen:
        assert epoch[0] and epoch[1], "both consumers got data"
        assert not set(epoch[0]) & set(epoch[1])
        assert sorted(epoch[0] + epoch[1]) == sorted(manifest["key"].to_pylist())
    assert seen[0][0] + seen[0][1] != seen[1][0] + seen[1][1], "the second pass came in a new order"


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




def test_datasets_run_without_the_backpressure_that_spins_ray_datas_scheduler(tmp_path, ray_local):
    """Ray Data's downstream-capacity backpressure makes the scheduling loop spin on finished decode tasks while
    the trainer is slower than decode (measured in `bench/one_node.py`: most of a core in the coordinator for
    the first seconds of every epoch). Every artnet dataset must run with it off; a pass still yields all rows."""
    write_folder_set(tmp_path, PAINTERS)
    ds = pipeline.build_dataset(manifest_of(str(tmp_path)), "train", CFG, train=True)
    assert ds.context.downstream_capacity_backpressure_ratio is None
    assert len(collect(ds)["key"]) == sum(PAINTERS.values())
