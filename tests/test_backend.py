"""artnet's Ray Train backend for TensorFlow: what it gives each worker, and that the processes that never run
TensorFlow (the driver until it checks the weights, Ray Train's controller) do not import it for Ray's sake.
That the workers of one job really form one MultiWorkerMirroredStrategy is `test_train`'s two-worker test."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from artnet.config import JobConfig
from artnet.train import backend, trainer
from conftest import REPO


def test_each_worker_gets_every_address_and_its_own_index(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "")  # restored after the test: later tests' TensorFlow must not read these
    addresses = ["10.0.0.1:4000", "10.0.0.2:4001", "[fd00::3]:4002"]
    backend.set_tf_config(addresses, 2)
    assert json.loads(os.environ["TF_CONFIG"]) == {"cluster": {"worker": addresses},
                                                   "task": {"type": "worker", "index": 2}}


def tensorflow_modules_after(code: str) -> list[str]:
    """Which of TensorFlow and Keras a new Python process has imported after running `code`."""
    code += "\nimport json, sys\nprint(json.dumps(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_starts_importing_tensorflow_once_it_has_its_tf_config():
    """The import overlaps Ray Train's dataset setup and the loop's launch; in a new process, as in a worker."""
    assert tensorflow_modules_after(
        "import threading\n"
        "from artnet.train import backend\n"
        "backend.set_tf_config(['127.0.0.1:4000'], 0)\n"
        "[t.join() for t in threading.enumerate() if t.name == 'artnet-import-tensorflow']") == ["keras", "tensorflow"]


def test_a_worker_address_names_a_port_that_can_be_bound(monkeypatch):
    import ray.util

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    host, port = backend.worker_address().rsplit(":", 1)
    assert host == "127.0.0.1"
    with socket.socket() as server:  # what TensorFlow's gRPC server does with it
        server.bind((host, int(port)))


def test_the_trainer_and_its_backend_unpickle_without_tensorflow():
    """What the controller process does with the trainer's backend config; and the driver's imports before
    `resolve` builds the backbone."""
    assert tensorflow_modules_after(
        "import pickle\n"
        "from artnet.train import backend, trainer\n"
        "config = pickle.loads(pickle.dumps(backend.TensorflowBackendConfig()))\n"
        "assert config.backend_cls.__name__ == '_TensorflowBackend' and config.framework.value == 'tensorflow'") == []


@pytest.mark.slow
def test_training_workers_run_at_niceness_0_while_rays_other_workers_stay_at_15(ray_local, tmp_path, monkeypatch):
    """With Ray's default (15) the step's threads yield the CPU to every Ray daemon at once: artnet's run config
    starts its training workers at 0, and leaves decode tasks (and every other Ray worker) where Ray puts them."""
    monkeypatch.delenv(trainer.NICENESS_ENV, raising=False)

    def report_niceness(config):  # the worker runs on this machine
        Path(config["out"]).write_text(str(os.nice(0)))

    out = tmp_path / "niceness"
    backend.tensorflow_trainer(train_loop_per_worker=report_niceness, train_loop_config={"out": str(out)},
                               run_config=trainer._run_config(JobConfig(name="niceness", workdir=str(tmp_path)))).fit()
    assert out.read_text() == "0"

    @ray_local.remote
    def task_niceness():  # what a decode task gets
        return os.nice(0)

    assert ray_local.get(task_niceness.remote()) == 15  # Ray's default: the control


def test_a_niceness_the_user_set_wins(monkeypatch):
    monkeypatch.setenv(trainer.NICENESS_ENV, "5")
    env = trainer._run_config(JobConfig()).worker_runtime_env["env_vars"]
    assert env[trainer.NICENESS_ENV] == "5"
