"""End to end through a real Ray cluster (`ray start --head`) and `ray job submit`, as a user runs it.
Run in its own pytest process (marker `cluster`), apart from the local Ray instance of the other tests."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artnet.console import NODE_ENV
from artnet.data import demo_data, storage
from conftest import REPO, free_port, start_mlflow_server

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def start_node(env: dict, temp: Path, *args: str) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops this cluster only (`ray stop` would stop
    every Ray process on the machine, a user's running jobs included)."""
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_for(gcs: str, env: dict, text: str) -> None:
    """Until `ray status` of the cluster at `gcs` shows `text`."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run([str(BIN / "ray"), "status", "--address", gcs], env=env, capture_output=True, text=True)
        if out.returncode == 0 and text in out.stdout:
            return
        if time.time() > deadline:
            raise RuntimeError(f"the test cluster never showed {text!r}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    """Two Ray nodes on loopback, as a user's cluster has them: a head, and a second node that joins it with
    `ray start --address` (its own temp dir, and the only node with the custom resource `trainer`, so training
    workers asked to take one run there and nowhere else). Both inherit the S3 environment, as a cluster's
    nodes are given credentials and an endpoint."""
    env = {**os.environ, **NODE_ENV, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dashboard = f"127.0.0.1:{free_port()}", free_port()
    nodes = [start_node(env, tmp_path_factory.mktemp("ray-head"), "--head", f"--port={gcs.rsplit(':', 1)[1]}",
                        f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2")]
    try:
        wait_for(gcs, env, "Active")
        nodes.append(start_node(env, tmp_path_factory.mktemp("ray-node2"), f"--address={gcs}", "--num-cpus=2",
                                '--resources={"trainer": 1}'))
        wait_for(gcs, env, "trainer")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the freshly started head has no job agent yet."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address,
                              "--working-dir", str(REPO / "jobs"), "--", "python", *args],
                             env=env, capture_output=True, text=True, timeout=900)
        not_ready = "No available agent" in out.stderr or "Connection refused" in out.stderr
        if out.returncode == 0 or not not_ready or time.time() > deadline:
            return out
        time.sleep(3)


def ray_list(address: str, env: dict, *args: str) -> list[dict]:
    out = subprocess.run([str(BIN / "ray"), "list", *args, "--address", address, "--format", "json", "--detail"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_catalog_and_train_jobs_on_two_nodes_with_images_in_s3_and_a_tracking_server(cluster, s3_bucket, tmp_path):
    """What a cluster user runs: images, catalog, checkpoints and MLflow artifacts in S3, a real `mlflow server`
    (sqlite behind it, artifacts in S3), `ray job submit` of catalog and train, training on the second node."""
    address, env = cluster
    root = f"s3://{s3_bucket}/multinode"
    demo_data.write_demo_set(str(tmp_path / "data"), painters=2, per_painter=20, size=64)
    for f in (tmp_path / "data").rglob("*.*"):
        storage.write_bytes(f"{root}/data/{f.relative_to(tmp_path / 'data')}", f.read_bytes())
    (tmp_path / "mlflow").mkdir()
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow", port, f"{root}/mlflow")
    try:
        out = submit(address, env, "catalog.py", f"{root}/data", "--out", f"{root}/catalog", "--split",
                     "0.6,0.2,0.2")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout and storage.exists(f"{root}/catalog/manifest.parquet")

        out = submit(address, env, "train.py", f"{root}/catalog", "--preset", "demo", "--name", "job", "--workdir",
                     str(tmp_path / "work"), "--storage-path", f"{root}/ray_results", "--image-size", "32",
                     "--head-epochs", "1", "--finetune-epochs", "1", "--set", "scaling.worker_resource=trainer",
                     "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "test accuracy" in out.stdout and "succeeded" in out.stdout
        assert "epoch 2/2 [phase 2]" in out.stdout, "per-epoch lines reach the job's log"

        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("artnet").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")] == [1, 2]
    finally:
        server.terminate()
        server.wait(timeout=30)
    objects = storage.boto3_client().list_objects_v2(Bucket=s3_bucket, Prefix="multinode/")["Contents"]
    keys = [o["Key"] for o in objects]
    assert any(k.startswith("multinode/mlflow/") and k.endswith("confusion_matrix.png") for k in keys)
    assert any(k.startswith("multinode/mlflow/") and k.endswith("MLmodel") for k in keys)
    assert any(k.startswith("multinode/ray_results/job/checkpoint_") for k in keys)
    assert not (tmp_path / "work" / "mlflow.db").exists(), "nothing tracked on the driver's disk"

    trainer_node = [n["node_id"] for n in ray_list(address, env, "nodes") if "trainer" in n["resources_total"]]
    workers = ray_list(address, env, "actors", "--filter", "class_name=RayTrainWorker")
    assert workers and {w["node_id"] for w in workers} == set(trainer_node), "training ran on the second node"


def test_bad_config_job_fails_fast_with_the_field(cluster, tmp_path):
    address, env = cluster
    out = submit(address, env, "train.py", str(tmp_path), "--set", "train.batch_size=0")
    assert out.returncode != 0
    assert "train.batch_size" in out.stdout + out.stderr


def autoscaling_config(gcs: str) -> dict:
    """Ray's fake multi-node provider (the one its autoscaler tests use): the head alone at the start, and a
    node type `gpu_worker` (one `trainer` unit, as cluster.yaml's GPU nodes carry) the autoscaler may add once;
    each node it adds is a real raylet on this machine."""
    return {"cluster_name": "artnet-test", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "auth": {}, "docker": {}, "head_node_type": "ray.head.default",  # the fake provider's name for it
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                "gpu_worker": {"resources": {"CPU": 1, "trainer": 1}, "node_config": {}, "min_workers": 0,
                               "max_workers": 1}},
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


@pytest.fixture
def autoscaling_cluster(tmp_path, tmp_path_factory, s3_endpoint):
    """A local autoscaling cluster that starts with its head only (2 CPUs, no `trainer`)."""
    import psutil

    gcs = f"127.0.0.1:{free_port()}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    env = {**os.environ, **NODE_ENV, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    temp = tmp_path_factory.mktemp("ray-as")  # short: Ray's socket paths live under it
    head = start_node(env, temp, "--head", f"--port={gcs.rsplit(':', 1)[1]}", "--num-cpus=2",
                      f"--autoscaling-config={config}", "--include-dashboard=false")
    try:
        wait_for(gcs, env, "Active")
        yield gcs, {**env, "RAY_ADDRESS": gcs}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        for process in psutil.process_iter(["cmdline"]):  # the nodes the autoscaler started, in its temp dir
            if any(str(temp) in arg for arg in process.info.get("cmdline") or []):
                process.kill()


def test_a_job_asks_the_autoscaler_for_its_nodes_and_trains_on_them(autoscaling_cluster, s3_bucket, tmp_path):
    """A fresh autoscaling cluster has no node with `trainer`: the job asks the autoscaler, says what it waits
    for, trains once the node has joined, and ran its workers there. Asks that no node type can meet, and
    checkpoints on the driver's disk of a cluster that can grow, are refused in one line before any work, naming
    the field."""
    import ray

    gcs, env = autoscaling_cluster
    demo_data.write_demo_set(str(tmp_path / "data"), painters=2, per_painter=16, size=48)
    out = subprocess.run([str(BIN / "artnet"), "catalog", str(tmp_path / "data"), "--out", str(tmp_path / "catalog"),
                          "--split", "0.6,0.2,0.2"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    port = free_port()
    (tmp_path / "mlflow").mkdir()
    server = start_mlflow_server(tmp_path / "mlflow", port, f"s3://{s3_bucket}/autoscale/mlflow")

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "artnet"), "train", str(tmp_path / "catalog"), "--preset", "demo", "--image-size", "32",
             "--head-epochs", "1", "--finetune-epochs", "0", "--workdir", str(tmp_path / "work"),
             "--storage-path", f"s3://{s3_bucket}/autoscale/ray_results", "--set", "scaling.worker_resource=trainer",
             "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}", *args],
            env=env, capture_output=True, text=True, timeout=600)

    try:
        two = train("--workers", "2", "--name", "two")  # one gpu_worker may be added: one `trainer`
        assert two.returncode == 2, two.stdout[-2000:] + two.stderr[-2000:]
        assert "config field 'scaling.worker_resource'" in two.stderr and "can add 1 for 2 worker(s)" in two.stderr
        gpu = train("--use-gpu", "--name", "gpu")  # no node type has a GPU
        assert gpu.returncode == 2 and "config field 'scaling.num_workers'" in gpu.stderr
        assert "gpu_worker {CPU: 1, trainer: 1}" in gpu.stderr, "it names what the autoscaler could add"
        local = train("--name", "local", "--storage-path", str(tmp_path / "ray_results"))  # the last flag wins
        assert local.returncode == 2 and "config field 'storage_path'" in local.stderr and "s3://" in local.stderr
        assert "waiting" not in two.stdout + gpu.stdout + local.stdout

        ray.init(address=gcs)
        try:
            assert not any("trainer" in n["Resources"] for n in ray.nodes() if n["Alive"]), "head only, at first"
            job = train("--name", "one", "--set", "scaling.wait_for_nodes_s=300")
            assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
            assert "waiting for the autoscaler to add 1 x gpu_worker for 1 training worker(s)" in job.stdout
            assert "node(s) up after" in job.stdout and "test: accuracy" in job.stdout
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2 and sum(n["Resources"].get("trainer", 0) for n in alive) == 1
        finally:
            ray.shutdown()
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("artnet").experiment_id])
        assert [(r.info.run_name, r.info.status) for r in runs] == [("one", "FINISHED")], "refused jobs left no run"
    finally:
        server.terminate()
        server.wait(timeout=30)
