"""`artnet doctor` (or `python -m artnet.doctor`, e.g. in the cluster's image): what a job would get on this node
and cluster, one line per check, before a job finds out the slow way.

Each line is `ok`, `warn` (something merely absent: no GPU on a CPU node, no AWS credentials, no Ray cluster) or
`FAIL` with the fix; any FAIL ends the command with exit status 2, like every other user error. Checks: the GPUs
TensorFlow sees (or why it sees none), the precision `train.precision=auto` would pick, the collectives
all-reduce would use, S3 credentials, endpoint and (with `--s3`) a listing, the Ray cluster (with `--address` or
RAY_ADDRESS, or one `ray start` left on this node; never a new local one) and its autoscaler's node types, and the
MLflow tracking server and whether its credentials are set. Secrets are never printed: only "set" / "not set",
and URLs lose any user:password part.

Every network probe is bounded (a dead endpoint fails in seconds, not after a client's minutes of retries).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from artnet import console
from artnet.errors import UserError

OK, WARN, FAIL = "ok", "warn", "FAIL"
PROBE_TIMEOUT_S = 5  # one HTTP request or TCP connect of a check
# Environment variables whose values are secrets: never printed, and scrubbed from any message that echoes them.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")
MLFLOW_AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
GPU_FIX = ("install TensorFlow with CUDA (pip install 'tensorflow[and-cuda]', as the cluster image does) on a node "
           "with NVIDIA drivers (cluster.yaml's GPU node type; `docker run --gpus all`), or drop --use-gpu")


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    name: str
    text: str
    fix: str = ""

    def line(self) -> str:
        return scrub(f"{self.status:<4} {self.name}: {self.text}" + (f". Fix: {self.fix}" if self.fix else ""))


def add_options(p: argparse.ArgumentParser) -> None:
    """`artnet doctor`'s options (also `python -m artnet.doctor`'s: it runs the same command)."""
    p.add_argument("--use-gpu", action="store_true", help="jobs will run with --use-gpu: no GPU is a failure")
    p.add_argument("--s3", metavar="URI", help="an s3://bucket/prefix a job will read or write: list it")
    p.add_argument("--address", help="Ray cluster to look at (default $RAY_ADDRESS, else a cluster `ray start` "
                                     "left on this node; a local instance is never started)")


def scrub(text: str) -> str:
    """`text` without secret values from the environment or user:password parts of URLs."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------- GPU, precision, NCCL

@dataclass(frozen=True)
class TensorFlowFacts:
    version: str
    cuda_build: bool
    cuda_version: str  # what TensorFlow was built against ("" without CUDA)
    gpus: tuple[tuple[str, tuple[int, int]], ...]  # (name, compute capability) of each GPU TensorFlow sees
    has_nccl: bool  # tf.distribute knows the NCCL communication implementation

    @property
    def capabilities(self) -> list[tuple[int, int]]:
        return [cc for _, cc in self.gpus]


def tensorflow_facts() -> TensorFlowFacts:
    tf = console.import_tensorflow()
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append((details.get("device_name") or device.name,
                     tuple(details.get("compute_capability") or (0, 0))))
    return TensorFlowFacts(
        version=tf.__version__, cuda_build=tf.test.is_built_with_cuda(),
        cuda_version=str(tf.sysconfig.get_build_info().get("cuda_version") or ""), gpus=tuple(gpus),
        has_nccl=hasattr(tf.distribute.experimental.CommunicationImplementation, "NCCL"))


def _missing_cuda_packages() -> list[str]:
    """The `tensorflow[and-cuda]` libraries (nvidia-*-cu12 wheels) that are not installed, from TensorFlow's own
    metadata."""
    import importlib.metadata as md

    try:
        names = [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in md.requires("tensorflow") or []
                 if re.search(r"""extra\s*==\s*["']and-cuda["']""", r)]
    except md.PackageNotFoundError:
        return []
    missing = []
    for name in names:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return missing


