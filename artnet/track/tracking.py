"""MLflow: where runs go, how a job finds its run again on resume, and what rank 0 logs.

The tracking URI is the config's, else $MLFLOW_TRACKING_URI, else sqlite in the work directory. A job's run
is tagged with the job name; re-running the same job (or a Ray Train restart) continues that run while it is
unfinished, matching Ray Train's resume-by-name. A server's credentials come from MLflow's own environment
variables (`CLIENT_ENV`), never from the config, so they stay out of the run's params.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time

import numpy as np

from artnet.config import JobConfig, flatten
from artnet.errors import UserError
from artnet.track import plots

JOB_TAG = "artnet.job"
MODEL_URI_TAG = "artnet.model_uri"
EPOCH_METRIC = "train_loss"  # logged at every epoch: its steps are the epochs a run holds
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
# The MLflow client settings that let a process into a tracking server with auth (and make it trust the server's
# TLS): rank 0 logs from a Ray worker, which has none of the driver's environment, so the driver passes them on.
# The TLS settings travel in the workers' runtime env; the credentials through Ray's object store (`sealed`),
# since Ray writes runtime envs to its logs and dashboard (ray#28276).
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
CLIENT_ENV = ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def tracking_uri(job: JobConfig) -> str:
    return resolve_uri(job.tracking.tracking_uri, job.workdir)


def resolve_uri(configured: str, workdir: str) -> str:
    """The configured tracking URI, else $MLFLOW_TRACKING_URI, else sqlite in `workdir` (what a local job used)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(os.path.join(workdir, 'mlflow.db'))}"


def client_env() -> dict[str, str]:
    """This process's MLflow TLS settings (`CLIENT_ENV`), for the training workers' runtime env."""
    return {k: os.environ[k] for k in CLIENT_ENV if os.environ.get(k)}


def sealed_credentials():
    """This process's MLflow credentials as a Ray object reference (None without any), for rank 0 to `unseal`."""
    import ray

    found = {k: os.environ[k] for k in CREDENTIALS if os.environ.get(k)}
    return ray.put(found) if found else None


def unseal(credentials) -> None:
    """In a Ray worker: the driver's MLflow credentials (`sealed_credentials`) into this process's environment."""
    import ray

    if credentials is not None:
        os.environ.update(ray.get(credentials))


def refusal(uri: str, error: BaseException) -> UserError | None:
    """`error` as a one-line UserError with the fix when the server refused the credentials (HTTP 401) or the
    user's permission (403): unlike a server that is away, trying again cannot help. Names variables, not values."""
    from mlflow.exceptions import MlflowException

    # REST calls raise MlflowException; artifact uploads raise requests' HTTPError.
    status = (error.get_http_status_code() if isinstance(error, MlflowException)
              else getattr(getattr(error, "response", None), "status_code", None))
    given = " and ".join(k for k in CREDENTIALS if os.environ.get(k))
    credentials = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    if status == 401:
        return UserError(uri, f"the MLflow tracking server did not accept the credentials (HTTP 401; "
                              f"{given or 'no MLFLOW_TRACKING_USERNAME, _PASSWORD or _TOKEN'} set)",
                         f"set {credentials} to a user of that server where the job starts; artnet passes them on "
                         "to its training workers")
    if status == 403:
        return UserError(uri, f"the MLflow tracking server denied permission to the user of "
                              f"{given or 'no credentials'} (HTTP 403)",
                         f"grant that user EDIT permission on the job's experiment, or set {credentials} to a user "
                         "who has it")
    return None


@contextlib.contextmanager
def refusals_named(uri: str):
    """Calls to the tracking server at `uri`, a refusal raised as `refusal`'s one-line UserError."""
    try:
        yield
    except Exception as e:
        error = refusal(uri, e)
        if error is None:
            raise
        raise error from e


