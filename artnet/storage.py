"""One place that turns a URI into a filesystem.

Local paths (or file://) and s3://bucket/prefix are supported. S3 settings follow the AWS conventions, so the
same environment works for pyarrow, boto3, Ray Data and MLflow: credentials come from the standard chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles), the region from AWS_REGION or
AWS_DEFAULT_REGION, and an S3-compatible endpoint (MinIO, Ceph, moto) from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, or an explicit `endpoint=` argument.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


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


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict = {}
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
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(uri_like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as `uri_like`."""
    return f"s3://{path}" if is_s3(uri_like) else path


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    fs, path = resolve(uri, settings)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, settings: S3Settings | None = None) -> None:
    fs, path = resolve(uri, settings)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    fs, path = resolve(uri, settings)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, settings: S3Settings | None = None) -> list[pafs.FileInfo]:
    """Every file below `uri` (recursive), sorted by path. Raises FileNotFoundError for a missing prefix."""
    fs, path = resolve(uri, settings)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    if info.type == pafs.FileType.File:
        return [info]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def boto3_client(settings: S3Settings | None = None):
    """A boto3 S3 client configured like the pyarrow filesystem (same endpoint and region)."""
    import boto3

    settings = settings or S3Settings.from_env()
    return boto3.client("s3", endpoint_url=settings.endpoint, region_name=settings.region)
