"""One place that turns a URI into a filesystem.

Local paths (or file://) and s3://bucket/prefix are supported. S3 settings follow the AWS conventions, so the
same environment works for pyarrow, boto3, Ray Data and MLflow: credentials come from the standard chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles), the region from AWS_REGION or
AWS_DEFAULT_REGION, and an S3-compatible endpoint (MinIO, Ceph, moto) from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, or an explicit `endpoint=` argument.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import random
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from artnet.errors import UserError


@dataclass(frozen=True)
class S3Settings:
    """Where S3 lives. Resolved on the driver and shipped to Ray workers so they all talk to the same store."""

    endpoint: str | None = None  # full URL, e.g. http://127.0.0.1:9000
    region: str | None = None

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return cls(endpoint=endpoint, region=region)


# The object-store endpoint and region settings (never credentials) that a job's training workers take from the
# driver: MLflow's artifact client on rank 0 reads them from its own environment.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")


def endpoint_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute, URIs as they are. Ray workers do not run in the driver's working directory,
    so every local path a job ships to them is made absolute on the driver first."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


# Substrings of the AWS SDK's messages (as pyarrow passes them on) -> what the user should look at.
_S3_FAULTS = (
    (("NETWORK_CONNECTION", "Could not connect", "Couldn't resolve", "curlCode"),
     "cannot reach the object store at {endpoint}",
     "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or unset them for AWS itself) and the network"),
    (("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
      "ExpiredToken", "HTTP response code: 403", "No credentials"),
     "access denied by the object store at {endpoint}",
     "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, the instance role) and that "
     "they may use this bucket"),
    (("NoSuchBucket", "NO_SUCH_BUCKET", "does not exist"),
     "the bucket does not exist at {endpoint}",
     "check the bucket name in the URI, or create the bucket"),
)


FAULT_FIXES = {
    "credentials": "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, the instance role)",
    "endpoint": "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network",
    "missing objects": "the catalog lists files that are gone: re-run `artnet catalog` on the source",
    "corrupt files": "remove or replace those files (or raise data.max_bad_share to accept the loss)",
    "unreadable": "check that the files can be read from every node",
}


# Faults that pass (the AWS SDK's error names as pyarrow passes them on): retried with backoff. A refused
# connection (curl 7) is not among them: nothing listens there, and the user should hear so at once.
_TRANSIENT = ("SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "THROTTLING", "REQUEST_TIMEOUT",
              "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504",
              "curlCode: 8,", "curlCode: 18,", "curlCode: 28,", "curlCode: 52,", "curlCode: 55,", "curlCode: 56,")
S3_ATTEMPTS = 5  # tries of one S3 request through transient faults; 403/404 are never retried
BACKOFF_S = (0.05, 2.0)  # full-jitter exponential backoff: first step, cap


def is_transient(error: BaseException) -> bool:
    """A throttled, failed-on-the-server or reset request, worth trying again (not a missing object or a
    refused credential)."""
    return (isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
            and any(n in str(error) for n in _TRANSIENT))


def backoff_s(attempt: int) -> float:
    first, cap = BACKOFF_S
    return random.uniform(0, min(cap, first * 2 ** attempt))


def fault_class(reason: str, detail: str) -> str:
    """The cause class of an unusable image, for the bad-data budget's message: credentials, endpoint, missing
    objects, corrupt files, or unreadable."""
    if reason != "unreadable":
        return "corrupt files"  # it was read: its bytes are the problem
    for needles, cause in ((_S3_FAULTS[1][0], "credentials"), (_S3_FAULTS[0][0], "endpoint"),
                           (("NoSuchKey", "NOT_FOUND", "Not Found", "404", "FileNotFoundError", "No such file",
                             "Path does not exist", "NoSuchBucket"), "missing objects")):
        if any(n in detail for n in needles):
            return cause
    return "unreadable"


def explain_s3_error(uri: str, error: BaseException) -> UserError | None:
    """A one-line `UserError` for an object-store failure the user can fix (endpoint, credentials, bucket),
    or None when the error is something else."""
    text = str(error)
    endpoint = S3Settings.from_env().endpoint or "AWS's default endpoint"
    for needles, problem, fix in _S3_FAULTS:
        if any(n in text for n in needles):
            return UserError(uri, problem.format(endpoint=endpoint), fix)
    return None


@contextlib.contextmanager
def _explained(uri: str):
    try:
        yield
    except FileNotFoundError:
        raise  # a missing object, not a missing bucket: its URI says it all
    except OSError as e:
        explained = explain_s3_error(uri, e) if is_s3(uri) else None
        if explained is None:
            raise
        raise explained from e


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings, attempts: int = S3_ATTEMPTS) -> pafs.S3FileSystem:
    """The SDK retries transient faults itself (`attempts` tries), except on the filesystem `read_bytes`
    uses (1 try), which retries them where it can count them."""
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if settings.endpoint:
        parsed = urlparse(settings.endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if settings.region:
        kwargs["region"] = settings.region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    return _s3_filesystem(settings or S3Settings.from_env())


def resolve(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(settings), uri[len("s3://"):].rstrip("/")
    path = absolute(uri or ".")
    if "://" in path:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), path


def to_uri(uri_like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as `uri_like`."""
    return f"s3://{path}" if is_s3(uri_like) else path


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def read_bytes(uri: str, settings: S3Settings | None = None, retried: list | None = None) -> bytes:
    """The object's bytes. Transient S3 faults are retried here, up to `S3_ATTEMPTS` tries with backoff, each
    retry's error appended to `retried` (what the pipeline counts); other errors raise at once."""
    if not is_s3(uri):
        fs, path = resolve(uri, settings)
        with _explained(uri), fs.open_input_stream(path) as f:
            return f.read()
    fs, path = _s3_filesystem(settings or S3Settings.from_env(), 1), uri[len("s3://"):]
    for attempt in range(S3_ATTEMPTS):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except OSError as e:
            if attempt < S3_ATTEMPTS - 1 and is_transient(e):
                if retried is not None:
                    retried.append(e)
                time.sleep(backoff_s(attempt))
                continue
            with _explained(uri):
                raise


def write_bytes(uri: str, data: bytes, settings: S3Settings | None = None) -> None:
    fs, path = resolve(uri, settings)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    with _explained(uri):
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    fs, path = resolve(uri, settings)
    with _explained(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, settings: S3Settings | None = None) -> list[pafs.FileInfo]:
    """Every file below `uri` (recursive), sorted by path. Raises FileNotFoundError for a missing prefix."""
    fs, path = resolve(uri, settings)
    with _explained(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"nothing at {uri}")
        if info.type == pafs.FileType.File:
            return [info]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def ray_storage(uri: str) -> dict:
    """`storage_path` (and `storage_filesystem` for s3://) as Ray Train and Tune's RunConfig take them."""
    if is_s3(uri):
        return {"storage_path": uri[len("s3://"):], "storage_filesystem": s3_filesystem()}
    return {"storage_path": absolute(uri)}


def boto3_client(settings: S3Settings | None = None):
    """A boto3 S3 client configured like the pyarrow filesystem (same endpoint and region)."""
    import boto3
    from botocore.config import Config

    settings = settings or S3Settings.from_env()
    return boto3.client("s3", endpoint_url=settings.endpoint, region_name=settings.region,
                        config=Config(retries={"mode": "standard", "max_attempts": S3_ATTEMPTS}))