def is_local_store(uri: str) -> bool:
    """A tracking store that lives on one machine's disk (sqlite, a file path), not a server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_reachable(uri: str, artifacts: str | None, nodes: int) -> None:
    """On a cluster of several nodes (`nodes`: up now or addable, `artnet.cluster.Plan.nodes`), rank 0 (and a
    Tune trial) may run on another node than the driver: a store on the driver's disk does not exist there.
    Refused before any work, with the fix."""
    from artnet.config import ConfigError

    if nodes < 2:
        return
    if is_local_store(uri):
        raise ConfigError("tracking.tracking_uri", f"is {uri}, on this machine's disk, but the job may run on "
                          f"{nodes} nodes of the Ray cluster and training may log from any of them",
                          "start a tracking server (mlflow server --backend-store-uri postgresql://... "
                          "--artifacts-destination s3://...) and set MLFLOW_TRACKING_URI to it")
    if artifacts and "://" not in artifacts:
        raise ConfigError("tracking.artifact_location", f"is the local path {artifacts}, but the job may run on "
                          f"{nodes} nodes",
                          "use an s3:// location, or leave it empty for the tracking server's")


def artifact_location(job: JobConfig, uri: str) -> str | None:
    """Local stores keep artifacts beside the database (not in whatever directory a Ray worker runs in);
    a tracking server decides for itself unless the config says otherwise."""
    if job.tracking.artifact_location:
        return job.tracking.artifact_location
    if is_local_store(uri):
        return os.path.abspath(os.path.join(job.workdir, "mlartifacts"))
    return None


def identity_tags(job: JobConfig, manifest, painters: list[str]) -> dict[str, str]:
    """What a registry needs to tell whether two models answer the same question: the painters (count and a
    checksum of the ordered names), the exact manifest and the backbone."""
    import hashlib

    from artnet.data import catalog

    return {"artnet.painter_count": str(len(painters)),
            "artnet.painters_sha256": hashlib.sha256("\n".join(painters).encode()).hexdigest(),
            "artnet.manifest_sha256": catalog.digest(manifest), "artnet.backbone": job.model.backbone}


def start_job_run(job: JobConfig, uri: str, tags: dict[str, str] | None = None) -> str:
    """The run id for this job: the unfinished run with the same job name, or a new one with params and
    `tags` logged. The driver's first call to the server: credentials it refuses stop the job here, with the fix."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    with refusals_named(uri):
        experiment = client.get_experiment_by_name(job.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment else client.create_experiment(
            job.tracking.experiment, artifact_location=artifact_location(job, uri)))
        found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job.name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and found[0].info.status != "FINISHED":
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=job.name, tags={JOB_TAG: job.name, **(tags or {})})
        params = {k: str(v) for k, v in flatten(job).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    return run.info.run_id


def finish_job_run(uri: str, run_id: str, bad_images: dict, catalog_dir: str) -> None:
    """Driver-side end of a job: the bad-image count (the tally lives on the driver), the manifest and labels
    it trained on, and the run marked finished."""
    import mlflow

    from artnet.data import catalog, storage

    client = mlflow.MlflowClient(uri)
    client.log_metric(run_id, "bad_images_skipped", bad_images["total"])
    client.log_metric(run_id, "storage_retries", bad_images.get("storage_retries", 0))
    client.set_tag(run_id, "bad_images", json.dumps(bad_images["by_reason"]))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "bad_images.json"), "w") as f:
            json.dump(bad_images, f, indent=2)
        for name in (catalog.MANIFEST, catalog.LABELS):
            with open(os.path.join(d, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(catalog_dir, name)))
        for name in ("bad_images.json", catalog.MANIFEST, catalog.LABELS):
            client.log_artifact(run_id, os.path.join(d, name))
    client.set_terminated(run_id, "FINISHED")


