"""End to end through a real Ray cluster (`ray start --head`) and `ray job submit`, as a user runs it.
Run in its own pytest process (marker `cluster`), apart from the local Ray instance of the other tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artnet.data import demo_data
from conftest import REPO, free_port

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node in its own process group, so teardown stops this cluster only (`ray stop` would stop
    every Ray process on the machine, a user's running jobs included)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    dashboard = free_port()
    temp = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                             f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=4",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield f"http://127.0.0.1:{dashboard}", env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


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


def test_catalog_and_train_jobs_through_ray_job_submit(cluster, tmp_path):
    address, env = cluster
    demo_data.write_demo_set(str(tmp_path / "data"), painters=2, per_painter=20, size=64)
    out = submit(address, env, "catalog.py", str(tmp_path / "data"), "--out", str(tmp_path / "catalog"),
                 "--split", "0.6,0.2,0.2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and (tmp_path / "catalog" / "manifest.parquet").exists()

    out = submit(address, env, "train.py", str(tmp_path / "catalog"), "--preset", "demo", "--name", "job",
                 "--workdir", str(tmp_path / "work"), "--image-size", "32", "--head-epochs", "1",
                 "--finetune-epochs", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "test accuracy" in out.stdout and "succeeded" in out.stdout
    assert "epoch 2/2 [phase 2]" in out.stdout, "per-epoch lines reach the job's log"

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("artnet").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert list((tmp_path / "work" / "ray_results" / "job").glob("checkpoint_*"))


def test_bad_config_job_fails_fast_with_the_field(cluster, tmp_path):
    address, env = cluster
    out = submit(address, env, "train.py", str(tmp_path), "--set", "train.batch_size=0")
    assert out.returncode != 0
    assert "train.batch_size" in out.stdout + out.stderr
