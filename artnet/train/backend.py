"""Ray Train's trainer for TensorFlow workers, without importing TensorFlow where it never runs.

Ray's `TensorflowTrainer` names its backend from the `ray.train.tensorflow` package, whose `__init__` imports
TensorFlow: in the driver, and again in Ray Train's controller process when it unpickles the trainer. Neither runs
TensorFlow; on the 2-core machine the controller's import was 3.9 s of one core on the critical path between
`fit` and the first worker starting. This is the same backend on Ray Train's public `DataParallelTrainer`: before
the loop starts, each worker gets a TF_CONFIG listing every worker's address, which MultiWorkerMirroredStrategy
reads. (Ray's also sets TF_USE_LEGACY_KERAS for `tf.keras` users; artnet uses Keras 3 itself.)
Each worker then starts importing TensorFlow on a thread: Ray Train sets up the datasets and launches the loop
meanwhile, and the loop's own import waits for that one instead of starting from nothing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


def tensorflow_trainer(**kwargs):
    """`ray.train.tensorflow.TensorflowTrainer(**kwargs)`, with this module's backend."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer(backend_config=TensorflowBackendConfig(), **kwargs)


@dataclass
class TensorflowBackendConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _TensorflowBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW  # Ray Train's run state records TensorFlow's version from a worker


class _TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowBackendConfig) -> None:
        import ray

        addresses = worker_group.execute(worker_address)
        ray.get([worker_group.execute_single_async(rank, set_tf_config, addresses, rank)
                 for rank in range(len(worker_group))])


def worker_address() -> str:
    """host:port for this worker in TF_CONFIG: its node's address and a port free now."""
    import ray

    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def set_tf_config(addresses: list[str], rank: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}})
    threading.Thread(target=_import_tensorflow, name="artnet-import-tensorflow", daemon=True).start()


def _import_tensorflow() -> None:
    """Keras and TensorFlow under it, as the training loop imports them first (10-12 s of one core in a new
    worker on the 2-core machines). A failure is left to the loop's own import, which raises it where Ray Train
    reports a loop's errors (Python forgets a module whose import failed, so the loop tries again)."""
    try:
        import keras  # noqa: F401
    except Exception:
        pass
