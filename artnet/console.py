"""What a person sees while a job runs: artnet's own lines (per-epoch progress, results) on the console; Ray's,
TensorFlow's and MLflow's internals in their log files, unless `--verbose`.

Ray streams every worker's output to the driver by default, which buries the few lines a person wants under
execution plans, checkpoint reports and TensorFlow's start-up chatter. So the driver starts Ray with
`log_to_driver` off (the worker logs stay in Ray's session directory) and rank 0 sends its lines through a
small `Progress` actor that the driver prints from. That path also works under `ray job submit`, where the
driver's stdout is the job log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from typing import Callable, TypeVar

log = logging.getLogger("artnet")
T = TypeVar("T")

# Libraries whose INFO lines are internals, not results.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "absl", "tensorflow", "h5py",
                 "botocore", "urllib3")

_verbose = False

# Raylet settings for a node artnet's jobs run on: set for a local instance the driver starts (unless the user
# set them), and as ENV in the Dockerfile for cluster.yaml's nodes. Ray stops a worker process that has been idle
# for 1 s once the node has more processes than CPUs, which a training job always has (its trainer and Ray
# Train's and Ray Data's zero-CPU actors): each epoch's decode tasks then started in new processes, ~1 s (2 s on a
# slower machine) of imports on the critical path of every epoch's first batch while a core idled. Kept a minute
# (longer than an epoch's validation and checkpoint), the next pass's tasks reuse them.
NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def setup(verbose: bool = False) -> None:
    """Console logging for a CLI process: artnet's INFO lines as plain text, everyone else's from WARNING up."""
    global _verbose
    _verbose = verbose
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")  # read when mlflow is imported
    if not verbose:  # Tune's newer console output prints its experiment tables even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # The driver's C++ core worker writes notices meant for Ray developers to stderr (e.g. that an actor's
        # constructor arguments live in the object store); failures still surface as Python exceptions.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def is_verbose() -> bool:
    return _verbose


def _start_up_log(name: str):
    """Unless verbose, file descriptor 2 goes to `$TMPDIR/artnet-<name>.log` for a while: C++ start-up lines
    (TensorFlow's, Ray's core worker's) bypass Python logging."""
    return contextlib.nullcontext() if _verbose else _stderr_to_file(
        os.path.join(tempfile.gettempdir(), f"artnet-{name}.log"))


@contextlib.contextmanager
def _stderr_to_file(path: str):
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def import_tensorflow():
    """`import tensorflow`, with its C++ start-up lines (CUDA probing, oneDNN notes) written to a log file
    instead of the console unless verbose. Errors still surface: the descriptor is restored before they do."""
    if _verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with _start_up_log("tensorflow"):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe logs once, here
    return tf


def init_ray(meanwhile: Callable[[], T] | None = None) -> T | None:
    """Connect to Ray (RAY_ADDRESS, or a local instance) with worker output kept in Ray's log files unless
    verbose. Unless verbose, Ray's start-up notices go to a log file too: the driver's C++ core worker announces
    its log level on stderr, and a new local instance says that it turned on token authentication (Ray's
    default, nothing to act on). Failures still surface as exceptions once the descriptor is restored.

    `meanwhile` (the driver's own checks: TensorFlow's import, the weights) runs on a thread while Ray starts,
    which waits on its new processes more than it computes; its result is returned. If it fails, a Ray instance
    this call started is shut down and its error raised: a bad config still fails before any job reaches Ray."""
    import ray

    side = _Side(meanwhile)
    started = not ray.is_initialized()
    if started:
        for name, value in NODE_ENV.items():  # read by the raylet a local instance starts
            os.environ.setdefault(name, value)
        logging.getLogger("ray._private.authentication").setLevel(logging.INFO if _verbose else logging.ERROR)
        with _start_up_log("ray-init"):
            side.start()  # inside the redirect and joined before it ends: the descriptor's changes nest
            try:
                ray.init(log_to_driver=_verbose, logging_level=logging.INFO if _verbose else logging.WARNING)
            finally:
                side.join()
    else:
        side.run()
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = _verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if _verbose else logging.WARNING)
    if side.error is not None:
        if started:
            ray.shutdown()
        raise side.error
    return side.result


class _Side(threading.Thread):
    """`work` on a thread, its result or error kept for the thread that joins it."""

    def __init__(self, work: Callable[[], T] | None):
        super().__init__(name="artnet-meanwhile", daemon=True)
        self.work, self.result, self.error = work, None, None

    def run(self) -> None:
        try:
            self.result = self.work() if self.work is not None else None
        except BaseException as e:  # raised by the caller's thread, after Ray's start
            self.error = e


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Lines from rank 0, held until the driver collects them."""

        def __init__(self):
            self.lines: list[str] = []

        def say(self, line: str) -> None:
            self.lines.append(line)

        def drain(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    return Progress.remote()


@contextlib.contextmanager
def relay(poll_seconds: float = 0.5):
    """A `Progress` actor whose lines the driver prints as they come, for as long as the block runs.
    Yields the actor handle to pass to workers."""
    import ray

    actor = _progress_actor()
    done = threading.Event()

    def pump():
        while True:
            finished = done.wait(poll_seconds)
            try:
                for line in ray.get(actor.drain.remote()):
                    print(line, flush=True)
            except Exception:  # the cluster is going away: nothing more to print
                return
            if finished:
                return

    thread = threading.Thread(target=pump, name="artnet-progress", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        done.set()
        thread.join(timeout=30)
        ray.kill(actor)


def say(progress, line: str) -> None:
    """On a worker: the line into the worker's log, and to the driver's console through `progress`."""
    logging.getLogger("artnet.train").info(line)
    if progress is not None:
        progress.say.remote(line)
