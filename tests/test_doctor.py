"""`artnet doctor` on this CPU machine: no GPU and why, exit 0 without --use-gpu and 2 with it, a dead S3 endpoint
named with the fix, a real S3 endpoint (moto on loopback) listed, MLflow answering or refusing credentials (a
small HTTP server on loopback), a Ray cluster described, and secrets never printed."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from artnet import cli, doctor

from conftest import REPO, free_port

SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-s3cr3t-key-value", "AWS_ACCESS_KEY_ID": "AKIADOCTORTESTID",
           "MLFLOW_TRACKING_PASSWORD": "s3cr3t-value", "MLFLOW_TRACKING_USERNAME": "doctor-user"}


@pytest.fixture
def quiet_env(tmp_path, monkeypatch):
    """No Ray cluster, tracking server or S3 endpoint from the machine's environment; Ray's address file (a
    `ray start` elsewhere on this machine) looked for in an empty folder."""
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CUDA_VISIBLE_DEVICES", *doctor.MLFLOW_AUTH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_doctor(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    full.update({"RAY_TMPDIR": str(cwd), "PYTHONPATH": str(REPO), **env})
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=full, timeout=120)


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def tf_facts():
    facts = doctor.tensorflow_facts()
    if facts.gpus:
        pytest.skip("TensorFlow sees a GPU here: these tests are about a CPU node")
    return facts


class FakeMlflow(http.server.BaseHTTPRequestHandler):
    """/health answers; the REST API answers `status` (401: a server that refuses the credentials)."""

    status = 200
    seen_auth: list[str] = []

    def do_GET(self):
        type(self).seen_auth.append(self.headers.get("Authorization", ""))
        if self.path.startswith("/health"):
            body, status = b"OK", 200
        elif self.status == 200:
            body, status = json.dumps({"experiments": []}).encode(), 200
        else:
            body, status = b"You are not authenticated.", self.status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_mlflow():
    def start(status: int) -> str:
        handler = type("Handler", (FakeMlflow,), {"status": status, "seen_auth": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    servers = []
    yield start
    for server in servers:
        server.shutdown()


def test_a_cpu_node_passes_and_says_why_it_has_no_gpu(quiet_env, tf_facts):
    out = run_doctor(["-m", "artnet.cli", "doctor"], {}, quiet_env)
    assert out.returncode == 0, out.stdout + out.stderr
    [gpu] = lines(out.stdout, "warn gpu: no GPU: ")
    built = "built with CUDA" if tf_facts.cuda_build else "built without CUDA"
    assert f"TensorFlow {tf_facts.version} {built}" in gpu
    assert "ok   precision: train.precision=auto -> float32" in out.stdout
    assert "ok   collectives: ring (CPU) collectives" in out.stdout
    assert "ok   ray: no Ray cluster running; jobs start a local one" in out.stdout
    assert "ok   mlflow: sqlite:///" in out.stdout and not (quiet_env / "work").exists()  # looked at, not created
    assert "FAIL" not in out.stdout and out.stderr == ""


def test_use_gpu_without_a_gpu_fails_with_the_fix(quiet_env, tf_facts, capsys):
    assert cli.main(["doctor", "--use-gpu"]) == 2
    out, err = capsys.readouterr()
    [gpu] = lines(out, "FAIL gpu: no GPU: ")
    assert "--use-gpu asks for one. Fix: " in gpu and "tensorflow[and-cuda]" in gpu and "drivers" in gpu
    assert err.startswith("error: artnet doctor: ") and "gpu" in err


def test_dead_endpoints_fail_naming_them_and_secrets_never_show(quiet_env, fake_mlflow, tf_facts):
    s3_port, ray_port = free_port(), free_port()
    tracking, handler = fake_mlflow(401)
    env = {**SECRETS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3_port}", "MLFLOW_TRACKING_URI": tracking}
    out = run_doctor(["-m", "artnet.doctor", "--s3", "s3://bucket/x", "--address", f"127.0.0.1:{ray_port}"],
                     env, quiet_env)
    assert out.returncode == 2, out.stdout + out.stderr
    [s3] = lines(out.stdout, "FAIL s3: ")
    assert s3.startswith(f"FAIL s3: s3://bucket/x: cannot reach the object store at http://127.0.0.1:{s3_port} "
                         "(connection refused). Fix: ") and "AWS_ENDPOINT_URL_S3" in s3
    assert "ok   s3: credentials from environment (AWS_ACCESS_KEY_ID" in out.stdout
    [ray] = lines(out.stdout, "FAIL ray: ")
    assert f"nothing answers at 127.0.0.1:{ray_port} (--address)" in ray
    [mlflow] = lines(out.stdout, "FAIL mlflow: ")
    assert "HTTP 401" in mlflow and "MLFLOW_TRACKING_PASSWORD set" in mlflow
    assert "MLFLOW_TRACKING_TOKEN not set" in mlflow
    assert "Fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in mlflow
    assert any(a.startswith("Basic ") for a in handler.seen_auth)  # the credentials were sent, not shown
    assert "warn gpu: no GPU" in out.stdout  # absent, not asked for: still a warning
    for value in SECRETS.values():
        assert value not in out.stdout and value not in out.stderr


def test_an_existing_bucket_lists_ok_and_a_missing_one_fails(s3_bucket, s3_endpoint):
    creds, listed = doctor.s3_checks(f"s3://{s3_bucket}/")
    assert (creds.status, listed.status) == ("ok", "ok"), (creds.line(), listed.line())
    assert "credentials from environment" in creds.text and s3_endpoint in creds.text
    assert listed.line() == f"ok   s3: s3://{s3_bucket}/: listed at {s3_endpoint}"
    _, empty = doctor.s3_checks(f"s3://{s3_bucket}/nothing-here-yet")
    assert empty.status == "warn" and "nothing under this prefix yet" in empty.text
    _, missing = doctor.s3_checks("s3://no-such-bucket/x")
    assert missing.status == "FAIL" and "the bucket no-such-bucket does not exist" in missing.line()


def test_a_tracking_server_that_answers_is_ok(quiet_env, fake_mlflow, monkeypatch):
    tracking, _ = fake_mlflow(200)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-s3cr3t")
    [check] = doctor.mlflow_checks(nodes=1)
    assert check.status == "ok" and "answers" in check.text and "MLFLOW_TRACKING_TOKEN set" in check.text
    assert "tok-s3cr3t" not in check.line()


def test_a_local_store_on_a_cluster_of_several_nodes_fails(quiet_env):
    [check] = doctor.mlflow_checks(nodes=2)
    assert check.status == "FAIL" and "MLFLOW_TRACKING_URI" in check.fix


def test_a_ray_cluster_is_described_with_its_node_types(ray_local, monkeypatch):
    nodes: list[int] = []
    cluster, alive, types = doctor.ray_checks(None, False, nodes)
    assert cluster.status == "ok" and "CPU 4" in cluster.text and nodes == [1]
    assert alive.text.startswith("1 alive: ")
    assert types.line() == "ok   ray node types: none: no autoscaler found for this cluster (its nodes are all it has)"
    [no_gpu, *_] = doctor.ray_checks(None, True, [])
    assert no_gpu.status == "FAIL" and "drop --use-gpu" in no_gpu.fix
    from artnet import cluster

    monkeypatch.setattr(cluster, "node_types", lambda: (
        [cluster.NodeType("gpu_worker", {"CPU": 48, "GPU": 4, "trainer": 1}, max_workers=4)], -1))
    scalable, _, types = doctor.ray_checks(None, True, [])
    assert scalable.status == "warn" and "the autoscaler can add some (gpu_worker)" in scalable.text
    assert types.text == "gpu_worker (CPU 48, GPU 4, trainer 1; up to 4 nodes)"


def test_what_a_gpu_node_would_print(monkeypatch):
    """The GPU lines from TensorFlow's answers on a GPU node (none here), and the reasons for none."""
    facts = doctor.TensorFlowFacts(version="2.21.0", cuda_build=True, cuda_version="12.5.1", has_nccl=True,
                                   gpus=(("NVIDIA A10G", (8, 6)),) * 2)
    assert doctor.gpu_check(facts, True).line() == "ok   gpu: 2 x NVIDIA A10G (compute 8.6) (TensorFlow 2.21.0)"
    assert doctor.precision_check(facts).text == "train.precision=auto -> mixed_bfloat16 on this node (GPU compute 8.6)"
    assert doctor.collectives_check(facts, True).text.startswith("NCCL for GPU all-reduce (2 GPU(s)")
    t4 = doctor.TensorFlowFacts("2.21.0", True, "12.5.1", (("Tesla T4", (7, 5)),), True)
    assert "-> mixed_float16" in doctor.precision_check(t4).text
    cpu_build = doctor.TensorFlowFacts("2.21.0", False, "", (), False)
    assert doctor.no_gpu_reason(cpu_build) == "TensorFlow 2.21.0 built without CUDA"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in doctor.no_gpu_reason(facts)
