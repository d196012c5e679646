"""The adapter agent: verified, content-addressed downloads and its token (no cluster needed).

Storage is a local directory behind the agent's ``Source`` seam, addressed by s3:// URIs; the agent against real
MinIO and vLLM is in test_e2e_vllm.py and test_e2e_rollout.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kubelora.serving.agent import TOKEN_ENV, AdapterStore, AgentError, Preloader, build_app, main

TOKEN = "agent-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class DirSource:
    """s3://bucket/<path> read from ``root/<path>``: the corner cases below without an object store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, uri: str, path: str) -> Path:
        return self.root / uri.removeprefix("s3://bucket/") / path

    def read(self, uri: str, path: str) -> bytes:
        local = self._path(uri, path)
        if not local.is_file():
            raise AgentError(404, "NotFound", f"{uri}{path} does not exist")
        return local.read_bytes()

    def download(self, uri: str, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read(uri, path))


def store_for(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters", DirSource(tmp_path))


def publish_dir(root: Path, files: dict[str, bytes], extra_entries: list[dict] | None = None) -> tuple[str, str]:
    """Files plus a kubelora-manifest.json listing their sha256; returns (s3:// uri, digest)."""
    entries = []
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append({"path": path, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = json.dumps({"files": entries + (extra_entries or [])}, sort_keys=True).encode()
    (root / "kubelora-manifest.json").write_bytes(manifest)
    return f"s3://bucket/{root.name}/", "sha256:" + hashlib.sha256(manifest).hexdigest()


ADAPTER = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": b"\x00" * 1000,
    "eval/samples.jsonl": b'{"prompt": "p", "adapter": "a"}\n',
}


def test_download_verifies_every_file_and_is_cached(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", {**ADAPTER, "merged/model.safetensors": b"big"})
    store = store_for(tmp_path)
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
    store = store_for(tmp_path)
    other = "sha256:" + "0" * 64
    with pytest.raises(AgentError) as info:
        asyncio.run(store.ensure(uri, other))
    assert (info.value.status, info.value.reason) == (422, "DigestMismatch")
    assert other in info.value.message and digest not in info.value.message  # the actual digest stays unsaid
    assert list((tmp_path / "adapters").iterdir()) == []


def test_tampered_file_is_refused_and_leaves_nothing(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)
    (tmp_path / "src" / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)  # same size, other bytes
    store = store_for(tmp_path)
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
        asyncio.run(store_for(tmp_path).ensure(uri, digest))
    assert info.value.reason == "InvalidManifest"


def test_http_api(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(store_for(tmp_path), TOKEN))) as client:
            assert (await client.get("/health")).status == 200
            response = await client.post("/v1/adapters", json={"uri": uri, "digest": digest}, headers=AUTH)
            assert response.status == 200
            body = await response.json()
            assert body["digest"] == digest and Path(body["path"]).is_dir() and body["cached"] is False
            listing = await (await client.get("/v1/adapters", headers=AUTH)).json()
            assert [a["digest"] for a in listing["adapters"]] == [digest]
            bad = await client.post("/v1/adapters", json={"uri": uri, "digest": "sha256:nothex"}, headers=AUTH)
            assert bad.status == 400 and (await bad.json())["error"]["reason"] == "InvalidDigest"
            missing = await client.post(
                "/v1/adapters", json={"uri": "s3://bucket/nope/", "digest": "sha256:" + "1" * 64}, headers=AUTH
            )
            assert missing.status == 404
            deleted = await client.delete(f"/v1/adapters/{digest.split(':')[1]}", headers=AUTH)
            assert (await deleted.json()) == {"deleted": True}

    asyncio.run(scenario())


def test_every_call_but_health_needs_the_token(tmp_path):
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)
    hex_digest = digest.split(":")[1]
    calls = [
        ("GET", "/v1/adapters", None),
        ("POST", "/v1/adapters", {"uri": uri, "digest": digest}),
        ("GET", f"/v1/adapters/{hex_digest}", None),
        ("DELETE", f"/v1/adapters/{hex_digest}", None),
    ]

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(store_for(tmp_path), TOKEN))) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                for method, path, body in calls:
                    response = await client.request(method, path, json=body, headers=headers)
                    assert response.status == 401, (method, path, headers)
                    assert (await response.json())["error"]["reason"] == "Unauthorized"
            assert not (tmp_path / "adapters" / hex_digest).exists()  # nothing was fetched
            ok = await client.post("/v1/adapters", json={"uri": uri, "digest": digest}, headers=AUTH)
            assert ok.status == 200

    asyncio.run(scenario())


def test_file_uris_are_refused(tmp_path):
    """A file:// source would copy any file the pod can read (its ServiceAccount token) into /adapters."""
    with pytest.raises(AgentError) as info:
        asyncio.run(AdapterStore(tmp_path / "adapters").ensure("file:///var/run/secrets/", "sha256:" + "2" * 64))
    assert (info.value.status, info.value.reason) == (400, "UnsupportedURI")


def test_the_agent_will_not_start_without_a_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["--dir", str(tmp_path / "adapters"), "--port", "0"]) == 2
    assert TOKEN_ENV in capsys.readouterr().err
    with pytest.raises(ValueError, match=TOKEN_ENV):
        build_app(store_for(tmp_path), "")


