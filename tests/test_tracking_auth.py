"""MLflow behind basic auth: a real `mlflow server --app-name basic-auth` on loopback. The driver's credentials
reach a Ray worker through Ray's object store (as rank 0 gets them from `fit`), a refusal is named with the fix
where it happens, and no credential lands in a run's params or tags, nor in Ray's logs."""

import os
import signal
from pathlib import Path

import pytest

from artnet.errors import UserError, find_user_error
from artnet.track import tracking
from artnet.train.trainer import worker_env
from conftest import free_port, start_mlflow_server, tiny_job

ADMIN, PASSWORD = "artnet-admin", "Adm1n-passw0rd-for-tests"
TOKEN = "tok-never-in-a-run"  # sent along (MLflow prefers username and password): must travel, never be logged


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The server URI; `admin_username`/`admin_password` in basic_auth.ini create its admin on first start."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n")
    port = free_port()
    server = start_mlflow_server(root, port, "", "--app-name", "basic-auth",
                                 env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only"})
    yield f"http://127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
    server.wait(timeout=30)


def login(monkeypatch, password=PASSWORD, user=ADMIN):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)


def log_epoch_remotely(ray, credentials, uri: str, run_id: str):
    """Rank 0's delivery of an epoch, in a Ray worker started with the training workers' runtime env and given
    `credentials` (`tracking.sealed_credentials`), as `fit` gives them to rank 0."""

    @ray.remote(num_cpus=1, max_calls=1)  # a fresh process each time: no environment left by an earlier call
    def deliver(config):  # nested in a dict, as in Ray Train's train_loop_config: the reference arrives as one
        tracking.unseal(config["credentials"])
        tracking.WorkerRun(uri, run_id).sync_epochs([{"epoch": 1, "train_loss": 0.5}])

    return ray.get(deliver.options(runtime_env={"env_vars": worker_env()}).remote({"credentials": credentials}))


def test_rank0_logs_with_the_drivers_credentials_and_nothing_records_them(ray_local, auth_server, monkeypatch,
                                                                          tmp_path):
    import mlflow

    login(monkeypatch)
    assert not set(tracking.CREDENTIALS) & set(worker_env()), "never in a runtime env: Ray logs those"
    run_id = tracking.start_job_run(tiny_job("catalog", tmp_path, "authorised"), auth_server)

    log_epoch_remotely(ray_local, tracking.sealed_credentials(), auth_server, run_id)
    client = mlflow.MlflowClient(auth_server)
    assert [m.value for m in client.get_metric_history(run_id, tracking.EPOCH_METRIC)] == [0.5]
    # The control: the same worker without the driver's credentials is refused, and says how to fix it.
    with pytest.raises(Exception) as caught:
        log_epoch_remotely(ray_local, None, auth_server, run_id)
    named = str(find_user_error(caught.value))
    assert "HTTP 401; no MLFLOW_TRACKING_USERNAME, _PASSWORD or _TOKEN set" in named, named
    assert "Fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in named, named

    run = client.get_run(run_id).data
    recorded = [*run.params.items(), *run.tags.items()]
    assert not [kv for kv in recorded if any(secret in text for secret in (PASSWORD, TOKEN) for text in kv)]
    assert len(run.params) > 50  # the whole config went in, the credentials did not
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and PASSWORD in p.read_text(errors="replace")]
    assert not leaked, f"Ray's logs hold the password: {leaked}"


def test_a_refused_driver_stops_before_any_run(auth_server, monkeypatch, tmp_path):
    import mlflow
    from mlflow.server import get_app_client

    job = tiny_job("catalog", tmp_path, "refused")
    login(monkeypatch, password="not-the-password")
    with pytest.raises(UserError) as caught:
        tracking.start_job_run(job, auth_server)
    message = str(caught.value)
    assert "HTTP 401; MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_TOKEN set" in message
    assert "Fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
    assert "not-the-password" not in message and "\n" not in message

    # Rank 0's background delivery: the refusal is kept apart from "server away" and raised by the next call.
    run = tracking.WorkerRun(auth_server, "0" * 32)
    run.mirror([{"epoch": 1, "train_loss": 0.5}])
    run._delivery.join()
    assert run.failure is None and isinstance(run.refused, UserError)
    with pytest.raises(UserError, match="HTTP 401"):
        run.mirror([])

    login(monkeypatch)
    client = mlflow.MlflowClient(auth_server)
    get_app_client("basic-auth", tracking_uri=auth_server).create_user("reader", "Reader-passw0rd-1")
    tracking.start_job_run(tiny_job("catalog", tmp_path, "admins"), auth_server)  # the experiment, the admin's
    login(monkeypatch, password="Reader-passw0rd-1", user="reader")  # READ by default: may not create runs
    with pytest.raises(UserError, match=r"denied permission .* \(HTTP 403\). Fix: grant that user EDIT"):
        tracking.start_job_run(job, auth_server)

    login(monkeypatch)
    experiment = client.get_experiment_by_name(job.tracking.experiment)
    assert not client.search_runs([experiment.experiment_id], f"tags.`{tracking.JOB_TAG}` = 'refused'")
