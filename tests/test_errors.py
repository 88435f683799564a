"""User errors: one line with the fix and exit status 2, raised before any Ray work where they can be known
there, and intact (type and message) when they cross a process boundary inside Ray."""

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artnet import cli
from artnet.config import ConfigError
from artnet.data import demo_data
from artnet.data.transforms import BadImage
from artnet.errors import UserError, find_user_error
from conftest import free_port


@pytest.mark.parametrize("error", [ConfigError("train.lr", "is 5", "use 1e-3"),
                                   UserError("s3://b/k", "access denied", "check the credentials"),
                                   BadImage("corrupt", "truncated data")])
def test_project_exceptions_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


def test_user_error_from_a_ray_data_task_is_found_intact(ray_local):
    from artnet.data import pipeline

    pipeline.configure_data_context()  # as every artnet dataset runs

    def raise_config_error(batch):  # nested, so Ray ships it by value (the test module is not importable there)
        raise ConfigError("data.augment.zoom", "is 2", "keep the zoom range below 1")

    ds = ray_local.data.range(4).map_batches(raise_config_error)
    with pytest.raises(Exception) as caught:
        ds.take_all()
    found = find_user_error(caught.value)
    assert type(found) is ConfigError and found.field == "data.augment.zoom"
    assert str(found) == "config field 'data.augment.zoom': is 2. Fix: keep the zoom range below 1"


@pytest.mark.slow
def test_user_error_from_a_ray_train_worker_is_found_intact(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig

    from artnet.train.backend import tensorflow_trainer

    def worker_raises(config):
        raise UserError(config["uri"], "access denied", "check the credentials")

    trainer = tensorflow_trainer(train_loop_per_worker=worker_raises, train_loop_config={"uri": "s3://b/k"},
                                 scaling_config=ScalingConfig(num_workers=1),
                                 run_config=RunConfig(name="raises", storage_path=str(tmp_path)))
    with pytest.raises(Exception) as caught:
        trainer.fit()
    found = find_user_error(caught.value)
    assert type(found) is UserError and str(found) == "s3://b/k: access denied. Fix: check the credentials"


@pytest.fixture
def one_line_error(capsys, tmp_path, monkeypatch):
    """Run the CLI from a scratch directory; return its one error line after checking the exit status, that
    there was no traceback, and that nothing was written."""
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> str:
        before = set(Path(tmp_path).rglob("*"))
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Fix: " in err[0], err
        assert "Traceback" not in err[0]
        assert set(Path(tmp_path).rglob("*")) == before, "nothing may be written"
        return err[0]

    return run


def test_missing_empty_and_unlabelled_sources(one_line_error, tmp_path):
    assert "/no/such/folder does not exist" in one_line_error("catalog", "/no/such/folder", "--out", "o")
    (tmp_path / "empty").mkdir()
    assert "holds no images" in one_line_error("catalog", "empty", "--out", "o")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "sunflowers.jpg").write_bytes(b"x")  # a flat name without a painter
    assert "has no labelled paintings" in one_line_error("catalog", "loose", "--out", "o", "--layout", "flat")


def test_no_painter_left_after_filters(one_line_error, tmp_path):
    demo_data.write_demo_set(str(tmp_path / "data"), painters=2, per_painter=3, size=32)
    line = one_line_error("catalog", "data", "--out", "o", "--min-paintings", "10")
    assert "'catalog.min_paintings'" in line and "no painter has 10+ paintings" in line


def test_missing_catalog_and_missing_config_file(one_line_error, tmp_path):
    (tmp_path / "not-a-catalog").mkdir()
    assert "holds no manifest.parquet" in one_line_error("train", "not-a-catalog", "--preset", "demo")
    assert "--config file does not exist" in one_line_error("train", "x", "--config", "nope.yaml")


@pytest.fixture
def catalog_dir(tmp_path):
    demo_data.write_demo_set(str(tmp_path / "data"), painters=2, per_painter=10, size=32)
    assert cli.main(["catalog", str(tmp_path / "data"), "--out", str(tmp_path / "catalog"),
                     "--split", "0.6,0.2,0.2"]) == 0
    return "catalog"


def test_unreadable_and_mismatched_weights(one_line_error, tmp_path, catalog_dir):
    (tmp_path / "weights.h5").write_text("not an HDF5 file")
    line = one_line_error("train", catalog_dir, "--backbone", "mobilenet_v2", "--image-size", "32",
                          "--weights", "weights.h5")
    assert "'model.weights'" in line and "not a readable weights file" in line
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="other")]).save_weights(tmp_path / "other.weights.h5")
    line = one_line_error("train", catalog_dir, "--backbone", "mobilenet_v2", "--image-size", "32",
                          "--weights", "other.weights.h5")
    assert "does not fit mobilenet_v2" in line


