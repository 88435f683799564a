"""The cluster launcher config and the Dockerfile are checked offline with Ray's own validation code."""

import copy
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO


# What each instance type offers (AWS's instance type pages): vCPUs, GPUs and memory in GiB. The node types must
# declare the first two as they are, and size /dev/shm (Ray's object store) from the third.
INSTANCE_TYPES = {
    "m7i.4xlarge": {"CPU": 16, "GPU": 0, "memory_gib": 64},
    "c7i.8xlarge": {"CPU": 32, "GPU": 0, "memory_gib": 64},
    "g5.12xlarge": {"CPU": 48, "GPU": 4, "memory_gib": 192},  # 4x A10G
}
# Ray's object store takes 30% of the memory free at `ray start`, capped at 95% of /dev/shm: below 0.3 / 0.95 of
# the instance's memory the shm caps the store; above ~0.4 it only invites the store to crowd out the training
# processes (Ray's own launcher picks 0.33 when no --shm-size is given).
SHM_FRACTION = (0.3 / 0.95, 0.4)
DOCKER_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}  # docker run --shm-size: binary units


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def node_docker(config: dict, name: str) -> dict:
    """The docker settings a node type runs with, merged as Ray's launcher merges them (a node type's `docker`
    replaces the global keys it names; the head takes `head_*`, workers `worker_*`)."""
    merged = {**config["docker"], **config["available_node_types"][name].get("docker", {})}
    role = "head" if name == config["head_node_type"] else "worker"
    return {"image": merged.get(f"{role}_image", merged["image"]),
            "run_options": merged.get("run_options", []) + merged.get(f"{role}_run_options", [])}


def shm_bytes(run_options: list[str]) -> int:
    sizes = [re.fullmatch(r"--shm-size[= ]'?(\d+)([bkmg]?)'?", opt.strip().lower()) for opt in run_options
             if opt.strip().startswith("--shm-size")]
    assert len(sizes) == 1 and sizes[0], f"exactly one --shm-size, in docker units: {run_options}"
    return int(sizes[0][1]) * DOCKER_UNITS[sizes[0][2]]


def test_cluster_yaml_passes_ray_schema_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster()
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on anything Ray's launcher would refuse
    assert config["head_node_type"] in config["available_node_types"]

    # A misspelt required key: Ray names the key the node type lost, at that node type.
    broken = copy.deepcopy(config)
    head = broken["available_node_types"]["head"]
    head["node_confg"] = head.pop("node_config")
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate_config(prepare_config(broken))
    assert caught.value.message == "'node_config' is a required property"
    assert list(caught.value.path) == ["available_node_types", "head"]
    assert "'node_confg':" in str(caught.value), "the instance it shows holds the misspelling"
    # A misspelt optional key is named itself.
    broken = copy.deepcopy(config)
    gpu = broken["available_node_types"]["gpu_worker"]
    gpu["min_worker"] = gpu.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError) as caught:
        validate_config(prepare_config(broken))
    assert "'min_worker' was unexpected" in caught.value.message


