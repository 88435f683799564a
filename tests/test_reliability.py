"""A run never "succeeds" on lost data: the bad-data budget, fail-fast on reads that all fail, a failed job's
MLflow run marked FAILED with the reason, a tracking server that goes away mid-run. Real local Ray cluster, real
MLflow (sqlite, or a server on loopback), real files."""

import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from artnet.data import storage
from artnet.errors import find_user_error
from artnet.train import trainer
from conftest import LEARNABLE, tiny_job, write_small_catalog

pytestmark = pytest.mark.slow


def failed_run(result_uri, job_name):
    import mlflow

    client = mlflow.MlflowClient(result_uri)
    experiment = client.get_experiment_by_name("artnet").experiment_id
    return client.search_runs([experiment], f"tags.`artnet.job` = '{job_name}'")[0]


def test_over_the_bad_data_budget_the_run_stops_naming_the_cause(tmp_path, ray_local):
    cat = write_small_catalog(tmp_path)  # 72 good paintings and 2 broken files
    job = tiny_job(cat, tmp_path / "work", "budget", data__max_bad_share="0.01")
    with pytest.raises(Exception) as raised:
        trainer.fit(job)
    error = find_user_error(raised.value)
    assert error is not None, raised.value
    text = str(error)
    # It stops as soon as the budget is spent (here at the first broken file), not at the end of the epoch.
    assert re.search(r"[12] of 74 images are unusable, over the budget of 1%", text) and "corrupt files" in text
    assert "zero_byte.jpg" in text or "truncated.jpg" in text
    run = failed_run(trainer.absolute_paths(job).tracking.tracking_uri or
                     f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}", "budget")
    assert run.info.status == "FAILED" and "over the budget" in run.data.tags["artnet.failure"]


def test_the_same_run_within_budget_completes_and_counts_what_it_skipped(tmp_path, ray_local):
    cat = write_small_catalog(tmp_path)
    result = trainer.fit(tiny_job(cat, tmp_path / "work", "within", train__head_epochs=1, train__finetune_epochs=0))
    assert result["bad_images"]["total"] == 2 and result["bad_images"]["by_cause"] == {"corrupt files": 2}


def test_reads_that_all_fail_stop_the_run_at_once(tmp_path, ray_local):
    cat = write_small_catalog(tmp_path)
    shutil.rmtree(tmp_path / "data")  # every file the catalog lists is gone
    job = tiny_job(cat, tmp_path / "work", "gone", data__fail_fast_reads="8", data__max_bad_share="0.9")
    with pytest.raises(Exception) as raised:
        trainer.fit(job)
    error = find_user_error(raised.value)
    assert error is not None and "the first 8 images all failed; mostly missing objects" in str(error), raised.value
    assert "re-run `artnet catalog`" in str(error)


@pytest.mark.parametrize("detail, cause", [
    ("OSError: AWS Error ACCESS_DENIED during GetObject operation: Access Denied", "credentials"),
    ("OSError: When reading information for key 'a.jpg' in bucket 'b': AWS Error NETWORK_CONNECTION during "
     "HeadObject operation: curlCode: 7, Couldn't connect to server", "endpoint"),
    ("FileNotFoundError: [Errno 2] Failed to open local file '/x/a.jpg'. Detail: [errno 2] No such file or "
     "directory", "missing objects"),
    ("OSError: Path does not exist 'bucket/a.jpg'. Detail: [errno 2] No such file or directory", "missing objects"),
])
def test_read_failures_are_classified_by_what_fixes_them(detail, cause):
    assert storage.fault_class("unreadable", detail) == cause
    assert storage.fault_class("truncated", "image file is truncated") == "corrupt files"