def _driver_gpus() -> int | None:
    """GPUs the NVIDIA driver lists (`nvidia-smi -L`); None without nvidia-smi or when it fails."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else None


def no_gpu_reason(facts: TensorFlowFacts) -> str:
    """Why TensorFlow sees no GPU here, as far as can be told without one."""
    if not facts.cuda_build:
        return f"TensorFlow {facts.version} built without CUDA"
    built = f"TensorFlow {facts.version} built with CUDA {facts.cuda_version or '?'}"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"{built}, but CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    missing = _missing_cuda_packages()
    libs = f"; tensorflow[and-cuda] libraries not installed ({len(missing)} missing)" if missing else ""
    listed = _driver_gpus()
    if listed is None and not os.path.exists("/proc/driver/nvidia/version"):
        return f"{built}, but no NVIDIA driver on this node (no nvidia-smi, no /proc/driver/nvidia){libs}"
    if listed:
        return (f"{built}; the driver lists {listed} GPU(s) but TensorFlow cannot use them{libs} "
                f"(TensorFlow's start-up log: {os.path.join(tempfile.gettempdir(), 'artnet-tensorflow.log')})")
    return f"{built}, but the NVIDIA driver lists no GPU{libs}"


def gpu_check(facts: TensorFlowFacts, use_gpu: bool) -> Check:
    if facts.gpus:
        groups = Counter(facts.gpus)
        listed = ", ".join(f"{n} x {name} (compute {cc[0]}.{cc[1]})" for (name, cc), n in groups.items())
        return Check(OK, "gpu", f"{listed} (TensorFlow {facts.version})")
    why = no_gpu_reason(facts)
    if use_gpu:
        return Check(FAIL, "gpu", f"no GPU: {why}; --use-gpu asks for one", GPU_FIX)
    return Check(WARN, "gpu", f"no GPU: {why}; jobs here train on the CPU")


def precision_check(facts: TensorFlowFacts) -> Check:
    from artnet.train.trainer import precision_policy  # the rule a training worker applies

    policy = precision_policy("auto", facts.capabilities)
    seen = (f"GPU compute {', '.join(f'{a}.{b}' for a, b in sorted(set(facts.capabilities)))}" if facts.gpus
            else "no GPU")
    return Check(OK, "precision", f"train.precision=auto -> {policy} on this node ({seen})")


def collectives_check(facts: TensorFlowFacts, use_gpu: bool) -> Check:
    """Which all-reduce MultiWorkerMirroredStrategy would have, without starting one (cheap)."""
    if facts.gpus and facts.cuda_build and facts.has_nccl:
        return Check(OK, "collectives", f"NCCL for GPU all-reduce ({len(facts.gpus)} GPU(s); "
                                        "MultiWorkerMirroredStrategy's AUTO uses it on GPUs)")
    if facts.gpus:
        return Check(WARN, "collectives", "ring (CPU) collectives: this TensorFlow has no NCCL, so GPU all-reduce "
                                          "goes through the host")
    return Check(WARN if use_gpu else OK, "collectives", "ring (CPU) collectives (no GPU, so no NCCL)")


# ------------------------------------------------------------------------------------------------------ S3

CREDENTIAL_SOURCES = {
    "env": "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    "shared-credentials-file": "shared credentials file {file} (profile {profile})",
    "config-file": "AWS config file (profile {profile})",
    "iam-role": "instance profile (EC2 instance metadata)",
    "container-role": "container role (ECS / EKS Pod Identity)",
    "assume-role": "assumed role (profile {profile})",
    "assume-role-with-web-identity": "web identity role (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, e.g. EKS IRSA)",
    "sso": "AWS SSO (profile {profile})",
}


def credentials_source() -> str | None:
    """Where the AWS credential chain finds credentials (botocore's view; pyarrow's SDK walks the same chain),
    or None. Never the values. The instance-metadata probe is cut to one short try."""
    import botocore.session

    session = botocore.session.Session()
    session.set_config_variable("metadata_service_timeout", 1)
    session.set_config_variable("metadata_service_num_attempts", 1)
    creds = session.get_credentials()
    if creds is None:
        return None
    template = CREDENTIAL_SOURCES.get(creds.method, creds.method)
    return template.format(profile=session.get_config_variable("profile") or "default",
                           file=session.get_config_variable("credentials_file"))


def _network_cause(text: str) -> str:
    for needle, cause in (("curlCode: 7,", "connection refused"), ("curlCode: 6,", "host name not found"),
                          ("curlCode: 28,", "no answer in time"), ("curlCode: 35,", "TLS handshake failed"),
                          ("curlCode: 60,", "TLS certificate not trusted")):
        if needle in text:
            return cause
    return ""


def s3_checks(uri: str | None) -> Iterator[Check]:
    import pyarrow.fs as pafs

    from artnet.data import storage

    settings = storage.S3Settings.from_env()
    source = next((k for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(k)), None)
    endpoint = (f"endpoint {settings.endpoint} (from {source})" if settings.endpoint else
                f"endpoint AWS S3 (region {settings.region or 'from the AWS config'})")
    try:
        creds = credentials_source()
    except Exception as e:  # a broken ~/.aws file, say: a job would trip on it too
        yield Check(FAIL, "s3", f"credentials: the AWS credential chain fails: {_first_line(e)}; {endpoint}",
                    "fix ~/.aws/config / ~/.aws/credentials or AWS_PROFILE")
    else:
        if creds:
            yield Check(OK, "s3", f"credentials from {creds}; {endpoint}")
        else:
            yield Check(WARN, "s3", f"no AWS credentials found (AWS_ACCESS_KEY_ID, AWS_PROFILE / ~/.aws, instance "
                                    f"role); only public buckets are readable; {endpoint}")
    if not uri:
        return
    # storage's own filesystem, with one try instead of its retries: the SDK's timeouts (connect 1 s, request 3 s)
    # then bound a dead endpoint to a few seconds.
    fs = storage._s3_filesystem(settings, 1)
    path = uri[len("s3://"):].rstrip("/")
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(path)
        # a missing bucket reads as a missing prefix: ask for the bucket itself
        found = info.type != pafs.FileType.NotFound
        bucket_found = found or fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        explained = storage.explain_s3_error(uri, e)
        if explained is None:
            yield Check(FAIL, "s3", f"{uri}: listing fails at {settings.endpoint or 'AWS S3'}: {_first_line(e)}",
                        "check the URI, the credentials and AWS_ENDPOINT_URL_S3")
            return
        cause = _network_cause(str(e))
        yield Check(FAIL, "s3", f"{explained.subject}: {explained.problem}" + (f" ({cause})" if cause else ""),
                    explained.fix)
        return
    if not bucket_found:
        yield Check(FAIL, "s3", f"{uri}: the bucket {bucket} does not exist at {settings.endpoint or 'AWS S3'}",
                    "check the bucket name in the URI, or create the bucket")
    elif not found:
        yield Check(WARN, "s3", f"{uri}: the bucket answers, nothing under this prefix yet (fine for outputs)")
    else:
        kind = "an object" if info.type == pafs.FileType.File else "listed"
        yield Check(OK, "s3", f"{uri}: {kind} at {settings.endpoint or 'AWS S3'}")


# ------------------------------------------------------------------------------------------------------ Ray

def _resources(res: dict) -> str:
    """`CPU 16, GPU 4, memory 60.0 GiB, trainer 4` from a Ray resource dict."""
    def amount(key, value):
        if key in ("memory", "object_store_memory"):
            return f"{value / 2 ** 30:.1f} GiB"
        return f"{value:g}"

    keys = [k for k in ("CPU", "GPU", "memory") if k in res]
    keys += sorted(k for k in res if k not in keys and not k.startswith("node:") and k != "object_store_memory")
    return ", ".join(f"{k} {amount(k, res[k])}" for k in keys) or "nothing"


def _probe_tcp(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port or 10001)), timeout=PROBE_TIMEOUT_S):
        pass


def ray_checks(address: str | None, use_gpu: bool, nodes_out: list) -> Iterator[Check]:
    """The cluster a job would run on; `nodes_out` gets its number of alive nodes (0 without one)."""
    import ray

    connected_here, where = False, "the Ray this process already joined"
    if ray.is_initialized():
        where = getattr(ray.get_runtime_context(), "gcs_address", where)
    else:
        from ray._private import services

        given = address or os.environ.get("RAY_ADDRESS") or None
        source = "--address" if address else "RAY_ADDRESS" if given else "the cluster `ray start` left on this node"
        try:
            target = given if given and given.startswith("ray://") else services.canonicalize_bootstrap_address(given)
        except Exception as e:
            yield Check(FAIL, "ray", f"no Ray cluster at {given} ({source}): {_first_line(e)}",
                        f"start one (ray start --head, ray up cluster.yaml) or correct {source}")
            return
        if target is None:
            yield Check(OK, "ray", f"no Ray cluster running; jobs start a local one ({os.cpu_count()} CPUs on this "
                                   "node; set RAY_ADDRESS or --address for a cluster)")
            return
        try:  # ray.init retries a dead address for minutes: a bounded TCP connect first
            _probe_tcp(target)
        except (OSError, ValueError) as e:
            yield Check(FAIL, "ray", f"nothing answers at {given or target} ({source}): {_first_line(e)}",
                        f"start the cluster (ray start --head, ray up cluster.yaml) or correct {source}")
            return
        import logging

        try:
            with console._start_up_log("ray-init"):
                ray.init(address=target, log_to_driver=False,
                         logging_level=logging.INFO if console.is_verbose() else logging.WARNING)
        except Exception as e:  # a Ray version unlike the cluster's, say
            yield Check(FAIL, "ray", f"cannot join the cluster at {given or target} ({source}): {_first_line(e)}",
                        f"run this node with the cluster's Ray version (this one has Ray {ray.__version__}) and "
                        f"check {source}")
            return
        connected_here, where = True, f"{target} ({source})"
    try:
        yield from _describe_cluster(where, use_gpu, nodes_out)
    finally:
        if connected_here:
            ray.shutdown()


def _describe_cluster(where: str, use_gpu: bool, nodes_out: list) -> Iterator[Check]:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes_out.append(len(alive))
    from artnet import cluster

    try:
        types = cluster.node_types()[0]
    except Exception:  # a Ray Client connection, say: no GCS to ask
        types = []
    text = f"cluster at {where}: {_resources(total)} (free now: {_resources(free)})"
    if use_gpu and not total.get("GPU"):
        scalable = [t.name for t in types if t.resources.get("GPU") and t.max_workers]
        if scalable:
            yield Check(WARN, "ray", f"{text}; no GPU up yet, the autoscaler can add some ({', '.join(scalable)})")
        else:
            yield Check(FAIL, "ray", f"{text}; no GPU, and --use-gpu asks for one",
                        "add GPU nodes (cluster.yaml's GPU node type, or `ray start --num-gpus N` on a GPU node), "
                        "or drop --use-gpu")
    else:
        yield Check(OK, "ray", text)
    shown = [f"{n.get('NodeManagerAddress', '?')} ({_resources(n.get('Resources', {}))})" for n in alive[:8]]
    more = f"; and {len(alive) - 8} more" if len(alive) > 8 else ""
    yield Check(OK, "ray nodes", f"{len(alive)} alive: " + "; ".join(shown) + more)
    if not types:
        yield Check(OK, "ray node types", "none: no autoscaler found for this cluster (its nodes are all it has)")
    else:
        yield Check(OK, "ray node types", "; ".join(
            f"{t.name} ({_resources(t.resources)}; up to {'any number of' if t.max_workers < 0 else t.max_workers}"
            " nodes)" for t in types))


# ------------------------------------------------------------------------------------------------------ MLflow

@contextlib.contextmanager
def _quick_mlflow():
    """MLflow's HTTP client retries for minutes by default: one try of `PROBE_TIMEOUT_S` while the check runs."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mlflow_checks(nodes: int) -> Iterator[Check]:
    from artnet.track import tracking

    uri = tracking.resolve_uri("", "work")  # what a job with the default workdir would use
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default: MLFLOW_TRACKING_URI unset"
    auth = ", ".join(f"{k} {'set' if os.environ.get(k) else 'not set'}" for k in MLFLOW_AUTH_ENV)
    auth_fix = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN "
                "(bearer token) to credentials the server accepts")
    if tracking.is_local_store(uri):
        try:
            tracking.check_reachable(uri, None, nodes)
        except UserError as e:
            yield Check(FAIL, "mlflow", f"{uri} ({origin}): {e.problem}", e.fix)
            return
        yield Check(OK, "mlflow", f"{uri} ({origin}): a local store on this machine, fine for one node")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        health = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(health, timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                yield Check(FAIL, "mlflow", f"{uri}: /health answers HTTP {e.code}; {auth}", auth_fix)
                return
            yield Check(FAIL, "mlflow", f"{uri}: /health answers HTTP {e.code}; is this an MLflow server?",
                        "set MLFLOW_TRACKING_URI to the tracking server's URL")
            return
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            yield Check(FAIL, "mlflow", f"{uri} ({origin}): no answer from {health}: {reason}",
                        "start the tracking server (mlflow server ...) or set MLFLOW_TRACKING_URI to one this "
                        "node reaches")
            return
    try:
        from mlflow import MlflowClient

        with _quick_mlflow():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        status = getattr(e, "get_http_status_code", lambda: None)()
        if status in (401, 403):
            yield Check(FAIL, "mlflow", f"{uri}: the server refuses the request (HTTP {status}); {auth}", auth_fix)
        else:
            yield Check(FAIL, "mlflow", f"{uri} ({origin}): searching experiments fails: {_first_line(e)}",
                        "check MLFLOW_TRACKING_URI and the server's log")
        return
    yield Check(OK, "mlflow", f"{uri} ({origin}) answers; {auth}")


# ------------------------------------------------------------------------------------------------------ all

def checks(use_gpu: bool = False, s3: str | None = None, address: str | None = None) -> Iterator[Check]:
    """Every check, in order, as each finishes; a check that breaks becomes its own FAIL line."""
    def guarded(name: str, make) -> Iterator[Check]:
        try:
            yield from make()
        except Exception as e:
            if console.is_verbose():
                raise
            yield Check(FAIL, name, f"the check itself failed: {_first_line(e)}",
                        "run with --verbose for the traceback")

    facts: list[TensorFlowFacts] = []

    def gpu() -> Iterator[Check]:
        facts.append(tensorflow_facts())
        yield gpu_check(facts[0], use_gpu)

    yield from guarded("gpu", gpu)
    if facts:
        yield from guarded("precision", lambda: iter([precision_check(facts[0])]))
        yield from guarded("collectives", lambda: iter([collectives_check(facts[0], use_gpu)]))
    nodes: list[int] = []
    yield from guarded("s3", lambda: s3_checks(s3))
    yield from guarded("ray", lambda: ray_checks(address, use_gpu, nodes))
    yield from guarded("mlflow", lambda: mlflow_checks(nodes[0] if nodes else 0))


def run(args: argparse.Namespace) -> list[Check]:
    """Print each check's line as it comes; a `UserError` (exit 2) when any failed."""
    from artnet.config import ConfigError

    if args.s3 and not args.s3.startswith("s3://"):
        raise ConfigError("--s3", f"is {args.s3!r}", "pass an s3://bucket/prefix")
    done = []
    for check in checks(args.use_gpu, args.s3, args.address):
        print(check.line(), flush=True)
        done.append(check)
    failed = [c.name for c in done if c.status == FAIL]
    if failed:
        raise UserError("artnet doctor", f"{len(failed)} check(s) failed ({', '.join(dict.fromkeys(failed))})",
                        "see each FAIL line above")
    return done


def main(argv: list[str] | None = None) -> int:
    """`python -m artnet.doctor [options]` is `artnet doctor [options]`."""
    from artnet import cli

    return cli.main(["doctor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
