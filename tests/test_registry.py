"""Registry promotion and prediction with a real `mlflow server` on loopback (what a cluster shares), two really
trained tiny models of different quality, a real local Ray cluster and a loopback S3 endpoint. The same flow on a
local sqlite store is the README's (tests/test_readme.py runs its promote and predict steps)."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from artnet import cli
from artnet.config import RegistryConfig
from artnet.data import catalog, storage
from artnet.errors import UserError
from artnet.model import bundle
from artnet.serve import predict, registry
from artnet.train import trainer
from conftest import LEARNABLE, bad_files, jpeg_bytes, painting, tiny_job, write_small_catalog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, mlflow_server):
    """A good model (trained) and a bad one (a learning rate that barely moves it) in one tracking server."""
    root = tmp_path_factory.mktemp("registry")
    cat = write_small_catalog(root)
    uri = mlflow_server
    runs = {}
    for name, sets in {"good": LEARNABLE,
                       "bad": {"train__lr": "1e-6", "train__head_epochs": "1", "train__finetune_epochs": "0"}}.items():
        job = tiny_job(cat, root / "work", name, tracking__tracking_uri=uri, **sets)
        runs[name] = trainer.fit(job)
    return {"uri": uri, "catalog": cat, "root": root, **runs}


def config(trained, name, **changes):
    return RegistryConfig(model_name=name, tracking_uri=trained["uri"], **changes)


def alias_version(trained, name):
    import mlflow

    return str(mlflow.MlflowClient(trained["uri"]).get_model_version_by_alias(name, registry.CHAMPION).version)


def test_the_better_model_becomes_champion_a_worse_one_is_refused_and_rollback_restores(trained):
    import mlflow

    client = mlflow.MlflowClient(trained["uri"])
    good, bad = trained["good"]["run_id"], trained["bad"]["run_id"]
    cfg = config(trained, "painters")

    first = registry.promote(bad, cfg)
    assert first.promoted and first.reason == "first champion" and alias_version(trained, "painters") == "1"

    second = registry.promote(good, cfg)
    assert second.promoted and second.champion["version"] == "1"
    assert second.challenger["score"] > second.champion["score"]  # measured, not assumed
    assert alias_version(trained, "painters") == "2"
    record = json.loads(client.get_model_version("painters", "2").tags[registry.DECISION_TAG])
    assert record["promoted"] and record["champion_version"] == "1"
    assert record["score"] == second.challenger["score"] and record["champion_score"] == second.champion["score"]
    tags = client.get_model_version("painters", "2").tags
    assert tags["artnet.painter_count"] == "3" and tags["artnet.backbone"] == "tiny"
    assert "artnet.manifest_sha256" in tags
    assert "metric.test_accuracy" in tags and "metric.calibration_temperature" in tags

    third = registry.promote(bad, cfg)  # the bad model again, as version 3
    assert not third.promoted and third.challenger["version"] == "3"
    assert alias_version(trained, "painters") == "2"
    assert not json.loads(client.get_model_version("painters", "3").tags[registry.DECISION_TAG])["promoted"]

    versions_before = len(client.search_model_versions("name='painters'"))
    dry = registry.promote(good, cfg, dry_run=True)
    assert dry.dry_run and not dry.promoted  # same score as the champion (it is the same model): no margin
    assert len(client.search_model_versions("name='painters'")) == versions_before

    assert registry.rollback(cfg) == ("2", "1")
    assert alias_version(trained, "painters") == "1"
    with pytest.raises(UserError, match="first champion"):
        registry.rollback(cfg)


def test_margin_keeps_a_barely_better_challenger_out(trained):
    cfg = config(trained, "strict", margin=0.999)
    registry.promote(trained["bad"]["run_id"], cfg)
    decision = registry.promote(trained["good"]["run_id"], cfg)
    assert not decision.promoted and decision.challenger["score"] > decision.champion["score"]
    assert alias_version(trained, "strict") == "1"


def test_concurrent_promotions_leave_champion_on_an_evaluated_version(trained):
    import mlflow

    cfg = config(trained, "race")
    errors = []

    def promote(run_id):
        try:
            registry.promote(run_id, cfg)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(trained[k]["run_id"],)) for k in ("good", "bad")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    client = mlflow.MlflowClient(trained["uri"])
    champion = client.get_model_version_by_alias("race", registry.CHAMPION)
    evaluated = [k for k in champion.tags if k.startswith("artnet.eval.")]
    assert evaluated and json.loads(champion.tags[registry.DECISION_TAG])["promoted"]
    assert len(client.search_model_versions("name='race'")) == 2


def test_a_model_for_other_painters_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    from artnet.data import demo_data
    from artnet.config import CatalogConfig

    demo_data.write_demo_set(str(other / "data"), painters=2, per_painter=10, size=48)
    catalog.write(catalog.build(CatalogConfig(source=str(other / "data"), split=(0.5, 0.2, 0.3))),
                  str(other / "catalog"), CatalogConfig(source=str(other / "data")))
    cfg = config(trained, "elsewhere", eval_catalog=str(other / "catalog"))
    with pytest.raises(UserError, match="knows 3 painters.*has 2"):
        registry.promote(trained["good"]["run_id"], cfg)


def test_champion_predictions_equal_the_in_memory_model(trained):
    import keras

    cfg = config(trained, "same")
    registry.promote(trained["good"]["run_id"], cfg)
    manifest, painters = catalog.load(trained["catalog"])
    uris = [r["uri"] for r in manifest.to_pylist() if r["split"] == "test"][:6]
    served = predict.predict_here(bundle.load(registry.champion_uri("same"), trained["uri"]), uris, k=3)

    in_memory = keras.models.load_model(os.path.join(trained["good"]["checkpoint"], "model.keras"))
    meta = bundle.read_metadata(trained["good"]["model_uri"])
    local = bundle.ModelBundle(in_memory, painters, meta["image_size"], "tiny", False,
                               bundle.Calibration(**meta["calibration"]), "checkpoint")
    images = np.stack([local.preprocess(storage.read_bytes(u), 10**8) for u in uris])
    expected = local.probabilities(images)
    got = np.array([[t["probability"] for t in row] for row in served["top_k"].to_pylist()])
    assert served["painter"].to_pylist() == [painters[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(got, -np.sort(-expected, axis=1)[:, :3], atol=1e-5)
    assert meta["painters"] == painters  # the names travel with the model, in label order


def test_batch_prediction_over_an_s3_prefix_writes_one_row_per_object(trained, s3_bucket, ray_local):
    model_uri = trained["good"]["model_uri"]
    prefix = f"s3://{s3_bucket}/to-predict"
    good = {f"good_{i}.jpg": jpeg_bytes(painting(100 + i, colour=(200, 40, 40))) for i in range(40)}
    objects = {**good, **bad_files(), "notes.txt": b"not a painting"}
    for name, data in objects.items():
        storage.write_bytes(f"{prefix}/{name}", data)
    out = f"s3://{s3_bucket}/predictions"
    assert predict.predict(model_uri, [prefix], tracking_uri=trained["uri"], out=out) is None
    rows = {r["uri"]: r for r in predict.read_predictions(out).to_pylist()}
    assert sorted(rows) == sorted(f"{prefix}/{name}" for name in objects)
    errors = {uri.rsplit("/", 1)[1] for uri, r in rows.items() if r["error"]}
    assert errors == set(bad_files()) | {"notes.txt"}
    painters = bundle.read_metadata(model_uri)["painters"]
    for name in good:
        row = rows[f"{prefix}/{name}"]
        assert row["painter"] in painters and len(row["top_k"]) == 3 and 0 < row["probability"] <= 1


def test_cli_predict_and_promote(trained, capsys, tmp_path):
    root = Path(trained["catalog"]).parent / "data"
    image = str(next(root.rglob("*_1.jpg")))
    assert cli.main(["predict", image, "--model", trained["good"]["model_uri"], "--tracking-uri", trained["uri"],
                     "--format", "json", "--top-k", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["uri"].endswith("_1.jpg") and len(row["top_k"]) == 2

    import mlflow

    mlflow.set_tracking_uri(trained["uri"])
    folder = mlflow.artifacts.download_artifacts(trained["good"]["model_uri"], dst_path=str(tmp_path / "model"))
    explained = tmp_path / "explained"
    assert cli.main(["predict", image, "--model", folder, "--explain", str(explained)]) == 0  # a copied model folder
    out = capsys.readouterr().out
    assert "_1.jpg" in out and "1 answered" in out
    assert (explained / (Path(image).stem + ".gradcam.png")).stat().st_size > 0

    assert cli.main(["promote", trained["good"]["run_id"], "--model-name", "cli", "--tracking-uri", trained["uri"],
                     "--dry-run"]) == 0
    assert "would become champion" in capsys.readouterr().out
    assert cli.main(["promote", trained["good"]["run_id"], "--model-name", "cli", "--metric", "speed"]) == 2
    assert "registry.metric" in capsys.readouterr().err
    assert cli.main(["predict", image, "--model", "x", "--format", "parquet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_temperature_scaling_lowered_validation_nll(trained):
    import mlflow

    m = mlflow.MlflowClient(trained["uri"]).get_run(trained["good"]["run_id"]).data.metrics
    assert m["calibration_val_nll_after"] <= m["calibration_val_nll_before"]
    assert m["calibration_temperature"] != 1.0