def fail_job_run(uri: str, run_id: str, error: BaseException) -> None:
    """Mark a job's run FAILED with the reason (re-running the job name continues it, as for an unfinished run).
    Best effort: the job's own error is what the user must see."""
    import mlflow

    from artnet.errors import find_user_error

    reason = find_user_error(error) or error
    try:
        client = mlflow.MlflowClient(uri)
        client.set_tag(run_id, "artnet.failure", f"{type(reason).__name__}: {reason}"[:4000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the tracking store may be what failed
        pass


def model_uri(uri: str, run_id: str) -> str | None:
    """The URI of the model a job logged (what the registry registers), or None if it logged none."""
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id).data.tags.get(MODEL_URI_TAG)


class WorkerRun:
    """Rank 0's handle on the job's run: per-epoch metrics, then the final artifacts and model.

    The checkpoint's history is the record of epochs; the run mirrors it (`mirror`), so MLflow holds each epoch
    exactly once however often workers restart, and training never waits for the tracking server. A server that
    refuses rank 0's credentials or permission (`refusal`) stops the job at the next call, not after training."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.failure: Exception | None = None  # why the last delivery failed, until one succeeds
        self.refused: UserError | None = None  # a delivery the server refused: the next call raises it
        self._delivery: threading.Thread | None = None
        self._client = None

    @property
    def client(self):
        """Made on first use, which is the first `mirror`'s thread: importing MLflow (~2 s of one core on the
        2-core machine) then overlaps the model's first steps instead of delaying them."""
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def sync_epochs(self, history: list[dict]) -> None:
        """Log each epoch of `history` that the run does not hold yet (its `train_loss` steps say which)."""
        with refusals_named(self.uri):
            logged = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_METRIC)}
            for record in history:
                if int(record["epoch"]) not in logged:
                    self.log_epoch(record)

    def mirror(self, history: list[dict]) -> None:
        """`sync_epochs` in the background, called once an epoch's checkpoint is saved. While the tracking server
        is away its deliveries fail (after MLflow's own retries) and a later call delivers what it missed; a call
        made while one is under way is left to the next. A refused delivery is raised by the next call."""
        if self.refused is not None:
            raise self.refused
        if self._delivery is not None and self._delivery.is_alive():
            return

        def deliver(records: list[dict]) -> None:
            try:
                self.sync_epochs(records)
                self.failure = None
            except UserError as e:  # refused credentials or permission: waiting cannot help
                self.refused = e
            except Exception as e:  # noqa: BLE001 - any other tracking failure: the next call tries again
                self.failure = e

        self._delivery = threading.Thread(target=deliver, args=(list(history),), daemon=True)
        self._delivery.start()

    def flush(self, history: list[dict]) -> None:
        """Deliver every epoch before the final report; raises if the tracking server is still away or refuses."""
        if self._delivery is not None:
            self._delivery.join()
        self.sync_epochs(history)
        self.failure = None

    def log_epoch(self, record: dict) -> None:
        import mlflow

        step = int(record["epoch"])
        values = [mlflow.entities.Metric(k, float(v), int(1000 * time.time()), step)
                  for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=values)

    def log_final(self, model, test: dict, cm: np.ndarray, painters: list[str], history: list[dict],
                  size: int, model_metadata: dict, examples: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Test metrics, figures and reports (`examples`: test images, labels and last feature maps, shown with
        their Grad-CAM maps: `explained_grid`), then the model with `model_metadata` (painter names, calibration:
        see `model.bundle`) in its MLmodel file."""
        import mlflow
        from mlflow.models import infer_signature

        from artnet import metrics as metrics_lib

        stats = metrics_lib.per_class(cm)
        report = {p: {k: float(stats[k][i]) for k in ("precision", "recall", "f1", "support")}
                  for i, p in enumerate(painters)}
        for k, v in test.items():
            self.client.log_metric(self.run_id, f"test_{k}", float(v))
        for k, v in model_metadata.get("artnet", {}).get("calibration", {}).items():
            self.client.log_metric(self.run_id, f"calibration_{k}", float(v))
        with tempfile.TemporaryDirectory() as d:
            plots.confusion_matrix(cm, painters, os.path.join(d, "confusion_matrix.png"))
            plots.confusion_csv(cm, painters, os.path.join(d, "confusion_matrix.csv"))
            plots.training_curves(history, os.path.join(d, "training_curves.png"))
            explained_grid(model, examples, painters, os.path.join(d, "gradcam_test.png"))
            with open(os.path.join(d, "per_painter.json"), "w") as f:
                json.dump(report, f, indent=2)
            with open(os.path.join(d, "history.json"), "w") as f:
                json.dump(history, f, indent=2)
            for name in ("confusion_matrix.png", "confusion_matrix.csv", "training_curves.png", "gradcam_test.png",
                         "per_painter.json", "history.json"):
                self.client.log_artifact(self.run_id, os.path.join(d, name))
        mlflow.set_tracking_uri(self.uri)
        example = np.zeros((1, size, size, 3), np.float32)
        signature = infer_signature(example, np.zeros((1, len(painters)), np.float32))
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.keras.log_model(model, name="model", signature=signature, metadata=model_metadata,
                                          pip_requirements=model_requirements())
            mlflow.set_tag(MODEL_URI_TAG, info.model_uri)  # what the registry step will register


def model_requirements() -> list[str]:
    """What the logged model needs to be served, pinned to this environment: what MLflow would infer itself,
    but without the subprocess it starts to find out (a fresh Python importing TensorFlow: seconds a job)."""
    import keras
    import mlflow
    import tensorflow as tf

    return [f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}", f"numpy=={np.__version__}",
            f"tensorflow=={tf.__version__}"]


def explained_grid(model, examples: tuple[np.ndarray, np.ndarray, np.ndarray], painters: list[str],
                   path: str) -> None:
    """Test paintings with their Grad-CAM maps, titled "painter -> answer" (`examples`: images, labels, and
    their last feature maps kept from the test pass)."""
    from artnet.model import explain

    images, labels, spatial = examples
    overlays, chosen = explain.explained(model, images, spatial=spatial)
    titles = [f"{painters[t]} -> {painters[c]}" for t, c in zip(labels, chosen)]
    plots.image_grid(np.stack(overlays) if overlays else images, titles, path)


def log_files(uri: str, run_id: str, files: list[str]) -> None:
    """Log files (local paths or s3:// URIs) as artifacts of a run."""
    import mlflow

    from artnet.data import storage

    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as d:
        for name in files:
            local = os.path.join(d, os.path.basename(name))
            with open(local, "wb") as f:
                f.write(storage.read_bytes(name))
            client.log_artifact(run_id, local)


def finish_run(uri: str, run_id: str, final_metrics: dict[str, float]) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    for key, value in final_metrics.items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, "FINISHED")
