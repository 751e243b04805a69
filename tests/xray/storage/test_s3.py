"""S3 access against a real HTTP endpoint (moto's server), with fake credentials."""

import hashlib
import os
import socket

import pytest

from xray.config.s3 import S3Config
from xray.errors import DatasetSourceError
from xray.storage import s3
from xray.storage.fetch import fetch


@pytest.fixture
def endpoint():
    server = s3.EmbeddedS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint, tmp_path):
    client = s3.make_client(max_attempts=1)
    source = tmp_path / "data.zip"
    source.write_bytes(b"PK" + bytes(range(256)) * 1000)
    location = s3.S3Location("chest-xray", "chest_xray.zip")
    assert s3.upload_if_missing(client, source, location) is True
    assert s3.upload_if_missing(client, source, location) is False
    return client, location, source


def test_download_streams_and_checksums(bucket, tmp_path):
    client, location, source = bucket
    seen = []
    info = s3.download(client, location, tmp_path / "out.zip", progress=lambda done, total: seen.append(done))
    assert info["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert info["size"] == source.stat().st_size and info["etag"]
    assert seen[-1] == info["size"]


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("s3://no-such-bucket/x.zip", "bucket does not exist"),
        ("s3://chest-xray/missing.zip", "object does not exist"),
    ],
)
def test_missing_bucket_or_key_is_one_clear_line(bucket, tmp_path, uri, reason):
    with pytest.raises(DatasetSourceError) as error:
        fetch(uri, tmp_path / "w", S3Config(max_attempts=1))
    assert str(error.value) == f"cannot read {uri}: {reason}"


def test_the_embedded_endpoint_gives_back_its_port_and_the_environment_on_stop(monkeypatch):
    """Stopped, the endpoint no longer listens and its port can be bound again; the endpoint and credentials it set
    are the ones found before."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "found-before")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    server = s3.EmbeddedS3().start()
    assert os.environ["AWS_ENDPOINT_URL_S3"] == server.endpoint
    s3.make_client(max_attempts=1).create_bucket(Bucket="answers")
    server.stop()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.port)) != 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", server.port))
    assert os.environ["AWS_ACCESS_KEY_ID"] == "found-before" and "AWS_ENDPOINT_URL_S3" not in os.environ


def test_unreachable_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    with pytest.raises(DatasetSourceError, match=r"cannot read s3://b/k.zip: S3 endpoint unreachable"):
        fetch("s3://b/k.zip", tmp_path, S3Config(max_attempts=1, connect_timeout_s=1))


def test_expected_sha256_mismatch_fails_before_extraction(bucket, tmp_path):
    with pytest.raises(DatasetSourceError, match="checksum mismatch"):
        fetch("s3://chest-xray/chest_xray.zip", tmp_path / "w", S3Config(max_attempts=1), expected_sha256="0" * 64)


def test_local_paths_are_read_directly(tmp_path):
    source = tmp_path / "a.zip"
    source.write_bytes(b"local bytes")
    for uri in (str(source), source.as_uri()):
        archive = fetch(uri, tmp_path / "w", S3Config())
        assert archive.sha256 == hashlib.sha256(b"local bytes").hexdigest() and archive.etag is None
    with pytest.raises(DatasetSourceError, match="not found"):
        fetch(str(tmp_path / "nope.zip"), tmp_path / "w", S3Config())
    with pytest.raises(DatasetSourceError, match="unsupported dataset URI scheme"):
        fetch("gs://bucket/a.zip", tmp_path / "w", S3Config())


def test_locate_names_the_content_and_fetch_refuses_an_object_that_changed(bucket, tmp_path):
    from xray.storage.fetch import locate

    client, location, source = bucket
    identity = locate(location.uri, S3Config())
    assert identity["size"] == source.stat().st_size and identity["etag"]
    assert identity["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # metadata from our upload
    assert fetch(location.uri, tmp_path / "a", S3Config(), identity=identity).sha256 == identity["sha256"]
    client.put_object(Bucket=location.bucket, Key=location.key, Body=b"PK another archive")
    with pytest.raises(DatasetSourceError, match="changed while it was being read"):
        fetch(location.uri, tmp_path / "b", S3Config(), identity=identity)
    assert locate(location.uri, S3Config()) != identity
    local = locate(str(source), S3Config())
    assert local == {"source_uri": str(source), "size": source.stat().st_size, "sha256": identity["sha256"]}


def test_weights_on_s3_are_fetched_for_the_build_and_removed_after(bucket, scratch_tempdir):
    from xray.model.network import resolved_weights

    client, _, source = bucket
    client.upload_file(str(source), "chest-xray", "weights/backbone.weights.h5")
    with resolved_weights("s3://chest-xray/weights/backbone.weights.h5") as weights:
        assert open(weights, "rb").read() == source.read_bytes() and weights.endswith("backbone.weights.h5")
    assert list(scratch_tempdir.iterdir()) == []
    with resolved_weights("none") as none, resolved_weights("ImageNet") as imagenet:
        assert none is None and imagenet == "imagenet"
