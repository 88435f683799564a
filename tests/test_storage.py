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


@pytest.mark.parametrize("kind", ["slow_down", "internal_error", "reset"])
def test_reads_retry_transient_faults_a_bounded_number_of_times(s3_bucket, monkeypatch, kind):
    from faults import FaultyProxy

    storage.write_bytes(f"s3://{s3_bucket}/retry/a.bin", b"painting")
    monkeypatch.setattr(storage, "BACKOFF_S", (0.001, 0.01))
    with FaultyProxy(storage.S3Settings.from_env().endpoint, rate=0.2, seed=1, kinds=(kind,)) as proxy:
        via = storage.S3Settings(proxy.endpoint, "us-east-1")
        retried = []
        assert [storage.read_bytes(f"s3://{s3_bucket}/retry/a.bin", via, retried) for _ in range(10)] == [b"painting"] * 10
        assert 0 < len(retried) <= proxy.injected[kind]
        proxy.rate, retried = 1.0, []
        with pytest.raises(Exception):
            storage.read_bytes(f"s3://{s3_bucket}/retry/a.bin", via, retried)
        assert len(retried) == storage.S3_ATTEMPTS - 1, "tries are bounded"


def test_a_missing_object_or_a_refused_credential_is_not_retried(s3_bucket):
    retried = []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{s3_bucket}/retry/nope.bin", None, retried)
    assert retried == []
    assert not storage.is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"))
    assert not storage.is_transient(OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, "
                                            "Couldn't connect to server"))