@pytest.mark.long
def test_it_learns_the_painters_and_not_shuffled_labels(tmp_path, ray_local):
    """"Loss went down" would pass with an image/label mix-up: the same data and config reach clearly above
    chance on the test split, and with every label shuffled (so an image no longer says who painted it) they
    do not."""
    import numpy as np
    import pyarrow as pa

    from artnet.config import CatalogConfig
    from artnet.data import catalog

    cat = write_small_catalog(tmp_path / "real")
    manifest, painters = catalog.load(cat)
    shuffled = np.random.default_rng(0).permutation(manifest["label"].to_numpy())
    manifest = manifest.set_column(manifest.schema.get_field_index("label"), "label", pa.array(shuffled, pa.int32()))
    manifest = manifest.set_column(manifest.schema.get_field_index("painter"), "painter",
                                   pa.array([painters[i] for i in shuffled]))
    catalog.write(catalog.Catalog(manifest, painters, {}), str(tmp_path / "shuffled"), CatalogConfig(source="x"))

    real = trainer.fit(tiny_job(cat, tmp_path / "work", "real", **LEARNABLE))["metrics"]
    noise = trainer.fit(tiny_job(str(tmp_path / "shuffled"), tmp_path / "work", "noise", **LEARNABLE))["metrics"]
    assert real["test_accuracy"] >= 0.9, real  # 3 painters: chance is 1/3
    assert noise["test_accuracy"] < 0.75, noise  # P(>= 9 of 12 right by chance) < 0.5%


def test_early_stopping_ends_each_phase_on_every_worker_at_the_same_epoch(tmp_path, ray_local):
    """A learning rate of ~0 leaves validation loss flat: with patience 1 each phase stops after its 2nd epoch.
    Two workers: rank 0 decides and the other must follow through the all-reduce (if it did not, it would wait
    at the next collective forever and this test would time out)."""
    import mlflow

    cat = write_small_catalog(tmp_path)
    job = tiny_job(cat, tmp_path / "work", "patience", scaling__num_workers="2", train__lr="1e-9",
                   train__patience="1", train__head_epochs="4", train__finetune_epochs="3")
    result = trainer.fit(job)
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 5, 6]  # phase 1: epochs 1-2 of 4; phase 2: 5-6 of 7
    assert result["metrics"]["epoch"] == 7 and result["metrics"]["done"]


@pytest.mark.long
def test_resuming_a_job_with_settings_its_checkpoints_do_not_fit_is_refused(tmp_path, ray_local):
    from artnet.config import CatalogConfig, ConfigError
    from artnet.data import catalog

    cat = write_small_catalog(tmp_path)
    trainer.fit(tiny_job(cat, tmp_path / "work", "keep", train__head_epochs=1, train__finetune_epochs=0))
    with pytest.raises(ConfigError, match="model.head_width.*checkpoints of job 'keep'.*model.head_width=64"):
        trainer.fit(tiny_job(cat, tmp_path / "work", "keep", model__head_width="32", train__head_epochs=1,
                             train__finetune_epochs=0))
    manifest, painters = catalog.load(cat)
    two, names = catalog.subset(manifest, painters, painters[:2])
    catalog.write(catalog.Catalog(two, names, {}), str(tmp_path / "two"), CatalogConfig(source="x"))
    with pytest.raises(ConfigError, match="painters.*differs from the checkpoints"):
        trainer.fit(tiny_job(str(tmp_path / "two"), tmp_path / "work", "keep", train__head_epochs=1,
                             train__finetune_epochs=0))
    again = trainer.fit(tiny_job(cat, tmp_path / "work", "keep", train__head_epochs=1, train__finetune_epochs=0))
    assert again["metrics"]["epoch"] == 1  # the same settings resume (here: the finished job, a no-op)


