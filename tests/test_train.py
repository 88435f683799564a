"""Training on CPU through a real local Ray cluster, real MLflow (sqlite) and real JPEGs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from artnet import cli
from artnet.config import override
from artnet.data import catalog
from artnet.train import trainer
from conftest import REPO, write_small_catalog
from conftest import tiny_job as job_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    return write_small_catalog(tmp_path_factory.mktemp("paintings"))


def mlflow_client(result):
    import mlflow

    return mlflow.MlflowClient(result["tracking_uri"])


def test_one_worker_trains_and_mlflow_holds_everything(small_catalog, tmp_path, ray_local):
    import keras
    import mlflow

    result = trainer.fit(job_for(small_catalog, tmp_path, "one"))
    client = mlflow_client(result)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.3" and run.data.params["model.backbone"] == "tiny"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert run.data.metrics["bad_images_skipped"] == 2
    assert {"test_accuracy", "test_top3_accuracy", "test_macro_f1", "val_macro_f1", "val_seconds",
            "test_seconds"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "training_curves.png", "gradcam_test.png",
            "per_painter.json", "bad_images.json", "manifest.parquet", "labels.json"} <= artifacts
    per_painter = json.loads(Path(client.download_artifacts(run.info.run_id, "per_painter.json", str(tmp_path))).read_text())
    bad = json.loads(Path(client.download_artifacts(run.info.run_id, "bad_images.json", str(tmp_path))).read_text())
    assert sorted(uri.rsplit("/", 1)[1] for uri in bad["files"]) == ["truncated.jpg", "zero_byte.jpg"]
    assert sorted(per_painter) == result["painters"]
    # The registered-able model predicts exactly what the trained model in the final checkpoint predicts.
    mlflow.set_tracking_uri(result["tracking_uri"])
    logged = mlflow.keras.load_model(run.data.tags["artnet.model_uri"])
    requirements = Path(mlflow.pyfunc.get_model_dependencies(run.data.tags["artnet.model_uri"])).read_text().split()
    assert f"keras=={keras.__version__}" in requirements and any(r.startswith("tensorflow==") for r in requirements)
    assert mlflow.keras.load_model(f"runs:/{run.info.run_id}/model") is not None
    in_memory = keras.models.load_model(os.path.join(result["checkpoint"], "model.keras"))
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(logged.predict(x, verbose=0), in_memory.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert result["metrics"]["done"] and result["metrics"]["test_images"] > 0


def test_two_workers_multi_worker_strategy_trains(small_catalog, tmp_path, ray_local):
    """Two workers train together and share each epoch's validation, the calibration and the test: the figures
    they agree on equal the logged model's (the best epoch's weights) scored on the whole splits in one
    process."""
    import mlflow

    from artnet.data import pipeline

    job = job_for(small_catalog, tmp_path, "two", scaling__num_workers=2)
    result = trainer.fit(job)
    client = mlflow_client(result)

    def history(name):
        return [m.value for m in sorted(client.get_metric_history(result["run_id"], name), key=lambda m: m.step)]

    # Both workers train every epoch on equal shares of the readable training images (Ray's equal split, whole
    # batches of 8 each). Whether 6 steps lower the loss is noise; learning itself is test_reliability's.
    manifest, painters = catalog.load(small_catalog)
    train_uris = manifest.filter(pc.equal(manifest["split"], "train"))["uri"].to_pylist()
    readable = len(set(train_uris) - set(result["bad_images"]["files"]))
    assert len(history("train_loss")) == 3 and all(np.isfinite(history("train_loss")))
    assert history("train_images") == [2 * (readable // 2 // 8) * 8] * 3, readable
    assert client.get_run(result["run_id"]).data.params["scaling.num_workers"] == "2"
    best = int(np.argmin(history("val_loss")))
    mlflow.set_tracking_uri(result["tracking_uri"])
    model = mlflow.keras.load_model(result["model_uri"])
    whole, _, _ = trainer.evaluate(lambda x: (model(x, training=False), None), pipeline.build_dataset(
        manifest, "val", job.data, train=False).iter_batches(batch_size=8, batch_format="numpy"), len(painters))
    assert whole["loss"] == pytest.approx(history("val_loss")[best], rel=1e-4)
    assert whole["images"] == history("val_images")[best] > 0, "every validation image counted exactly once"
    assert whole["accuracy"] == history("val_accuracy")[best]
    assert whole["macro_f1"] == pytest.approx(history("val_macro_f1")[best], abs=1e-9)

    from artnet.model import calibration

    def logits_of(split):
        batches = pipeline.build_dataset(manifest, split, job.data, train=False).iter_batches(
            batch_size=8, batch_format="numpy")
        return trainer.collect_logits(lambda x: (model(x, training=False), None), batches, len(painters))

    (val_y, val_logits, _), (test_y, test_logits, _) = logits_of("val"), logits_of("test")
    fitted = calibration.calibrate(val_logits, val_y, job.train.false_flag_rate)
    logged = client.get_run(result["run_id"]).data.metrics
    assert logged["calibration_temperature"] == pytest.approx(fitted.temperature, rel=1e-3)
    assert logged["test_images"] == len(test_y) > 0, "every test image counted exactly once"
    assert logged["test_accuracy"] == pytest.approx(float((test_logits.argmax(1) == test_y).mean()), abs=1e-9)
    # Exact equality of the summed statistics is test_calibration's (the same logits); here the logits of two
    # processes may differ in the last bits, which can move a confidence across an ECE bin edge.


def logged_epochs(result) -> list[int]:
    """The steps of the run's per-epoch metrics, as MLflow holds them (a duplicate shows twice)."""
    return sorted(m.step for m in mlflow_client(result).get_metric_history(result["run_id"], "train_loss"))