def _write_preload(path: Path, entries: dict[str, tuple[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({name: {"uri": uri, "digest": digest} for name, (uri, digest) in entries.items()}))
    tmp.replace(path)


def test_preload_links_served_names_and_gates_ready(tmp_path):
    """The preload file names what to serve; the agent links it by servedName for vLLM's filesystem resolver."""
    uri_a, digest_a = publish_dir(tmp_path / "src-a", ADAPTER)
    uri_b, digest_b = publish_dir(tmp_path / "src-b", {**ADAPTER, "adapter_model.safetensors": b"\x01" * 1000})
    preload_file = tmp_path / "preload" / "adapters.json"
    preload_file.parent.mkdir()
    store = store_for(tmp_path)
    names = tmp_path / "adapters"
    preloader = Preloader(store, preload_file, names, base_model="/models/base")

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(store, TOKEN, preloader, interval=0.05))) as client:

            async def ready() -> tuple[int, str]:
                response = await client.get("/ready")  # no token: the kubelet probes it
                return response.status, await response.text()

            async def wait_ready(status: int) -> str:
                for _ in range(200):
                    got, text = await ready()
                    if got == status:
                        return text
                    await asyncio.sleep(0.05)
                raise AssertionError(f"/ready never answered {status}: {text}")

            # No file (the ConfigMap does not exist yet): nothing to wait for.
            assert (await ready())[0] == 200
            _write_preload(preload_file, {"support": (uri_a, digest_a)})
            link = names / "support"
            for _ in range(200):
                if link.is_symlink():
                    break
                await asyncio.sleep(0.05)
            assert (await ready())[0] == 200
            assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # the same in both containers
            config = json.loads((link / "adapter_config.json").read_text())
            # vLLM's resolver loads an adapter only when it names the server's --model
            assert config == {"r": 8, "lora_alpha": 16, "base_model_name_or_path": "/models/base"}
            assert (link / "adapter_model.safetensors").read_bytes() == ADAPTER["adapter_model.safetensors"]
            # The verified digest directory itself is unchanged.
            hex_a = digest_a.split(":")[1]
            assert (names / hex_a / "adapter_config.json").read_bytes() == ADAPTER["adapter_config.json"]
            # A listed digest is pinned: the operator's clean-up cannot pull it from under vLLM.
            refused = await client.delete(f"/v1/adapters/{hex_a}", headers=AUTH)
            assert refused.status == 409 and (names / hex_a).is_dir()
            # A new version: the link is swapped to it.
            _write_preload(preload_file, {"support": (uri_b, digest_b)})
            for _ in range(200):
                if (link / "adapter_model.safetensors").read_bytes() != ADAPTER["adapter_model.safetensors"]:
                    break
                await asyncio.sleep(0.05)
            assert (link / "adapter_model.safetensors").read_bytes() == b"\x01" * 1000
            assert (await ready())[0] == 200
            # A pod that was Ready stays Ready while it catches up with a changed file (every pod reads the same
            # file at once: gating each change would take the whole Deployment out of service); it says why.
            missing = "sha256:" + "3" * 64
            unfetchable = {"support": (uri_b, digest_b), "other": ("s3://bucket/nope/", missing)}
            _write_preload(preload_file, unfetchable)
            for _ in range(200):
                status, text = await ready()
                if "other" in text:
                    break
                await asyncio.sleep(0.05)
            assert status == 200 and "catching up" in text and "other" in text
            # A pod that starts with an entry that cannot be fetched stays out of Ready, and says why.
            starting = Preloader(store, preload_file, names, base_model="/models/base")
            assert await starting.sync() is False
            ok, message = starting.ready()
            assert not ok and "other" in message
            # A name the file no longer lists loses its link (vLLM must not resolve it again).
            _write_preload(preload_file, {})
            await wait_ready(200)
            for _ in range(200):
                if not link.is_symlink():
                    break
                await asyncio.sleep(0.05)
            assert not link.exists() and not link.is_symlink()
            assert (await client.delete(f"/v1/adapters/{hex_a}", headers=AUTH)).status == 200

    asyncio.run(scenario())


def test_preload_refuses_names_that_are_not_one_path_component(tmp_path):
    preload_file = tmp_path / "adapters.json"
    uri, digest = publish_dir(tmp_path / "src", ADAPTER)
    store = store_for(tmp_path)
    preloader = Preloader(store, preload_file, tmp_path / "adapters")
    for bad in ("../escape", "a/../../b", ".hidden", "views", "a//b", digest.split(":")[1]):
        _write_preload(preload_file, {bad: (uri, digest)})
        ok, message = preloader.ready()
        assert not ok and "cannot be a file name" in message
        assert asyncio.run(preloader.sync()) is False
    assert not (tmp_path / "escape").exists()
    preload_file.write_text("not json")
    assert preloader.ready()[0] is False
    # servedName may have path components (the API allows "/"): vLLM's resolver joins it to its directory.
    _write_preload(preload_file, {"team/support": (uri, digest)})
    assert asyncio.run(preloader.sync()) is True and preloader.ready()[0] is True
    assert json.loads((tmp_path / "adapters" / "team" / "support" / "adapter_config.json").read_text())["r"] == 8
    _write_preload(preload_file, {})
    assert asyncio.run(preloader.sync()) is True
    assert not (tmp_path / "adapters" / "team" / "support").is_symlink()
