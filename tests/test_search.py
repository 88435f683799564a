"""Search: the space, class balancing, the feature cache, heads on features, the scikit-learn estimator, and a
small painter-count sweep on a real local Ray cluster with real MLflow."""

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from artnet import presets
from artnet.config import CatalogConfig, ConfigError, override
from artnet.data import catalog, demo_data
from artnet.search import embeddings, space
from artnet.search.estimator import HeadClassifier
from artnet.search import heads
from artnet.search.heads import Features, fit_head, logits_of
from artnet.train import balance
from conftest import bad_files


# ------------------------------------------------------------------------------------------------- pure parts

def test_space_parses_each_distribution_and_checks_fields_and_ranges():
    base = presets.preset("demo")
    dims = space.parse_space({"model.dropout": "uniform:0.1,0.5", "model.head_depth": "randint:0,2",
                              "train.class_balance": "choice:none,weights", "train.lr": "loguniform:1e-3,1e-1"}, base)
    assert [(d.field, d.kind, d.values) for d in dims] == [
        ("model.dropout", "uniform", (0.1, 0.5)), ("model.head_depth", "randint", (0, 2)),
        ("train.class_balance", "choice", ("none", "weights")), ("train.lr", "loguniform", (1e-3, 1e-1))]
    tune_space = space.to_tune(dims)
    assert {tune_space["model.head_depth"].sample() for _ in range(200)} == {0, 1, 2}  # both ends included
    for entries, field in (({"model.dropuot": "uniform:0.1,0.5"}, "model.dropuot"),  # not a field
                           ({"model.dropout": "uniform:0.1,1.5"}, "model.dropout"),  # 1.5 is no dropout rate
                           ({"train.class_balance": "choice:none,sqrt"}, "train.class_balance"),
                           ({"train.lr": "loguniform:0,0.1"}, "search space train.lr"),
                           ({"train.lr": "normal:0,1"}, "search space train.lr")):
        with pytest.raises(ConfigError) as err:
            space.parse_space(entries, base)
        assert field in str(err.value) and "Fix:" in str(err.value)


def test_space_entries_from_yaml_and_flags_later_wins():
    yaml_text = "model:\n  dropout: uniform:0.0,0.3\n  head_depth: [1, 2]\ntrain.lr: loguniform:0.001,0.01\n"
    entries = space.space_entries(["model.dropout=uniform:0.2,0.4"], yaml_text)
    assert entries == {"model.dropout": "uniform:0.2,0.4", "model.head_depth": "choice:1,2",
                       "train.lr": "loguniform:0.001,0.01"}
    assert space.space_entries([]) == space.DEFAULT_SPACE


def test_class_balance_rules():
    counts = np.array([90, 9, 1])
    weights = balance.class_weights(counts, "weights")
    np.testing.assert_allclose(weights * counts, counts.sum() / 3)  # every painter carries the same weight
    np.testing.assert_allclose((weights * counts).sum() / counts.sum(), 1.0)  # mean weight over the data is 1
    np.testing.assert_allclose(balance.logit_offsets(counts, "logit_adjust"), np.log(counts / 100), rtol=1e-6)
    assert (balance.class_weights(counts, "none") == 1).all() and (balance.logit_offsets(counts, "none") == 0).all()


def test_catalog_subset_relabels_by_name_and_keeps_splits(tmp_path):
    demo_data.write_demo_set(str(tmp_path / "d"), painters=4, per_painter=8, size=32)
    cat = catalog.build(CatalogConfig(source=str(tmp_path / "d")))
    keep = catalog.top_painters(cat.manifest, 2)
    sub, names = catalog.subset(cat.manifest, cat.painters, keep)
    assert names == sorted(keep) and set(sub["painter"].to_pylist()) == set(keep)
    assert [names[i] for i in sub["label"].to_pylist()] == sub["painter"].to_pylist()
    before = dict(zip(cat.manifest["key"].to_pylist(), cat.manifest["split"].to_pylist()))
    assert all(before[k] == s for k, s in zip(sub["key"].to_pylist(), sub["split"].to_pylist()))
    assert catalog.digest(sub) != catalog.digest(cat.manifest) and catalog.digest(sub) == catalog.digest(sub.slice(0))