def _train_worker_pids() -> list[int]:
    """PIDs of this test cluster's live training workers, from its GCS (never another Ray cluster's on the same
    machine; the public state API needs the dashboard, which the test cluster does not start)."""
    from ray._private import state

    return [int(a["Pid"]) for a in state.actors().values()
            if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE" and a.get("Pid")]


@pytest.mark.long
def test_restart_and_rerun_resume_from_checkpoint(small_catalog, tmp_path, ray_local):
    job = job_for(small_catalog, tmp_path, "resume", train__head_epochs=1, train__finetune_epochs=3,
                  max_failures=1)
    run_dir = tmp_path / "ray_results" / "resume"
    killed = []

    def kill_after_second_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if len(list(run_dir.glob("checkpoint_*"))) >= 2:
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_second_checkpoint, daemon=True)
    killer.start()
    result = trainer.fit(job)
    killer.join(timeout=5)
    assert killed, "a training worker was killed mid-run"
    state = json.loads(Path(result["checkpoint"], trainer.CHECKPOINT_STATE).read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4], "each epoch ran once across the restart"
    assert logged_epochs(result) == [1, 2, 3, 4], "MLflow holds each epoch exactly once across the restart"
    with np.load(Path(result["checkpoint"], "optimizer.npz")) as opt:
        iterations = int(opt["arr_0"])
    manifest, _ = catalog.load(small_catalog)
    train_rows = sum(s == "train" for s in manifest["split"].to_pylist()) - 2  # two bad files are dropped
    expected_steps = 3 * (train_rows // 8)
    assert iterations == expected_steps, "the phase-2 optimizer state (its step count) survived the restart"

    # Re-running the same job name with one more epoch resumes at epoch 5 instead of starting over.
    longer = override(job, {"train.finetune_epochs": "4", "max_failures": "0"})
    again = trainer.fit(longer)
    state = json.loads(Path(again["checkpoint"], trainer.CHECKPOINT_STATE).read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4, 5]
    assert logged_epochs(again) == [1, 2, 3, 4, 5]
    # Re-running a finished job trains nothing more and keeps its state.
    done = trainer.fit(longer)
    state = json.loads(Path(done["checkpoint"], trainer.CHECKPOINT_STATE).read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4, 5]
    assert Path(done["checkpoint"], "optimizer.npz").exists()


def test_bad_train_config_fails_before_any_cluster_work(small_catalog, tmp_path, capsys):
    for argv, field in ((["--set", "train.lr=5"], "train.lr"), (["--image-size", "8"], "data.image_size"),
                        (["--backbone", "resnet"], "model.backbone"), (["--weights", "/no/such.h5"], "model.weights"),
                        (["--set", "train.unfreeze=2"], "train.unfreeze")):
        assert cli.main(["train", small_catalog, "--workdir", str(tmp_path)] + argv) == 2
        err = capsys.readouterr().err
        assert f"'{field}'" in err and "Fix:" in err
    assert not any(tmp_path.iterdir()), "nothing was started or written"


def test_workers_that_take_every_cpu_are_refused_before_training(small_catalog, tmp_path, ray_local):
    from artnet.config import ConfigError

    cpus = int(ray_local.cluster_resources()["CPU"])
    with pytest.raises(ConfigError) as err:
        trainer.fit(job_for(small_catalog, tmp_path, "greedy", scaling__num_workers=cpus))
    assert err.value.field == "scaling.num_workers" and "decoding" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_a_worker_resource_no_node_has_is_refused_before_training(small_catalog, tmp_path, ray_local):
    from artnet.config import ConfigError

    with pytest.raises(ConfigError) as err:
        trainer.fit(job_for(small_catalog, tmp_path, "nowhere", scaling__worker_resource="trainer"))
    assert err.value.field == "scaling.worker_resource" and "--resources" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def mirrored_equivalence(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "mirrored_equivalence.py"), *args],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_xla_compiled_steps_train_as_the_plain_ones():
    """`train.jit_compile`: the same losses, mirrored or not, as the steps TensorFlow runs op by op."""
    compiled, plain = mirrored_equivalence("float32", "jit"), mirrored_equivalence("float32")
    assert compiled["max_weight_diff"] < 1e-5
    np.testing.assert_allclose(compiled["losses_single"], plain["losses_single"], rtol=1e-5)
    np.testing.assert_allclose(compiled["losses_mirrored"], plain["losses_mirrored"], rtol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_mirrored_over_two_devices_matches_one_device(policy):
    result = mirrored_equivalence(policy)
    assert result["replicas"] == 2 and result["finite"]
    tolerance = 1e-5 if policy == "float32" else 2e-2
    if policy == "float32":
        assert result["max_weight_diff"] < tolerance
    # bfloat16 keeps 8 bits of each product, and Adam turns a rounding difference in a near-zero gradient into a
    # whole step (one weight differed by 0.022 on an AMD EPYC): the difference as a whole against the update as
    # a whole (0.07 there; the same steps on the batches in another order: 0.6).
    assert result["weight_diff_norm"] < 0.15 * result["update_norm"]
    np.testing.assert_allclose(result["losses_mirrored"], result["losses_single"], rtol=tolerance)