@pytest.mark.long
def test_a_tracking_server_away_mid_run_gets_every_epoch_once_when_it_returns(tmp_path, ray_local):
    """The server stops once Ray Train starts (the job's run exists, no epoch is trained yet) and comes back two
    checkpoints later: training never waited for it, and the run holds each epoch's metrics exactly once and ends
    FINISHED."""
    import mlflow

    from conftest import free_port, mlflow_answers, start_mlflow_server

    root, port = tmp_path / "server", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    cat = write_small_catalog(tmp_path)
    job = tiny_job(cat, tmp_path / "work", "away", tracking__tracking_uri=uri, train__head_epochs="4",
                   train__finetune_epochs="4")
    run_dir = tmp_path / "work" / "ray_results" / "away"
    seen = {}

    def checkpointed_epochs() -> int:
        done = [0]
        for state in run_dir.glob(f"checkpoint_*/{trainer.CHECKPOINT_STATE}"):
            try:
                done.append(len(json.loads(state.read_text())["history"]))
            except (OSError, ValueError):  # Ray is writing or deleting it
                pass
        return max(done)

    def outage():
        nonlocal server
        deadline = time.time() + 300
        # Ray Train's results folder appears when `fit` hands over to it: the run exists, the worker's start (10+ s)
        # is ahead.
        while time.time() < deadline and not run_dir.exists():
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and its uvicorn process
        while time.time() < deadline and mlflow_answers(port):  # counted from when the worker can no longer reach
            time.sleep(0.1)  # it: the CLI process exited up to 30 s later, when the tiny epochs were all checkpointed
        seen["stopped"] = checkpointed_epochs()
        while time.time() < deadline and checkpointed_epochs() < seen["stopped"] + 2:
            time.sleep(0.2)
        seen["restarted"] = checkpointed_epochs()
        server.wait(timeout=30)
        server = start_mlflow_server(root, port)

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        result = trainer.fit(job)
        watcher.join(timeout=60)
        assert seen["restarted"] >= seen["stopped"] + 2, f"epochs were trained while the server was away: {seen}"
        client = mlflow.MlflowClient(uri)
        assert sorted(m.step for m in client.get_metric_history(result["run_id"], "train_loss")) == list(range(1, 9))
        assert client.get_run(result["run_id"]).info.status == "FINISHED"
    finally:
        server.terminate()


@pytest.mark.long
def test_transient_storage_faults_are_retried_and_no_image_is_lost(tmp_path, s3_bucket, ray_local, monkeypatch):
    """Images, catalog, checkpoints and MLflow artifacts in S3 behind a proxy that answers 10% of requests with a
    503 SlowDown, a 500, a reset connection or a slow answer: the job completes, every good image is used (only
    the two truly bad files are skipped) and the retries are counted in the run."""
    import mlflow

    from artnet.config import CatalogConfig
    from artnet.data import catalog
    from faults import FaultyProxy

    local = write_small_catalog(tmp_path)
    client = storage.boto3_client()
    for path in sorted((tmp_path / "data").rglob("*.jpg")):
        client.put_object(Bucket=s3_bucket, Key=f"faults/data/{path.relative_to(tmp_path / 'data')}",
                          Body=path.read_bytes())
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], rate=0.1, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.endpoint)
        remote = f"s3://{s3_bucket}/faults/catalog"
        source = CatalogConfig(source=f"s3://{s3_bucket}/faults/data", split=(0.6, 0.2, 0.2), seed=1)
        catalog.write(catalog.build(source), remote, source)
        result = trainer.fit(tiny_job(remote, tmp_path / "work", "faults", train__head_epochs=1,
                                      train__finetune_epochs=1, storage_path=f"s3://{s3_bucket}/faults/ray_results",
                                      tracking__artifact_location=f"s3://{s3_bucket}/faults/mlflow"))
        mlflow.set_tracking_uri(result["tracking_uri"])
        model = mlflow.keras.load_model(result["model_uri"])  # from S3, through the faults
    assert sum(proxy.injected.values()) >= 10 and set(proxy.injected) == {"slow_down", "internal_error", "reset",
                                                                          "slow"}
    assert catalog.load(remote)[0].num_rows == catalog.load(local)[0].num_rows
    assert result["bad_images"]["total"] == 2 and result["bad_images"]["by_reason"] == {"corrupt": 1, "empty": 1}
    retries = result["bad_images"]["storage_retries"]
    print(f"faults injected {dict(proxy.injected)} in {sum(proxy.injected.values()) + proxy.passed} requests; "
          f"image reads retried {retries}; images lost 0")
    assert retries > 0
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.metrics["storage_retries"] == retries and run.info.status == "FINISHED"
    assert result["checkpoint"].startswith(f"s3://{s3_bucket}/faults/ray_results/faults/checkpoint_")
    assert run.info.artifact_uri.startswith(f"s3://{s3_bucket}/faults/mlflow/")
    assert storage.exists(f"{run.info.artifact_uri}/confusion_matrix.png")
    assert storage.exists(f"{run.info.artifact_uri}/bad_images.json")
    assert any(method == "PUT" and path.split("?")[0].endswith("/confusion_matrix.png")
               for method, path in proxy.requests), "rank 0's MLflow client wrote through the faulty endpoint"
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 3)