# ----------------------------------------------------------------------------------------- heads on features

def clusters(n_per_class, dim=16, spread=1.0, seed=0):
    """Gaussian clusters, one per class: learnable features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (len(n_per_class), dim))
    x = np.concatenate([rng.normal(c, spread, (n, dim)) for c, n in zip(centres, n_per_class)]).astype(np.float32)
    y = np.concatenate([np.full(n, i) for i, n in enumerate(n_per_class)])
    order = rng.permutation(len(y))
    return x[order], y[order]


def head_accuracy(train, test, epochs=15, **train_sets):
    """(accuracy, balanced accuracy) on `test` of a head trained on `train`."""
    job = override(presets.preset("demo"), {"train.patience": "0", "train.lr": "0.05", **train_sets})
    fit = fit_head(Features(*train), 4, job.model, job.train, epochs)
    predicted = logits_of(fit.model, test[0]).argmax(axis=1)
    recall = [np.mean(predicted[test[1] == c] == c) for c in range(4)]
    return float(np.mean(predicted == test[1])), float(np.mean(recall))


def test_head_learns_features_and_not_shuffled_labels():
    x, y = clusters([60] * 4)
    train, test = (x[:160], y[:160]), (x[160:], y[160:])
    accuracy, _ = head_accuracy(train, test)
    shuffled, _ = head_accuracy((train[0], np.random.default_rng(1).permutation(train[1])), test)
    assert accuracy > 0.9 and shuffled < 0.5  # chance is 0.25


def test_head_trains_on_read_only_float16_features():
    """A trial's features are read-only views of the object store, float16 with search.feature_dtype: the
    head casts each batch, and neither trains nor scores worse than on float32 (read-only) arrays."""
    x, y = clusters([60] * 4)
    half = x.astype(np.float16)
    for array in (x, half):
        array.flags.writeable = False
    job = override(presets.preset("demo"), {"train.patience": "0", "train.lr": "0.05"})
    fits = [fit_head(Features(a[:160], y[:160]), 4, job.model, job.train, 15, val=Features(a[160:], y[160:]))
            for a in (x, half)]
    accuracy = [f.history[-1]["val_accuracy"] for f in fits]
    assert min(accuracy) > 0.9, accuracy
    assert abs(logits_of(fits[1].model, half[160:]) - logits_of(fits[1].model, x[160:])).max() < 0.1
    scores = heads.evaluate(fits[0].model, Features(x[160:], y[160:]), 4, batch_size=7)  # chunk by chunk
    assert scores["loss"] == pytest.approx(fits[0].history[-1]["val_loss"], rel=1e-6)


def test_logit_adjustment_lifts_the_small_painters():
    x, y = clusters([1000, 100, 20, 10], spread=3, dim=8, seed=3)
    tx, ty = clusters([100] * 4, spread=3, dim=8, seed=3)  # the same painters, balanced
    linear = {"model.head_depth": "0"}
    _, plain = head_accuracy((x, y), (tx, ty), epochs=20, **linear)
    _, adjusted = head_accuracy((x, y), (tx, ty), epochs=20, **linear, **{"train.class_balance": "logit_adjust"})
    assert adjusted > plain + 0.03, (plain, adjusted)  # measured 0.703 -> 0.772


def test_estimator_in_grid_search_and_pipeline():
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = clusters([40] * 4)
    names = np.array(["Degas", "Monet", "Picasso", "Van Gogh"])[y]  # string classes, as painters are
    pipe = make_pipeline(StandardScaler(), HeadClassifier(epochs=40, head_depth=0, lr=0.05))
    assert cross_val_score(pipe, x, names, cv=3).mean() > 0.9
    grid = GridSearchCV(HeadClassifier(epochs=40, lr=0.05), {"head_depth": [0, 1], "dropout": [0.0, 0.5]},
                        cv=2).fit(x, names)
    assert set(grid.best_estimator_.classes_) == set(names) and grid.best_score_ > 0.9
    proba = grid.predict_proba(x[:5])
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.slow
def test_estimator_passes_scikit_learn_checks():
    """All of scikit-learn's estimator checks (array-API input is skipped by scikit-learn itself)."""
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(HeadClassifier(epochs=5), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results
              if r["status"] == "failed" and r["check_name"] != "check_methods_sample_order_invariance"]
    assert len(results) > 40 and not failed, failed
    # That check wants the same scores to 1e-7 for rows in another order; a float32 matrix product may round a
    # row differently with its place in the kernel's tile (by 1 ulp, 6e-8, on an AMD EPYC): the same check at
    # float32's precision (scores that depended on the other rows, e.g. dropout left on, would differ by far more).
    x, y = clusters([20] * 3)
    est, order = HeadClassifier(epochs=5).fit(x, y), np.random.default_rng(0).permutation(len(x))
    for method in ("decision_function", "predict_proba", "predict"):
        scores = getattr(est, method)
        np.testing.assert_allclose(scores(x)[order], scores(x[order]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- feature cache

@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """4 synthetic painters x 12 paintings (one of them a truncated file), catalogued 60/20/20."""
    root = tmp_path_factory.mktemp("search")
    demo_data.write_demo_set(str(root / "data"), painters=4, per_painter=12, size=48)
    first = sorted((root / "data").iterdir())[0]
    (first / "truncated.jpg").write_bytes(bad_files()["truncated.jpg"])
    cat = catalog.build(CatalogConfig(source=str(root / "data"), split=(0.6, 0.2, 0.2), seed=2))
    catalog.write(cat, str(root / "catalog"), CatalogConfig(source=str(root / "data")))
    return root, cat


def tiny_job(root, **sets):
    from artnet.train import trainer

    base = {"catalog": str(root / "catalog"), "workdir": str(root / "work"), "data.image_size": "32",
            "data.decode_batch": "16"}
    return trainer.resolve(override(presets.preset("demo"), {**base, **sets}))


def part_files(directory):
    return sorted(p.name for p in Path(directory).rglob("*.parquet"))


def test_feature_cache_computes_once_and_serves_painter_subsets(painted, ray_local, tmp_path):
    root, cat = painted
    job = tiny_job(root)
    manifest = cat.manifest
    n_train = int(pc.sum(pc.equal(manifest["split"], "train")).as_py())
    first = embeddings.ensure(manifest, job, str(tmp_path / "cache"), views=2)
    assert first["computed"] + first["undecodable"] == manifest.num_rows + 2 * n_train
    assert first["undecodable"] >= 1 and first["reused"] == 0  # the truncated file, each of its views once
    files = part_files(first["directory"])

    again = embeddings.ensure(manifest, job, str(tmp_path / "cache"), views=2)
    keep = catalog.top_painters(manifest, 2)
    sub, names = catalog.subset(manifest, cat.painters, keep)
    subset = embeddings.ensure(sub, job, str(tmp_path / "cache"), views=2)
    assert again["computed"] == subset["computed"] == 0 and again["undecodable"] == 0
    assert part_files(first["directory"]) == files, "no backbone inference ran: no new feature files"

    data = embeddings.load(sub, subset["directory"], views=2)
    sub_train = int(pc.sum(pc.equal(sub["split"], "train")).as_py())
    assert len(data["train"].y) <= 3 * sub_train and set(data["train"].y) <= {0, 1}
    assert len(data["val"].y) + len(data["test"].y) <= sub.num_rows - sub_train
    assert data["train"].x.shape[1] == 16 and np.isfinite(data["train"].x).all()
    # One more view computes that view of the training images only, in the same cache.
    more = embeddings.ensure(manifest, job, str(tmp_path / "cache"), views=3)
    assert more["directory"] == first["directory"] and 0 < more["computed"] <= n_train
    assert more["reused"] == first["computed"] + first["undecodable"]
    # Another image size is another cache.
    other = embeddings.ensure(manifest, tiny_job(root, **{"data.image_size": "48"}), str(tmp_path / "cache"), views=0)
    assert other["directory"] != first["directory"] and other["computed"] > 0
    # float16 is another cache too, holding the same features rounded to float16.
    half = embeddings.ensure(manifest, tiny_job(root, **{"search.feature_dtype": "float16"}), str(tmp_path / "cache"),
                             views=0)
    assert half["directory"] not in (first["directory"], other["directory"]) and half["computed"] > 0
    wide, narrow = (embeddings.load(sub, d, 0, ("val",))["val"] for d in (first["directory"], half["directory"]))
    assert narrow.x.dtype == np.float16 and wide.x.dtype == np.float32 and (narrow.y == wide.y).all()
    np.testing.assert_allclose(narrow.x.astype(np.float32), wide.x, rtol=1e-3, atol=1e-4)


def synthetic_cache(directory, dtype, seed=0, views=2, dim=6):
    """A manifest of 5 painters x 6 paintings and a cache folder laid out as `ensure` writes it (rows in no
    order, spread over several files), with the features as float32 values; one painting is undecodable (not
    cached) and one pair is cached twice. Returns (manifest, {(image, view): float32 features})."""
    rng = np.random.default_rng(seed)
    n = 30
    manifest = pa.table({"uri": [f"s3://art/p{i % 5}/{i}.jpg" for i in range(n)], "row": pa.array([-1] * n, pa.int64()),
                         "label": pa.array([i % 5 for i in range(n)], pa.int32()),
                         "split": [("train", "train", "train", "val", "test")[i // 5 % 5] for i in range(n)]})
    pairs = embeddings.requested(manifest, views).select(["image", "view"]).to_pylist()
    pairs = [p for p in pairs if p["image"] != "s3://art/p3/13.jpg#-1"]  # undecodable
    values = {(p["image"], p["view"]): rng.standard_normal(dim).astype(np.float32) for p in pairs}
    rows = [pairs[i] for i in rng.permutation(len(pairs))] + [pairs[4]]  # a pair written twice
    folder = Path(directory) / embeddings.FEATURES
    folder.mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(len(rows)), 4)):
        x = np.stack([values[(rows[i]["image"], rows[i]["view"])] for i in part]).astype(dtype)
        pq.write_table(pa.table({"image": [rows[i]["image"] for i in part],
                                 "view": pa.array([rows[i]["view"] for i in part], pa.int32()),
                                 "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}),
                       folder / f"part-{k}.parquet", row_group_size=5)
    return manifest, values


def reference_load(manifest, values, views, splits):
    """What `load` means, written plainly: per split, the manifest's (image, view) pairs that are cached, in
    (image, view) order, with their painters."""
    out = {}
    for split in splits:
        rows = [r for r in manifest.to_pylist() if r["split"] == split]
        keys = sorted((f"{r['uri']}#{r['row']}", v, r["label"]) for r in rows
                      for v in range(views + 1 if split == "train" else 1))
        keys = [k for k in keys if k[:2] in values]
        out[split] = (np.array([values[k[:2]] for k in keys]).reshape(-1, 6), np.array([k[2] for k in keys]))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_load_reads_each_split_in_order_straight_from_the_cache(tmp_path, monkeypatch, dtype):
    """Batches of 3 rows (or whole row groups) over row groups of 5, files of ~20 rows: every wanted row lands in
    its place; float16 is the float32 features rounded to float16, and nothing else differs."""
    manifest, values = synthetic_cache(tmp_path, dtype)
    for batch, views, splits in ((3, 2, ("train", "val", "test")), (64, 2, ("train", "val", "test")),
                                 (3, 1, ("train", "val")), (3, 0, ("test",))):
        monkeypatch.setattr(embeddings, "READ_BATCH_ROWS", batch)
        got = embeddings.load(manifest, str(tmp_path), views, splits)
        want = reference_load(manifest, values, views, splits)
        assert list(got) == list(splits)
        for split in splits:
            x, y = want[split]
            assert got[split].x.dtype == dtype and got[split].x.flags.c_contiguous
            np.testing.assert_array_equal(got[split].x, x.astype(dtype))
            np.testing.assert_array_equal(got[split].y, y)
            assert got[split].y.dtype == np.int64
    # A painter subset reads only its own rows.
    sub = manifest.filter(pc.is_in(manifest["label"], pa.array([1, 4], pa.int32())))
    got, want = embeddings.load(sub, str(tmp_path), 2), reference_load(sub, values, 2, ("train", "val", "test"))
    for split in want:
        np.testing.assert_array_equal(got[split].x, want[split][0].astype(dtype))


def test_load_refuses_a_folder_that_mixes_float16_and_float32(tmp_path):
    from artnet.errors import UserError

    manifest, _ = synthetic_cache(tmp_path, np.float32)
    part = tmp_path / embeddings.FEATURES / "part-1.parquet"
    table = pq.read_table(part)
    pq.write_table(table.set_column(2, "features", table["features"].cast(pa.list_(pa.float16(), 6))), part)
    with pytest.raises(UserError, match="float16|halffloat"):
        embeddings.load(manifest, str(tmp_path), 2)


def test_float16_and_float32_features_are_separate_caches(painted):
    root, _ = painted
    wide, half = (embeddings.spec_of(tiny_job(root, **{"search.feature_dtype": d}), 0) for d in ("float32", "float16"))
    assert (wide.dtype, half.dtype) == ("float32", "float16") and wide.digest() != half.digest()
    # A float32 cache keeps the folder it had before the dtype was part of the spec.
    import dataclasses
    import hashlib
    import json

    before = {k: v for k, v in dataclasses.asdict(wide).items() if k != "dtype"}
    assert wide.digest() == hashlib.blake2b(json.dumps(before, sort_keys=True).encode(), digest_size=8).hexdigest()
    with pytest.raises(ConfigError, match="search.feature_dtype"):
        tiny_job(root, **{"search.feature_dtype": "bfloat16"}).validate()


def test_features_are_written_in_files_of_at_least_the_minimum_rows(ray_local, tmp_path, monkeypatch):
    """Blocks of 4 rows (as decode blocks come) are bundled into files of at least MIN_ROWS_PER_FILE rows; only
    a write's last file may hold fewer."""
    monkeypatch.setattr(embeddings, "MIN_ROWS_PER_FILE", 40)

    def rows(batch):
        ids = batch["id"]
        x = np.repeat(ids[:, None], 3, axis=1).astype(np.float16)
        return pa.table({"image": [f"i{i}" for i in ids], "view": pa.array(np.zeros(len(ids), np.int32)),
                         "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3)})

    ds = ray_local.data.range(200, override_num_blocks=50).map_batches(rows, batch_size=None, batch_format="numpy")
    embeddings.write_features(ds, str(tmp_path / "features"))
    counts = sorted(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "features").glob("*.parquet"))
    assert sum(counts) == 200 and len(counts) <= 5, counts
    assert all(c >= 40 for c in counts[1:]), counts
    table = pq.read_table(tmp_path / "features")
    assert table.schema.field("features").type == pa.list_(pa.float16(), 3)
    assert sorted(table["image"].to_pylist()) == sorted(f"i{i}" for i in range(200))


def test_a_head_trial_asks_for_memory_and_reads_the_one_object_store_copy(ray_local, monkeypatch):
    from artnet.search import tune

    job = override(presets.preset("demo"), {"search.max_concurrent": "1"})
    x, y = clusters([30] * 4, dim=32)
    data = {"train": Features(x[:100].astype(np.float16), y[:100]), "val": Features(x[100:], y[100:])}
    refs = {k: ray_local.put(v) for k, v in data.items()}
    seen, put = {}, ray_local.put

    def no_features_put(value, *args, **kwargs):
        assert not isinstance(value, Features), "features put again"
        return put(value, *args, **kwargs)

    monkeypatch.setattr(ray_local, "put", no_features_put)
    monkeypatch.setattr(tune, "_run_tuner", lambda job, trainable, *args: seen.setdefault("trainable", trainable))
    dims = space.parse_space({"model.head_width": "choice:64,2048"}, job)
    tune.search_count(job, dims, refs, 4, "memory", "parent", "sqlite:///unused.db")
    bundle = seen["trainable"]._resources.bundles[0]
    assert bundle["CPU"] == 1 and bundle["memory"] >= heads.TRIAL_PROCESS_BYTES
    wider = heads.trial_memory(data["train"], 1000, 2048, 3) - heads.trial_memory(data["train"], 4, 64, 1)
    assert wider > 0
    # What a trial gets: read-only views of the object store's copy.
    assert not ray_local.get(refs["train"]).x.flags.writeable


def test_head_transplant_gives_the_classifier_the_heads_predictions(painted, tmp_path):
    from artnet.model import backbones, classifier

    root, _ = painted
    job = tiny_job(root, **{"model.head_depth": "1"})
    spec = backbones.get("tiny")
    head = classifier.build_head(job.model, 4, 16)
    head.save_weights(tmp_path / "head.weights.h5")
    model = classifier.build_classifier(spec, job.model, 4, 32)
    classifier.load_head(model, job.model, 4, str(tmp_path / "head.weights.h5"))
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    features = model.get_layer("backbone")(model.get_layer("preprocess")(images), training=False)
    np.testing.assert_allclose(model(images, training=False), head(features, training=False), atol=1e-5)


# -------------------------------------------------------------------------------------------------- sweeps

@pytest.mark.slow
@pytest.mark.long
def test_sweep_over_two_painter_counts(painted, ray_local, monkeypatch):
    import mlflow

    from artnet.search import tune

    root, cat = painted
    loads = []
    real_load = embeddings.load

    def recording_load(manifest, directory, views, splits=("train", "val", "test")):
        loads.append((splits, time.time()))
        return real_load(manifest, directory, views, splits)

    monkeypatch.setattr(embeddings, "load", recording_load)
    job = tiny_job(root, name="sweep", **{"search.painter_counts": "2,4", "search.samples": "4",
                                          "search.epochs": "8", "search.grace_epochs": "1", "search.views": "1",
                                          "search.finetune": "false", "train.patience": "0"})
    dims = space.parse_space({"train.lr": "choice:0.00001,0.3", "model.head_depth": "choice:0,1"}, job)
    result = tune.sweep(job, dims)

    rows = result["rows"]
    assert [r["painters"] for r in rows] == [2, 4] and all(r["trials"] == 4 for r in rows)
    assert sum(r["stopped_early"] for r in rows) >= 1, "ASHA stopped a poor trial"
    # The test split is read once per count, after that count's trials all ended.
    test_reads = [t for splits, t in loads if "test" in splits]
    assert len(test_reads) == 2 and all("test" not in s for s, _ in loads if s != ("test",))
    client = mlflow.MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("artnet").experiment_id
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result['run_id']}'")
    assert len(trials) == 8
    ends = max(r.info.end_time for r in trials if r.data.tags.get("artnet.painter_count") == "2") / 1000
    assert test_reads[0] >= ends - 1
    best = {}
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert history and "train.lr" in run.data.params
        count = run.data.tags["artnet.painter_count"]
        best.setdefault(count, []).append(min(m.value for m in history))
    # The chosen config is the best on validation, and its figure is the one reported.
    for row in rows:
        assert row["val_metric"] == pytest.approx(min(best[str(row["painters"])]), rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"summary.csv", "summary.md", "summary.json", "accuracy_by_painters.png"} <= artifacts
    assert result["features"]["computed"] > 0

    # A second sweep over the same data computes no features.
    again = tune.sweep(override(job, {"name": "sweep2", "search.samples": "1"}), dims)
    assert again["features"]["computed"] == 0 and again["features"]["reused"] > 0


def test_estimator_from_a_job_takes_its_head_and_training_settings():
    from artnet.search import estimator

    job = override(presets.preset("mobilenet"), {"model.head_depth": "2", "train.class_balance": "logit_adjust",
                                                 "search.epochs": "7"})
    clf = estimator.from_job(job)
    model, train = clf.configs()
    assert (model.head_depth, model.head_width, model.dropout) == (2, job.model.head_width, job.model.dropout)
    assert (train.lr, train.class_balance, clf.epochs) == (job.train.lr, "logit_adjust", 7)


@pytest.mark.slow
@pytest.mark.long
def test_finetune_fields_run_training_jobs_as_tune_trials(painted, ray_local):
    """`train.unfreeze_blocks` in the space: each fine-tuning trial is an `artnet train` job (Ray Train under
    Tune), nested in the sweep's MLflow run; the chosen one is the best on validation and its test figures and
    model are the ones reported."""
    import mlflow

    from artnet.search import tune

    root, _ = painted
    job = tiny_job(root, name="ftsweep", **{"search.painter_counts": "4", "search.samples": "2",
                                            "search.epochs": "3", "search.views": "0", "search.finetune_samples": "2",
                                            "train.finetune_epochs": "2", "train.patience": "0"})
    dims = space.parse_space(space.space_entries(["train.unfreeze_blocks=choice:1,2"]), job)
    assert {d.field for d in space.split(dims)[0]} == set(space.DEFAULT_SPACE)  # the head space is kept
    result = tune.sweep(job, dims)

    row = result["rows"][0]
    assert row["finetune_trials"] == 2 and "train.unfreeze_blocks=" in row["best_config"]
    client = mlflow.MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name("artnet").experiment_id
    jobs = [r for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result['run_id']}'")
            if r.data.tags.get("artnet.job", "").startswith("ftsweep-4painters-finetune-")]
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in jobs)
    best_val = {r.info.run_id: min(m.value for m in client.get_metric_history(r.info.run_id, "val_loss")) for r in jobs}
    chosen = min(best_val, key=best_val.get)
    assert row["model_uri"] == client.get_run(chosen).data.tags["artnet.model_uri"]
    assert row["finetuned_test_accuracy"] == pytest.approx(client.get_run(chosen).data.metrics["test_accuracy"])
    assert all(client.get_run(r.info.run_id).data.params["train.head_epochs"] == "0" for r in jobs)


@pytest.mark.slow
def test_optuna_search_runs_the_head_trials(painted, ray_local):
    """`search.algorithm=optuna` (installed with the test extras) drives the same head trials to the end."""
    pytest.importorskip("optuna")
    from artnet.search import tune

    root, _ = painted
    job = tiny_job(root, name="optuna", **{"search.painter_counts": "4", "search.samples": "4", "search.epochs": "3",
                                           "search.views": "0", "search.algorithm": "optuna",
                                           "search.finetune": "false", "search.max_concurrent": "1"})
    dims = space.parse_space({"train.lr": "loguniform:0.001,0.3", "model.dropout": "uniform:0.0,0.5"}, job)
    row = tune.sweep(job, dims)["rows"][0]
    assert row["trials"] == 4 and "train.lr=" in row["best_config"] and row["head_test_accuracy"] is not None
