"""Object storage URIs and clients shared by the operator and the serving side (no torch here).

Also the published layout under a LoRAJob's ``spec.output.uri`` (docs/trainer.md), which the trainer writes
and the operator cleans up::

    sha256/<hex>/                 one adapter, content-addressed: its manifest's sha256 is sha256:<hex>
    sha256/<hex>/kubelora-manifest.json
    kubelora-latest.json          the pointer: the digest and directory of the newest adapter published here
    checkpoints/                  resumable checkpoints of the run
    _kubelora/<uid>/              a LoRAJob's report (progress.json, result.json)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

MANIFEST = "kubelora-manifest.json"
POINTER = "kubelora-latest.json"
POINTER_KIND = "AdapterPointer"
DIGEST_DIR = "sha256"
CHECKPOINTS_DIR = "checkpoints"
REPORTS_DIR = "_kubelora"
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


def digest_hex(digest: str) -> str:
    """``sha256:<hex>`` → ``<hex>``; ValueError for anything else (a digest never becomes a path unchecked)."""
    match = _DIGEST.match(digest or "")
    if match is None:
        raise ValueError(f"Not a sha256:<64 hex digits> digest: {digest!r}")
    return match.group(1)


def digest_dir(output_uri: str, digest: str) -> str:
    """Where the adapter with this digest is published under the output URI: ``<output>/sha256/<hex>/``."""
    return f"{output_uri.rstrip('/')}/{DIGEST_DIR}/{digest_hex(digest)}/"


@dataclasses.dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    def child(self, name: str) -> S3Location:
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Location(self.bucket, prefix + name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def is_bucket_root(self) -> bool:
        """No key prefix (``s3://bucket`` or ``s3://bucket/``): the whole bucket."""
        return not self.key.strip("/")


def parse_s3(uri: str) -> S3Location:
    if not uri.startswith("s3://"):
        raise ValueError(f"Not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"No bucket in {uri!r}")
    return S3Location(bucket, key)


def make_client(endpoint: str, access_key: str, secret_key: str, secure: bool = False) -> Any:
    from minio import Minio

    host = endpoint.removeprefix("http://").removeprefix("https://")
    return Minio(host, access_key=access_key, secret_key=secret_key, secure=secure or endpoint.startswith("https://"))


def client_from_env(env: dict[str, str] | None = None) -> Any:
    source = os.environ if env is None else env
    return make_client(
        source["S3_ENDPOINT"],
        source["AWS_ACCESS_KEY_ID"],
        source["AWS_SECRET_ACCESS_KEY"],
        source.get("S3_SECURE", "false").lower() == "true",
    )


def read_json(client: Any, location: S3Location) -> Any | None:
    """The JSON object at `location`, or None when it does not exist."""
    from minio.error import S3Error

    try:
        response = client.get_object(location.bucket, location.key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchBucket"):
            return None
        raise
    try:
        return json.loads(response.read())
    finally:
        response.close()
        response.release_conn()


def delete_object(client: Any, location: S3Location) -> None:
    """Remove one object; an absent one is no error (S3 answers a delete of a missing key with success)."""
    client.remove_object(location.bucket, location.key)


def delete_prefix(client: Any, location: S3Location) -> int:
    """Remove every object under `location` (a prefix); returns how many there were. An empty key is the bucket."""
    from minio.deleteobjects import DeleteObject

    prefix = location.key if not location.key or location.key.endswith("/") else location.key + "/"
    names = [obj.object_name for obj in client.list_objects(location.bucket, prefix=prefix, recursive=True)]
    errors = list(client.remove_objects(location.bucket, [DeleteObject(name) for name in names]))
    if errors:
        raise RuntimeError(f"Could not delete {len(errors)} objects under {location}: {errors[0]}")
    return len(names)
