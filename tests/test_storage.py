import pytest

from artnet.data import storage


def test_s3_settings_follow_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert storage.S3Settings.from_env() == storage.S3Settings("http://s3-specific:2", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.S3Settings.from_env().endpoint == "http://generic:1"


def test_pyarrow_and_boto3_see_the_same_objects(s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/storage/a/b.bin", b"written by pyarrow")
    client = storage.boto3_client()
    assert client.get_object(Bucket=s3_bucket, Key="storage/a/b.bin")["Body"].read() == b"written by pyarrow"
    client.put_object(Bucket=s3_bucket, Key="storage/c.bin", Body=b"written by boto3")
    assert storage.read_bytes(f"s3://{s3_bucket}/storage/c.bin") == b"written by boto3"
    paths = [i.path for i in storage.list_files(f"s3://{s3_bucket}/storage")]
    assert paths == [f"{s3_bucket}/storage/a/b.bin", f"{s3_bucket}/storage/c.bin"]
    assert storage.exists(f"s3://{s3_bucket}/storage/c.bin")
    assert not storage.exists(f"s3://{s3_bucket}/storage/nope.bin")


def test_local_paths_and_file_uris(tmp_path):
    storage.write_bytes(str(tmp_path / "x" / "y.txt"), b"hi")
    assert storage.read_bytes(f"file://{tmp_path}/x/y.txt") == b"hi"
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "missing"))


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="use a local path or s3://"):
        storage.resolve("gs://bucket/x")