def test_the_cluster_runs_the_image_the_dockerfile_builds_with_artnet_installed_in_it():
    import ray

    text = (REPO / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    assert "COPY --chown=ray:users artnet" in text and 'pip install --no-cache-dir ".[search]"' in text
    # TensorFlow with its own CUDA wheels, the version these tests ran with, installed before artnet (whose
    # `tensorflow>=` it then satisfies).
    pin = f'pip install --no-cache-dir "tensorflow[and-cuda]=={importlib.metadata.version("tensorflow")}"'
    assert pin in text, "the Dockerfile pins the tested TensorFlow with its CUDA extra"
    assert text.index(pin) < text.index('pip install --no-cache-dir ".[search]"')
    from artnet.console import NODE_ENV

    assert all(f"ENV {name}={value}\n" in text for name, value in NODE_ENV.items()), "every node's raylet settings"
    config = load_cluster()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert config["docker"]["image"].endswith(f"/artnet:{version}"), "the image `make image` builds and pushes"
    assert "docker build -t $(IMAGE) ." in (REPO / "Makefile").read_text()
    assert not config.get("setup_commands") and not config.get("file_mounts"), "nothing installed per node"
    assert all(node_docker(config, name)["image"] == config["docker"]["image"]
               for name in config["available_node_types"]), "every node type runs that image"
    # Training workers asked to take `trainer` (scaling.worker_resource) land on GPU nodes only.
    assert config["available_node_types"]["gpu_worker"]["resources"]["trainer"] == 1
    assert all("trainer" not in t["resources"] for n, t in config["available_node_types"].items() if n != "gpu_worker")


def test_every_node_type_has_what_a_run_needs():
    """Per node type: an instance profile (S3 reads and ECR pulls are signed with it), a host AMI, the shape it
    declares is the instance type's, and an object store sized from its memory. The GPU type scales from zero:
    jobs ask the autoscaler for its nodes (artnet/cluster.py)."""
    config = load_cluster()
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        arn = node_config.get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", arn), f"{name}: profile {arn!r}"
        assert node_config.get("ImageId"), f"{name}: an AMI with Docker and the NVIDIA driver"
        instance = INSTANCE_TYPES[node_config["InstanceType"]]
        assert node["resources"]["CPU"] == instance["CPU"] and node["resources"]["GPU"] == instance["GPU"], name
        fraction = shm_bytes(node_docker(config, name)["run_options"]) / (instance["memory_gib"] * 2**30)
        assert SHM_FRACTION[0] <= fraction <= SHM_FRACTION[1], f"{name}: /dev/shm is {fraction:.2f} of memory"
    assert not any("--shm-size" in opt for opt in config["docker"]["run_options"]), "sized per node type"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"] == "g5.12xlarge" and gpu["resources"]["GPU"] == 4
    assert gpu["resources"]["trainer"] == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert "scaling.wait_for_nodes_s" in (REPO / "cluster.yaml").read_text(), "the header says jobs wait for nodes"


def test_every_node_logs_docker_into_the_images_registry_before_pulling():
    config = load_cluster()
    registry = config["docker"]["image"].split("/")[0]
    ecr = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com", registry)
    assert ecr, f"docker.image names a private ECR registry: {registry}"
    assert ecr[2] == config["provider"]["region"]
    for name, node in config["available_node_types"].items():
        commands = node.get("initialization_commands", config.get("initialization_commands", []))  # Ray: a node
        logins = [c for c in commands if "docker login" in c]  # type's own list replaces the global one
        assert len(logins) == 1, f"{name}: one docker login in its initialization_commands"
        token, login = (shlex.split(part) for part in logins[0].split("|"))
        assert token == ["aws", "ecr", "get-login-password", "--region", ecr[2]]
        assert login == ["docker", "login", "--username", "AWS", "--password-stdin", registry]


def run_start_command(command: str, env: dict[str, str] | None = None) -> str:
    """Runs a `ray start` line of cluster.yaml as the launcher runs it in the container (bash -c, with Ray's own
    exported variables), `ray start` swapped for printing the MLFLOW_TRACKING_URI that Ray would inherit."""
    from ray.autoscaler._private.util import with_envs

    assert command.count("ray start") == 1
    printer = """python -c 'import os; print(os.environ["MLFLOW_TRACKING_URI"])' #"""
    line = with_envs([command.replace("ray start", printer)], env or {})[0]
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_head_serves_mlflow_and_every_ray_process_is_pointed_at_it():
    """An `mlflow server` on the head that every node reaches (sqlite: one worker process), started after Ray,
    and every `ray start` passes its address, by the head's private IP, to the processes it starts."""
    import ray.util

    config = load_cluster()
    head = config["head_start_ray_commands"]
    (start,) = [i for i, c in enumerate(head) if "ray start --head" in c]
    (serve,) = [i for i, c in enumerate(head) if "mlflow server" in c]
    assert serve > start, "the tracking server starts once Ray is up"
    args = shlex.split(head[serve][head[serve].index("mlflow server"):])
    option = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    port = option["--port"]
    assert option["--host"] == "0.0.0.0", "reachable from the worker nodes"
    if option["--backend-store-uri"].startswith("sqlite:"):
        assert option["--workers"] == "1", "sqlite under several writer processes raises 'database is locked'"
    assert option["--artifacts-destination"].startswith("s3://")

    assert run_start_command(head[start]) == f"http://{ray.util.get_node_ip_address()}:{port}"
    (worker,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert run_start_command(worker, {"RAY_HEAD_IP": "10.0.1.23"}) == f"http://10.0.1.23:{port}"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[start], "the head runs the autoscaler"


KEEP_WORKERS = """
import os, time
from pathlib import Path
import ray
from artnet import console

console.init_ray()
@ray.remote(num_cpus=0)
class Helper:  # Ray Train's and Ray Data's zero-CPU actors
    def pid(self): return os.getpid()
@ray.remote(num_cpus=1)
class Trainer:
    def pid(self): return os.getpid()
@ray.remote(num_cpus=1)
def decode(): return os.getpid()
actors = [Helper.remote() for _ in range(3)] + [Trainer.remote()]
ray.get([a.pid.remote() for a in actors])
ray.get(decode.remote())
time.sleep(4)  # an epoch's validation and checkpoint
ray.get(decode.remote())
logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
print(sum("idle for a long time" in p.read_text(errors="replace") for p in logs.glob("python-core-worker-*.log")))
"""


@pytest.mark.cluster
def test_a_local_ray_artnet_starts_keeps_idle_workers_between_epochs():
    """With a trainer and Ray's helper actors on the node, Ray's default stops a worker process idle for 1 s (each
    epoch's decode tasks then paid a new process); artnet's local instance keeps them through a 4-s gap. The
    control arm runs Ray's default (a user's own setting wins over artnet's), so the check can fail."""
    def idle_exits(**env) -> int:
        out = subprocess.run([sys.executable, "-c", KEEP_WORKERS], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled", **env}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout.split()[-1])

    assert idle_exits() == 0
    assert idle_exits(RAY_idle_worker_killing_time_threshold_ms="1000") >= 1


OVERLAPPED_CHECK = """
import os, threading, ray
from artnet import console

def check(fail):
    def run():
        print("check on its own thread:", threading.current_thread() is not threading.main_thread(),
              "before Ray was up:", not ray.is_initialized(), flush=True)
        with console._start_up_log("check"):  # as `import_tensorflow` does, inside init_ray's own redirect
            os.write(2, b"start-up noise\\n")
        if fail:
            raise ValueError("weights do not fit")
        return "checked"
    return run

try:
    console.init_ray(meanwhile=check(fail=True))
except ValueError as e:
    print("raised:", e, "Ray left up:", ray.is_initialized(), flush=True)
print("returned:", console.init_ray(meanwhile=check(fail=False)), "Ray up:", ray.is_initialized(), flush=True)
os.write(2, b"console after start-up\\n")
"""


@pytest.mark.cluster
def test_the_drivers_checks_run_while_ray_starts_and_a_failure_stops_the_ray_it_started():
    """`init_ray(meanwhile=...)`: the check runs on another thread while Ray starts (not before, not after); its
    error is raised and the local instance that call started is shut down; its result is returned; file
    descriptor 2 is the console again afterwards, with the start-up lines in log files."""
    out = subprocess.run([sys.executable, "-c", OVERLAPPED_CHECK], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "check on its own thread: True before Ray was up: True",
        "raised: weights do not fit Ray left up: False",
        "check on its own thread: True before Ray was up: True",
        "returned: checked Ray up: True"]
    assert "console after start-up" in out.stderr and "start-up noise" not in out.stderr
