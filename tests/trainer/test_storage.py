"""Storage URIs: file:// and pvc:// locally, s3:// against the real MinIO (e2e)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubelora import storage
from kubelora.trainer.errors import StorageError, VerificationError

pytestmark = pytest.mark.trainer


def test_parse_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.parse_uri("s3://b/k/x.json") == storage.Location("s3", "b", "k/x.json")
    assert storage.parse_uri("file:///tmp/a").key == "/tmp/a"
    assert storage.parse_uri("hf://org/name").key == "org/name"
    assert storage.local_path(storage.parse_uri("pvc://claim/dir/f.jsonl")) == Path("/mnt/pvc/claim/dir/f.jsonl")
    monkeypatch.setenv("KUBELORA_PVC_ROOT", str(tmp_path))
    assert storage.local_path(storage.parse_uri("pvc://claim/f")) == tmp_path / "claim" / "f"
    assert storage.parse_uri("s3://b/out/").child("eval", "r.json").uri == "s3://b/out/eval/r.json"
    for bad in ("gs://b/k", "s3:///k", "file://"):
        with pytest.raises(StorageError):
            storage.parse_uri(bad)


def test_one_parser_for_the_operator_and_the_trainer() -> None:
    loc = storage.parse_s3("s3://b/out/")
    assert loc == storage.parse_uri("s3://b/out/") == storage.Location("s3", "b", "out/")
    assert str(loc.child("_kubelora/uid/progress.json")) == "s3://b/out/_kubelora/uid/progress.json"
    assert (loc.bucket, loc.child("x").key) == ("b", "out/x")
    assert storage.parse_uri("s3://b/k?v#1").key == "k?v#1"  # object keys may hold them
    assert storage.parse_s3("s3://b").is_bucket_root and not loc.is_bucket_root
    # the operator reads object storage only, and catches ValueError
    for bad in ("pvc://claim/x", "file:///tmp/a", "s3:///k", "s3://"):
        with pytest.raises(ValueError):
            storage.parse_s3(bad)


def test_one_client_factory_with_timeouts_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    def pool(client: Any) -> dict[str, Any]:
        return dict(client._http.connection_pool_kw)

    transfer = pool(storage.make_client("http://h:9000", "a", "b"))
    assert (transfer["timeout"].connect_timeout, transfer["timeout"].read_timeout) == (5.0, 60.0)
    assert transfer["retries"].total == 5 and transfer["retries"].status_forcelist == [500, 502, 503, 504]
    env = {"S3_ENDPOINT": "https://h:9000", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    quick = storage.client_from_env(env, timeouts=storage.QUICK_TIMEOUTS)
    assert pool(quick)["timeout"].read_timeout == storage.QUICK_TIMEOUTS.read < 60
    assert pool(quick)["retries"].total == 1 and pool(quick)["retries"].read == 0
    shared = storage.http_client(storage.QUICK_TIMEOUTS, maxsize=16)
    assert storage.client_from_env(env, http=shared)._http is shared
    assert quick._base_url.is_https and quick._base_url.host == "h:9000"
    with pytest.raises(KeyError, match="AWS_SECRET_ACCESS_KEY"):
        storage.client_from_env({"S3_ENDPOINT": "h:9000", "AWS_ACCESS_KEY_ID": "a"})
    # the trainer's role form: an explicit S3_SECURE wins over the URL's scheme
    monkeypatch.setenv("OUTPUT_S3_ENDPOINT", "https://o:9000/")
    monkeypatch.setenv("S3_SECURE", "false")
    trainer = storage.minio_client("OUTPUT")
    assert not trainer._base_url.is_https and trainer._base_url.host == "o:9000"
    assert pool(trainer)["timeout"].read_timeout == 60.0


@pytest.mark.slow
def test_a_stalled_endpoint_times_out_after_the_retries() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])  # and never answer

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    client = storage.make_client(f"127.0.0.1:{port}", "a", "b", timeouts=storage.Timeouts(connect=1.0, read=0.3))
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match=r"(?i)read timed out"):
            client.get_object("bucket", "key")
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    # one try and 5 retries, each given up after 0.3 s, with urllib3's backoff between them (MinIO's own
    # default pool would wait 5 minutes for the first answer)
    assert len(accepted) == 6
    assert time.monotonic() - started < 30


def test_local_store_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELORA_PVC_ROOT", str(tmp_path / "pvc"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3000))
    (src / "sub" / "b.txt").write_text("hello")
    out = storage.parse_uri("pvc://claim/out")
    assert storage.upload_tree(src, out) == ["a.bin", "sub/b.txt"]
    assert [o.name for o in storage.store_for(out).list(out)] == ["a.bin", "sub/b.txt"]
    got = storage.download_tree(out, tmp_path / "dl")
    assert len(got) == 2 and (tmp_path / "dl" / "sub" / "b.txt").read_text() == "hello"
    st = storage.LocalStore()
    want = hashlib.sha256((src / "a.bin").read_bytes()).hexdigest()
    st.download(out.child("a.bin"), tmp_path / "x", sha256=want)
    with pytest.raises(VerificationError, match="sha256"):
        st.download(out.child("a.bin"), tmp_path / "y", sha256="0" * 64)
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.part").exists()
    assert storage.store_for(out).delete_prefix(out) == 2


@pytest.mark.e2e
def test_s3_store_verifies_transfers(minio_client: Any, bucket: str, tmp_path: Path) -> None:
    store = storage.S3Store(minio_client)
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(70_000))
    loc = storage.parse_uri(f"s3://{bucket}/m/w.bin")
    h = store.upload(f, loc, verify_download=True)
    st = store.stat(loc)
    assert st is not None and st.size == 70_000 and st.etag and st.etag.strip('"') == h.md5.hexdigest()
    assert store.stat(storage.parse_uri(f"s3://{bucket}/m/none")) is None
    # a download is checked against the listed size and ETag
    store.download(loc, tmp_path / "ok", size=st.size, etag=st.etag, sha256=h.sha256.hexdigest())
    with pytest.raises(VerificationError, match="ETag"):
        store.download(loc, tmp_path / "bad", size=st.size, etag="0" * 32)
    with pytest.raises(VerificationError, match="size"):
        store.download(loc, tmp_path / "bad", size=1)
    assert not (tmp_path / "bad").exists()
    store.put_bytes(storage.parse_uri(f"s3://{bucket}/m/x.json"), b"{}")
    assert store.get_bytes(storage.parse_uri(f"s3://{bucket}/m/x.json")) == b"{}"
    assert store.get_bytes(storage.parse_uri(f"s3://{bucket}/m/none.json")) is None
    assert sorted(o.name for o in store.list(storage.parse_uri(f"s3://{bucket}/m"))) == ["w.bin", "x.json"]
    assert store.delete_prefix(storage.parse_uri(f"s3://{bucket}/m/")) == 2


@pytest.mark.e2e
def test_minio_client_from_environment(
    minio_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, devenv: Any
) -> None:
    monkeypatch.setenv("S3_ENDPOINT", f"http://{devenv.minio_endpoint}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("OUTPUT_AWS_ACCESS_KEY_ID", devenv.minio_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", devenv.minio_secret_key)
    monkeypatch.delenv("S3_SECURE", raising=False)
    client = storage.minio_client("OUTPUT")
    assert client.bucket_exists(bucket)
    with pytest.raises(Exception, match=r"(?i)access key"):
        storage.minio_client("DATASET").list_buckets()