def test_imagenet_weights_that_cannot_be_downloaded(one_line_error, tmp_path, catalog_dir, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-cache"))  # nothing cached
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # and no way out, online or not
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{free_port()}")
    line = one_line_error("train", catalog_dir, "--backbone", "mobilenet_v2", "--image-size", "32",
                          "--weights", "imagenet")
    assert "ImageNet weights for mobilenet_v2 could not be downloaded" in line and "--weights FILE|s3://" in line


def test_unreachable_object_store(one_line_error, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    line = one_line_error("catalog", "s3://paintings/wikiart", "--out", "o")
    assert f"cannot reach the object store at {endpoint}" in line and "AWS_ENDPOINT_URL" in line
    line = one_line_error("train", "s3://paintings/catalog", "--preset", "demo")
    assert "cannot reach the object store" in line


@pytest.fixture
def s3_with_auth(monkeypatch):
    """A second loopback S3 endpoint that checks credentials (the session's moto server accepts any)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "wrong",
                       "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield
    server.kill()
    server.wait()


def test_unauthorised_object_store(one_line_error, s3_with_auth):
    line = one_line_error("catalog", "s3://paintings/wikiart", "--out", "o")
    assert "access denied" in line and "AWS_ACCESS_KEY_ID" in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        cli.main(["catalog", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--debug"])


def test_job_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    from artnet import presets
    from artnet.config import override
    from artnet.train import trainer

    monkeypatch.chdir(tmp_path)
    job = override(presets.preset("demo"), {
        "catalog": "cat", "workdir": "w", "storage_path": "runs", "model.weights": "weights/tiny.h5",
        "tracking.tracking_uri": "sqlite:///w/mlflow.db", "tracking.artifact_location": "art"})
    out = trainer.absolute_paths(job)
    assert out.catalog == str(tmp_path / "cat") and out.workdir == str(tmp_path / "w")
    assert out.storage_path == str(tmp_path / "runs") and out.model.weights == str(tmp_path / "weights/tiny.h5")
    assert out.tracking.tracking_uri == f"sqlite:///{tmp_path}/w/mlflow.db"
    assert out.tracking.artifact_location == str(tmp_path / "art")
    remote = override(job, {"catalog": "s3://b/cat", "storage_path": "s3://b/runs", "model.weights": "imagenet",
                            "tracking.tracking_uri": "http://mlflow:5000"})
    out = trainer.absolute_paths(remote)
    assert (out.catalog, out.storage_path, out.model.weights, out.tracking.tracking_uri) == (
        "s3://b/cat", "s3://b/runs", "imagenet", "http://mlflow:5000")


@pytest.mark.parametrize("setting,field", [
    ("model.alpha=0.5", "model.alpha"),  # InceptionV3 has no width multiplier
    ("scaling.gpus_per_worker=4", "scaling.gpus_per_worker"),  # without --use-gpu
    ("train.max_steps_per_epoch=10", "train.max_steps_per_epoch"),  # removed: it was never read
])
def test_settings_that_would_do_nothing_are_refused(one_line_error, setting, field):
    assert f"'{field}'" in one_line_error("train", "catalog", "--set", setting)


def test_bad_search_space_fails_before_any_work(one_line_error):
    line = one_line_error("tune", "catalog", "--space", "model.dropuot=uniform:0.1,0.5")
    assert "'model.dropuot'" in line and "is not a config field" in line
    line = one_line_error("tune", "catalog", "--space", "model.dropout=uniform:0.1,1.5")
    assert "'model.dropout'" in line


def test_a_local_tracking_store_is_refused_on_a_multi_node_cluster():
    """Rank 0 may log from another node: sqlite or a file path on the driver's disk does not exist there."""
    from artnet.track import tracking

    for uri in ("sqlite:////work/mlflow.db", "/work/mlruns", "file:///work/mlruns"):
        tracking.check_reachable(uri, None, nodes=1)  # one node: fine
        with pytest.raises(ConfigError, match="tracking.tracking_uri.*3 nodes.*MLFLOW_TRACKING_URI"):
            tracking.check_reachable(uri, None, nodes=3)
    tracking.check_reachable("http://mlflow.internal:5000", None, nodes=3)
    tracking.check_reachable("http://mlflow.internal:5000", "s3://bucket/mlflow", nodes=3)
    with pytest.raises(ConfigError, match="tracking.artifact_location"):
        tracking.check_reachable("http://mlflow.internal:5000", "/local/artifacts", nodes=3)
