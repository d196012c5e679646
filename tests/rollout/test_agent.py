"""The adapter agent: verified, content-addressed downloads (file:// sources; no cluster needed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kubelora.serving.agent import AdapterStore, AgentError, build_app


def publish_dir(root: Path, files: dict[str, bytes], extra_entries: list[dict] | None = None) -> tuple[str, str]:
    """Files plus a kubelora-manifest.json listing their sha256; returns (file:// uri, digest)."""
    entries = []
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append({"path": path, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = json.dumps({"files": entries + (extra_entries or [])}, sort_keys=True).encode()
    (root / "kubelora-manifest.json").write_bytes(manifest)
    return f"file://{root}/", "sha256:" + hashlib.sha256(manifest).hexdigest()


ADAPTER = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": b"\x00" * 1000,
    "eval/samples.jsonl": b'{"prompt": "p", "adapter": "a"}\n',
}


def test_download_verifies_every_file_and_is_cached(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", {**ADAPTER, "merged/model.safetensors": b"big"})
    store = AdapterStore(tmp_path / "adapters")
    entry, cached = asyncio.run(store.ensure(uri, digest))
    assert not cached
    assert entry.path == tmp_path / "adapters" / digest.split(":")[1]
    assert (entry.path / "adapter_model.safetensors").read_bytes() == ADAPTER["adapter_model.safetensors"]
    assert (entry.path / "eval" / "samples.jsonl").is_file()
    assert not (entry.path / "merged").exists()  # a merged model is not needed to serve a LoRA
    assert entry.files == 3
    assert hashlib.sha256((entry.path / "kubelora-manifest.json").read_bytes()).hexdigest() == digest.split(":")[1]
    again, cached = asyncio.run(store.ensure(uri, digest))
    assert cached and again.path == entry.path
    assert [e.digest for e in store.list()] == [digest]
    assert store.delete(digest.split(":")[1]) and store.list() == []


def test_wrong_digest_is_refused_and_leaves_nothing(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)
    store = AdapterStore(tmp_path / "adapters")
    other = "sha256:" + "0" * 64
    with pytest.raises(AgentError) as info:
        asyncio.run(store.ensure(uri, other))
    assert (info.value.status, info.value.reason) == (422, "DigestMismatch")
    assert other in info.value.message and digest not in info.value.message  # the actual digest stays unsaid
    assert list((tmp_path / "adapters").iterdir()) == []


def test_tampered_file_is_refused_and_leaves_nothing(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)
    (tmp_path / "src" / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)  # same size, other bytes
    store = AdapterStore(tmp_path / "adapters")
    with pytest.raises(AgentError) as info:
        asyncio.run(store.ensure(uri, digest))
    assert info.value.reason == "FileDigestMismatch"
    assert "adapter_model.safetensors" in info.value.message
    assert list((tmp_path / "adapters").iterdir()) == []


def test_unsafe_manifest_paths_are_refused(tmp_path):
    uri, digest = publish_dir(
        tmp_path / "src", ADAPTER, extra_entries=[{"path": "../../etc/evil", "sizeBytes": 1, "sha256": "0" * 64}]
    )
    with pytest.raises(AgentError) as info:
        asyncio.run(AdapterStore(tmp_path / "adapters").ensure(uri, digest))
    assert info.value.reason == "InvalidManifest"


def test_http_api(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(AdapterStore(tmp_path / "adapters")))) as client:
            assert (await client.get("/health")).status == 200
            response = await client.post("/v1/adapters", json={"uri": uri, "digest": digest})
            assert response.status == 200
            body = await response.json()
            assert body["digest"] == digest and Path(body["path"]).is_dir() and body["cached"] is False
            listing = await (await client.get("/v1/adapters")).json()
            assert [a["digest"] for a in listing["adapters"]] == [digest]
            bad = await client.post("/v1/adapters", json={"uri": uri, "digest": "sha256:nothex"})
            assert bad.status == 400 and (await bad.json())["error"]["reason"] == "InvalidDigest"
            missing = await client.post(
                "/v1/adapters", json={"uri": f"file://{tmp_path}/nope/", "digest": "sha256:" + "1" * 64}
            )
            assert missing.status == 404
            deleted = await client.delete(f"/v1/adapters/{digest.split(':')[1]}")
            assert (await deleted.json()) == {"deleted": True}

    asyncio.run(scenario())
