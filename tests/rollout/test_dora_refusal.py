"""A DoRA adapter is refused as a runtime LoRA before any vLLM pod tries it, with a condition that says why."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import validate_adapterdeployment
from kubelora.operator import adapter_resolution as resolution
from tests.rollout.test_controller import (
    BASE,
    NS,
    FakeKube,
    FakePods,
    add,
    answers_for,
    publish,
    runtime,
    settle,
)


def publish_dora(root: Path, name: str, *, merged: bool, marked_by: str = "config") -> tuple[str, str]:
    """A DoRA adapter as the trainer publishes it (use_dora, method dora, the merged model next to it)."""
    directory = root / name
    files: dict[str, bytes] = {
        "adapter_config.json": json.dumps({"r": 8, "use_dora": marked_by == "config"}).encode(),
        "adapter_model.safetensors": name.encode(),
        "eval/samples.jsonl": (
            json.dumps({"messages": [{"role": "user", "content": "q0"}], "adapter": "x"}) + "\n"
        ).encode(),
    }
    if merged:
        files["merged/model.safetensors"] = b"weights"
        files["merged/config.json"] = b"{}"
    entries = []
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
        entries.append({"path": path, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    method = "dora" if marked_by == "manifest" else "lora"
    manifest = json.dumps({"baseModel": {"name": BASE}, "adapter": {"method": method}, "files": entries}).encode()
    (directory / "kubelora-manifest.json").write_bytes(manifest)
    return f"s3://bucket{directory}/", "sha256:" + hashlib.sha256(manifest).hexdigest()


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_a_dora_adapter_is_refused_with_its_reason_and_never_loaded(tmp_path: Path):
    kube, pods = FakeKube(2), FakePods({})
    rt = runtime(kube, pods)
    uri, digest = publish_dora(tmp_path, "dora", merged=True)
    add(kube, "svc", uri, digest)
    status = settle(rt, "svc", passes=3)
    assert status["phase"] == "Refused"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DoRAUnsupported")
    assert "vLLM cannot load DoRA adapters as runtime LoRA" in ready["message"]
    assert f"serve its merged model {uri}merged/ as a base model instead" in ready["message"]
    assert pods.loads == 0  # decided before any pod is asked


def test_a_running_deployment_keeps_serving_when_the_new_version_is_dora(tmp_path: Path):
    published = {"a": publish(tmp_path, "a", ["x", "y", "z"]), "b": publish(tmp_path, "b", ["1", "2", "3"])}
    kube, pods = FakeKube(2), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    assert settle(rt, "svc")["phase"] == "Ready"
    loads = pods.loads
    kube.objects["svc"]["spec"]["adapter"] = dict(
        zip(("uri", "digest"), publish_dora(tmp_path, "dora", merged=False, marked_by="manifest"), strict=True)
    )
    kube.objects["svc"]["metadata"]["generation"] = 2
    status = settle(rt, "svc", passes=3)
    assert status["phase"] == "Refused" and status["activeDigest"] == published["a"][1]
    assert "still serving" in status["message"]
    ready = condition(status, "Ready")
    assert ready["reason"] == "DoRAUnsupported"
    assert "train it with spec.output.mergedModel and serve the merged model" in ready["message"]
    assert pods.loads == loads


def test_a_dora_lorajob_is_refused_too(tmp_path: Path):
    kube, pods = FakeKube(1), FakePods({})
    rt = runtime(kube, pods)
    uri, digest = publish_dora(tmp_path, "job-out", merged=True)
    kube.lorajobs["tune"] = {
        "spec": {"output": {"uri": uri}, "method": "dora"},
        "status": {"phase": "Succeeded", "adapter": {"uri": uri, "digest": digest, "rank": 8, "baseModel": BASE}},
    }
    ad = validate_adapterdeployment(
        {
            "apiVersion": "kubelora.dev/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "svc", "namespace": NS},
            "spec": {
                "adapter": {"loraJob": "tune"},
                "servedName": "svc",
                "target": {"deploymentName": "vllm", "baseModel": BASE, "agentTokenSecretRef": {"name": "t"}},
                "gatePolicy": {"requireEvalPassed": False},
            },
        }
    )
    result = asyncio.run(resolution.resolve(rt, ad))
    assert (result.state, result.reason) == ("refused", "DoRAUnsupported")
    assert result.message.startswith("LoRAJob tune: a DoRA adapter")
    # the same job's adapter, were it plain LoRA, would be admitted: the refusal is DoRA's
    plain_uri, plain_digest = publish(tmp_path, "plain", ["x"])
    kube.lorajobs["tune"]["spec"]["output"]["uri"] = plain_uri
    kube.lorajobs["tune"]["status"]["adapter"] = {"uri": plain_uri, "digest": plain_digest}
    assert asyncio.run(resolution.resolve(rt, ad)).state == "ok"
