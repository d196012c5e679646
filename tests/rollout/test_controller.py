"""The AdapterDeployment state machine with fake Kubernetes and fake pods (no cluster, no HTTP)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from kubelora.operator import adapter_resolution as resolution
from kubelora.operator import adapterdeployments as ads
from kubelora.operator import managed_server, rollout, server_pods
from kubelora.operator.config import OperatorConfig

NS = "team"
BASE = "kubelora/tiny-llama"


def publish(root: Path, name: str, answers: list[str], rank: int = 8, base: str = BASE) -> tuple[str, str]:
    """An adapter with eval samples, at an s3:// URI that :class:`DirReader` reads from disk; (uri, digest)."""
    directory = root / name
    directory.mkdir(parents=True)
    files = {
        "adapter_config.json": json.dumps({"r": rank}).encode(),
        "adapter_model.safetensors": name.encode(),
        "eval/samples.jsonl": "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "adapter": a}) + "\n"
            for i, a in enumerate(answers)
        ).encode(),
    }
    entries = []
    for path, data in files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
        entries.append({"path": path, "sizeBytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = json.dumps({"baseModel": {"name": base}, "files": entries}).encode()
    (directory / "kubelora-manifest.json").write_bytes(manifest)
    return f"s3://bucket{directory}/", "sha256:" + hashlib.sha256(manifest).hexdigest()


class DirReader:
    """The operator's AdapterReader for ``s3://bucket/<absolute path>``, from the local disk."""

    def read(self, uri: str, credentials: Any) -> bytes:
        assert uri.startswith("s3://bucket/")
        path = Path(uri.removeprefix("s3://bucket"))
        if not path.is_file():
            raise resolution.AdapterStorageError("NotFound", f"{uri} does not exist")
        return path.read_bytes()


class FakeKube:
    def __init__(self, pods: int) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = [
            {
                "metadata": {"name": f"vllm-{i:02d}", "uid": f"uid-{i}", "annotations": {}},
                "status": {
                    "phase": "Running",
                    "podIP": f"127.1.0.{i + 1}",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
            for i in range(pods)
        ]
        self.patches: list[dict[str, Any]] = []
        self.lorajobs: dict[str, dict[str, Any]] = {}
        self.deleted: list[str] = []

    def get_adapterdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(name))

    def get_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lorajobs.get(name))

    def get_secret(self, namespace: str, name: str) -> dict[str, str]:
        return {"token": "agent-token"} if name == "agent-token" else {}

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any]:
        return {"spec": {"selector": {"matchLabels": {"app": "vllm"}}}}

    def delete_owned(self, namespace: str, name: str, owner_uid: str) -> list[str]:
        self.deleted.append(name)
        return []

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        assert selector == "app=vllm"
        return copy.deepcopy(self.pods)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)
        current = self.objects[name].setdefault("status", {})
        for key, value in status.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value


class FakePods:
    """vLLM and the agent of every pod; an adapter answers its samples only if it is the right one."""

    def __init__(
        self, answers: dict[str, list[str]], broken: set[str] | None = None, refused: dict[str, str] | None = None
    ) -> None:
        self.served: dict[str, dict[str, str]] = {}
        self.answers = answers  # digest hex -> answers in sample order
        self.broken = broken or set()  # digests whose load fails
        self.refused = refused or {}  # digests vLLM refuses -> its reason
        self.flaky: set[str] = set()  # digests whose next load fails once
        self.loads = 0

    async def models(self, pod: ads.Pod) -> dict[str, str]:
        return {BASE: BASE, **self.served.get(pod.name, {})}

    async def fetch(self, pod: ads.Pod, uri: str, digest: str) -> str:
        return f"/adapters/{digest.split(':', 1)[1]}"

    async def load(self, pod: ads.Pod, name: str, path: str, replace: bool) -> None:
        self.loads += 1
        refusal = self.refused.get(f"sha256:{Path(path).name}")
        if refusal:
            raise ads.PodError("load", f"vLLM refused the adapter (500): {refusal}", refusal=refusal)
        if f"sha256:{Path(path).name}" in self.broken:
            raise ads.PodError("load", "LoRA rank 8 is greater than max_lora_rank 4.")
        if f"sha256:{Path(path).name}" in self.flaky:
            self.flaky.discard(f"sha256:{Path(path).name}")
            raise ads.PodError("load", "vLLM could not load the adapter (503): busy")
        served = self.served.setdefault(pod.name, {})
        assert replace == (name in served)
        served[name] = path

    async def unload(self, pod: ads.Pod, name: str) -> bool:
        return self.served.get(pod.name, {}).pop(name, None) is not None

    async def forget(self, pod: ads.Pod, digest: str) -> None:
        return None

    async def generate(self, pod: ads.Pod, model: str, sample: dict[str, Any], max_tokens: int) -> str:
        digest = Path(self.served[pod.name][model]).name
        index = int(sample["messages"][0]["content"][1:])
        return self.answers[digest][index]


def runtime(kube: FakeKube, pods: FakePods) -> ads.Runtime:
    settings = ads.Settings(backoff_base_seconds=0.0, rollout_max_attempts=2)
    rt = ads.Runtime(kube, http=None, config=OperatorConfig(), settings=settings)
    rt.pods = pods  # type: ignore[assignment]
    rt.reader = DirReader()  # type: ignore[assignment]

    async def inline(func: Any, *args: Any) -> Any:
        return func(*args)

    rt.to_thread = inline
    return rt


def add(kube: FakeKube, name: str, uri: str, digest: str, *, auto_rollback: bool = True, generation: int = 1) -> None:
    kube.objects[name] = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": generation},
        "spec": {
            "adapter": {"uri": uri, "digest": digest},
            "servedName": name,
            "target": {
                "deploymentName": "vllm",
                "baseModel": BASE,
                "maxLoraRank": 16,
                "agentTokenSecretRef": {"name": "agent-token"},
            },
            "gatePolicy": {"requireEvalPassed": False},
            "rollout": {"strategy": "Canary", "canaryReplicas": 2, "smokePrompts": 3, "autoRollback": auto_rollback},
        },
    }


def settle(rt: ads.Runtime, name: str, passes: int = 6) -> dict[str, Any]:
    async def run() -> None:
        for _ in range(passes):
            await ads.reconcile(rt, NS, name)

    asyncio.run(run())
    return dict(rt.kube.objects[name]["status"])


@pytest.fixture
def published(tmp_path: Path) -> dict[str, tuple[str, str]]:
    return {
        "a": publish(tmp_path, "a", ["x", "y", "z"]),
        "b": publish(tmp_path, "b", ["1", "2", "3"]),
        "rank32": publish(tmp_path, "rank32", ["r"], rank=32),
    }


def answers_for(published: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    return {
        published["a"][1].split(":")[1]: ["x", "y", "z"],
        published["b"][1].split(":")[1]: ["1", "2", "3"],
    }


def test_canary_then_promote_then_swap(published):
    kube, pods = FakeKube(5), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    status = settle(rt, "svc")
    assert (status["phase"], status["loadedReplicas"], status["desiredReplicas"]) == ("Ready", 5, 5)
    phases = [p.get("phase") for p in kube.patches if p.get("phase")]
    assert phases == ["Canary", "Promoting", "Ready"]
    canary_writes = [p for p in kube.patches if p.get("loadedReplicas") == 2]
    assert canary_writes, "the loaded canary (2 of 5) is written before the smoke check"
    kube.objects["svc"]["spec"]["adapter"] = dict(zip(("uri", "digest"), published["b"], strict=True))
    kube.objects["svc"]["metadata"]["generation"] = 2
    status = settle(rt, "svc")
    assert status["activeDigest"] == published["b"][1] and status["previousDigest"] == published["a"][1]
    assert status["phase"] == "Ready"
    assert {Path(p["svc"]).name for p in pods.served.values()} == {published["b"][1].split(":")[1]}


def test_load_failures_on_the_canary_roll_back(published):
    kube = FakeKube(3)
    pods = FakePods(answers_for(published), broken={published["b"][1]})
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    assert settle(rt, "svc")["phase"] == "Ready"
    kube.objects["svc"]["spec"]["adapter"] = dict(zip(("uri", "digest"), published["b"], strict=True))
    kube.objects["svc"]["metadata"]["generation"] = 2
    status = settle(rt, "svc", passes=8)
    assert status["phase"] == "RolledBack"
    assert status["activeDigest"] == published["a"][1] and status["previousDigest"] == published["b"][1]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "LoadFailed" and "LoadFailed" in ready["message"]
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "RolledBack"
    assert "max_lora_rank 4" in ready["message"]
    loads = pods.loads
    settle(rt, "svc", passes=4)
    assert pods.loads == loads, "the rejected adapter is not tried again for the same spec"


def test_an_adapter_vllm_refuses_rolls_back_at_once_with_vllms_reason(published):
    kube = FakeKube(3)
    pods = FakePods(answers_for(published), refused={published["b"][1]: "vLLM does not yet support DoRA."})
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    assert settle(rt, "svc")["phase"] == "Ready"
    loads = pods.loads
    kube.objects["svc"]["spec"]["adapter"] = dict(zip(("uri", "digest"), published["b"], strict=True))
    kube.objects["svc"]["metadata"]["generation"] = 2
    status = settle(rt, "svc", passes=4)
    assert status["phase"] == "RolledBack" and status["activeDigest"] == published["a"][1]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "AdapterRejected"
    assert "refused" in ready["message"] and "vLLM does not yet support DoRA." in ready["message"]
    # Not retried: one refused load on each of the 2 canary pods (one pass), and nothing to reload (a stayed).
    assert pods.loads == loads + 2
    settle(rt, "svc", passes=3)
    assert pods.loads == loads + 2


def test_without_auto_rollback_the_rollout_fails_and_stays(published):
    kube = FakeKube(3)
    # b's samples do not match what b answers: the smoke check fails
    pods = FakePods({**answers_for(published), published["b"][1].split(":")[1]: ["no", "no", "no"]})
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"], auto_rollback=False)
    settle(rt, "svc")
    kube.objects["svc"]["spec"]["adapter"] = dict(zip(("uri", "digest"), published["b"], strict=True))
    status = settle(rt, "svc")
    assert status["phase"] == "Failed"
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "SmokeCheckFailed" and "0/6 answers matched" in progressing["message"]
    # the canary pods keep b, the others a: nothing is touched until the spec changes
    served = sorted(Path(p["svc"]).name[:4] for p in pods.served.values())
    assert served == sorted([published["a"][1][7:11]] + [published["b"][1][7:11]] * 2)


def test_replica_list_is_bounded_with_failures_first(published):
    kube = FakeKube(60)
    pods = FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    kube.objects["svc"]["spec"]["rollout"]["strategy"] = "AllAtOnce"
    rt.settings.allowed_pod_networks = (ipaddress.ip_network("127.1.0.0/26"),)  # .1-.63 allowed
    kube.pods[59]["status"]["podIP"] = "10.0.0.7"  # never contacted
    status = settle(rt, "svc")
    assert status["desiredReplicas"] == 60 and status["loadedReplicas"] == 59
    assert len(status["replicas"]) == ads.MAX_REPLICA_ENTRIES
    first = status["replicas"][0]
    assert first["pod"] == "vllm-59" and first["state"] == "Failed" and "KUBELORA_POD_CIDRS" in first["message"]
    assert status["loaded"] == "59/60"
    assert "vllm-59" not in pods.served


def test_rank_gate_refuses_and_keeps_serving_the_active_adapter(published):
    kube, pods = FakeKube(2), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    settle(rt, "svc")
    kube.objects["svc"]["spec"]["adapter"] = dict(zip(("uri", "digest"), published["rank32"], strict=True))
    status = settle(rt, "svc", passes=2)
    assert status["phase"] == "Refused"
    assert "rank 32 exceeds spec.target.maxLoraRank 16" in status["message"]
    assert "still serving" in status["message"]
    assert status["activeDigest"] == published["a"][1] and status["loadedReplicas"] == 2


def test_helpers():
    selector = {
        "matchLabels": {"app": "vllm", "tier": "gpu"},
        "matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
        ],
    }
    assert server_pods.label_selector(selector) == "app=vllm,tier=gpu,zone in (a,b),!canary"
    assert ads.digest_of_root("/adapters/" + "ab" * 32) == "sha256:" + "ab" * 32
    assert ads.digest_of_root("/models/my-lora") is None
    assert resolution.identity("hf://Meta-Llama/Llama-3.1-8B/") == resolution.identity("meta-llama/llama-3.1-8b")
    gates = {
        "gates": [
            {
                "metric": "f1",
                "rule": "minImprovementOverBase",
                "threshold": 0.05,
                "value": 0.61,
                "baseValue": 0.6,
                "passed": False,
            },
            {"metric": "loss", "passed": True},
        ]
    }
    assert resolution.describe_failed_gates(gates) == "f1 minImprovementOverBase 0.05: adapter 0.61, base 0.6"
    assert rollout.choose_canary(["a", "b", "c"], {"c": "sha256:x"}, "sha256:x", 2) == ["c", "a"]
    assert (
        managed_server.managed_name("x" * 60).startswith("x" * 50) and len(managed_server.managed_name("x" * 60)) <= 63
    )


def test_no_secret_means_an_anonymous_read_not_the_operators_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "operator-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    kube = FakeKube(1)
    kube.get_secret = lambda namespace, name: {"accessKey": f"{namespace}-key", "secretKey": "s"}  # type: ignore[method-assign]

    def creds(config: OperatorConfig, namespace: str, secret: str | None) -> tuple[str, str]:
        rt = runtime(kube, FakePods({}))
        rt.config = config
        found, problem = asyncio.run(resolution._credentials(rt, namespace, secret))
        assert problem is None and found is not None
        return found.access_key, found.secret_key

    default = OperatorConfig(default_s3_endpoint="s3.example:9000")
    assert creds(default, "team-b", None) == ("", "")
    assert creds(default, "team-b", "own") == ("team-b-key", "s")
    opted_in = OperatorConfig(default_s3_endpoint="s3.example:9000", operator_credentials_namespaces=["platform"])
    assert creds(opted_in, "platform", None) == ("operator-key", "operator-secret")
    assert creds(opted_in, "team-b", None) == ("", "")
    assert creds(opted_in, "platform", "own") == ("platform-key", "s")


def test_resolved_adapters_are_cached_per_namespace_and_secret(published):
    kube = FakeKube(1)
    rt = runtime(kube, FakePods(answers_for(published)))
    reads: list[str] = []
    read = rt.reader.read
    rt.reader.read = lambda uri, credentials: reads.append(uri) or read(uri, credentials)  # type: ignore[method-assign]
    uri, digest = published["a"]

    def resolve(namespace: str, secret: str | None) -> str:
        add(kube, "svc", uri, digest)
        obj = kube.objects["svc"]
        obj["metadata"]["namespace"] = namespace
        if secret:
            obj["spec"]["adapter"]["secretRef"] = {"name": secret}
        before = len(reads)
        resolution = asyncio.run(ads.resolve(rt, ads.parse(obj)))
        assert resolution.state == "ok", resolution.message
        return "read" if len(reads) > before else "cached"

    assert resolve("team-a", "a-creds") == "read"
    assert resolve("team-a", "a-creds") == "cached"
    assert resolve("team-b", "a-creds") == "read"  # another tenant reads for itself
    assert resolve("team-a", None) == "read"  # and so does another Secret


def test_a_rollout_whose_source_disappears_keeps_converging_honours_its_deadline_and_rolls_back(published):
    kube = FakeKube(3)
    pods = FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    assert settle(rt, "svc")["phase"] == "Ready"
    uri, digest = published["b"]
    kube.lorajobs["job-b"] = {
        "metadata": {"name": "job-b"},
        "spec": {"output": {"uri": uri}},
        "status": {"phase": "Succeeded", "adapter": {"uri": uri, "digest": digest, "rank": 8, "baseModel": BASE}},
    }
    kube.objects["svc"]["spec"]["adapter"] = {"loraJob": "job-b"}
    kube.objects["svc"]["metadata"]["generation"] = 2
    pods.flaky = {digest}  # the first canary load fails: the rollout is still in Canary after this pass
    status = settle(rt, "svc", passes=1)
    assert status["phase"] == "Canary" and status["activeDigest"] == digest
    del kube.lorajobs["job-b"]  # the source goes away mid-rollout
    status = settle(rt, "svc", passes=1)
    assert status["phase"] == "Canary", "the canary keeps converging while the deadline has not passed"
    assert "source unavailable: LoRAJob job-b does not exist" in status["message"]
    canary = [name for name, served in pods.served.items() if Path(served["svc"]).name == digest[7:]]
    assert len(canary) == 2
    rt.settings.rollout_timeout_seconds = -1.0  # the deadline passes
    status = settle(rt, "svc", passes=2)
    assert status["phase"] == "RolledBack" and status["activeDigest"] == published["a"][1]
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["reason"] == "RolloutTimedOut"
    assert {Path(p["svc"]).name for p in pods.served.values()} == {published["a"][1][7:]}


def test_two_adapterdeployments_with_one_served_name_on_the_same_pods_the_newer_gets_a_conflict(published):
    kube, pods = FakeKube(3), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "first", *published["a"])
    add(kube, "second", *published["b"])
    for name, created in (("first", "2026-11-30T10:00:00Z"), ("second", "2026-11-30T11:00:00Z")):
        kube.objects[name]["metadata"]["creationTimestamp"] = created
        kube.objects[name]["spec"]["servedName"] = "support"
    # The newer one runs first: it has not seen the older yet, so both settle once each.
    second = settle(rt, "second", passes=1)
    first = settle(rt, "first", passes=2)
    second = settle(rt, "second", passes=2)
    assert first["phase"] == "Ready" and first["activeDigest"] == published["a"][1]
    assert second["phase"] == "Refused"
    conflict = next(c for c in second["conditions"] if c["type"] == "Conflict")
    assert conflict["status"] == "True" and conflict["reason"] == "ServedNameInUse"
    assert "AdapterDeployment first (older) already serves support" in conflict["message"]
    assert next(c for c in second["conditions"] if c["type"] == "Ready")["reason"] == "ServedNameConflict"
    # They no longer swap adapters on every pass: the older one's adapter stays everywhere.
    for _ in range(3):
        settle(rt, "first", passes=1)
        settle(rt, "second", passes=1)
    assert {Path(p["support"]).name for p in pods.served.values()} == {published["a"][1][7:]}
    # The older one goes: the newer one takes over.
    del kube.objects["first"]
    rt.forget(NS, "first", "uid-first")
    second = settle(rt, "second", passes=3)
    assert second["phase"] == "Ready" and second["activeDigest"] == published["b"][1]
    assert next(c for c in second["conditions"] if c["type"] == "Conflict")["status"] == "False"
    assert {Path(p["support"]).name for p in pods.served.values()} == {published["b"][1][7:]}


def test_a_three_step_canary_bakes_at_each_step_then_promotes(published, monkeypatch):
    import datetime

    clock = [datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)]
    monkeypatch.setattr(ads, "_now", lambda: clock[0])
    kube, pods = FakeKube(4), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    kube.objects["svc"]["spec"]["rollout"]["steps"] = [
        {"replicas": 1, "bakeSeconds": 60},
        {"percent": 50, "bakeSeconds": 120},
    ]
    a = published["a"][1][7:]

    def serving_a() -> int:
        return sum(1 for p in pods.served.values() if Path(p.get("svc", "")).name == a)

    status = settle(rt, "svc", passes=2)
    assert (status["phase"], status["currentStep"], serving_a()) == ("Canary", 0, 1)
    assert "Step 1/2" in status["message"] and "baking 60s more" in status["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Progressing")["reason"] == "Baking"
    clock[0] += datetime.timedelta(seconds=30)
    status = settle(rt, "svc", passes=2)
    assert (status["currentStep"], serving_a()) == (0, 1) and "baking 30s more" in status["message"]
    clock[0] += datetime.timedelta(seconds=31)
    status = settle(rt, "svc", passes=2)
    assert (status["phase"], status["currentStep"], serving_a()) == ("Canary", 1, 2)  # 50% of 4
    assert "Step 2/2" in status["message"] and "baking 120s more" in status["message"]
    clock[0] += datetime.timedelta(seconds=121)
    status = settle(rt, "svc", passes=2)
    assert (status["phase"], serving_a()) == ("Ready", 4)
    assert "currentStep" not in status and "stepStartedAt" not in status
    phases = [p.get("phase") for p in kube.patches if p.get("phase")]
    assert phases == ["Canary", "Promoting", "Ready"]


def test_max_unavailable_moves_that_many_pods_per_pass(published):
    kube, pods = FakeKube(5), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    kube.objects["svc"]["spec"]["rollout"].update(strategy="AllAtOnce", maxUnavailable=2)
    counts = []
    for _ in range(4):
        counts.append(settle(rt, "svc", passes=1)["loadedReplicas"])
    assert counts == [2, 4, 5, 5]
    assert settle(rt, "svc", passes=1)["phase"] == "Ready"


def test_smoke_answers_compare_normalised_whitespace_and_case_but_not_words():
    same = server_pods._same_answer
    assert same("  Billing\n", "billing", exact=True)
    assert same("Refund  the\tcustomer", "refund the customer", exact=True)
    assert same("\uff22\uff29\uff2c\uff2c\uff29\uff2e\uff27", "billing", exact=True)  # full-width forms (NFKC)
    assert not same("billing.", "billing", exact=True)
    assert not same("billing 2", "billing 3", exact=True)
    assert same("Billing and more", "billing", exact=False)  # maxNewTokens unknown: a prefix


def test_delete_unloads_from_every_pod_and_says_so(published):
    kube, pods = FakeKube(3), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    add(kube, "svc", *published["a"])
    assert settle(rt, "svc")["phase"] == "Ready"
    events, remaining = asyncio.run(ads.cleanup(rt, kube.objects["svc"]))
    assert remaining == [] and [(e.type, e.reason) for e in events] == [("Normal", "Unloaded")]
    assert events[0].message == "Unloaded svc from 3 pods"
    assert all("svc" not in served for served in pods.served.values())
    assert "uid-svc" not in rt.tracks and (NS, "svc") not in rt.selectors


def test_many_adapterdeployments_of_one_deployment_share_its_reads_until_a_pod_changes(published):
    kube, pods = FakeKube(2), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    rt.settings.shared_read_seconds = 60.0
    calls: list[str] = []
    for method in ("get_deployment", "get_secret", "list_pods"):
        real = getattr(kube, method)
        setattr(kube, method, lambda *args, _real=real, _name=method: calls.append(_name) or _real(*args))
    names = [f"svc-{i}" for i in range(20)]
    for name in names:
        add(kube, name, *published["a"])
        kube.objects[name]["spec"]["rollout"].update(strategy="AllAtOnce", smokePrompts=0)

    async def resync() -> None:  # as the resync or a pod event queues them: all at once
        await asyncio.gather(*(ads.reconcile(rt, NS, name) for name in names))

    asyncio.run(resync())
    assert all(kube.objects[n]["status"]["phase"] == "Ready" for n in names)
    assert sorted(set(calls)) == ["get_deployment", "get_secret", "list_pods"]
    assert calls.count("list_pods") == 1, "one LIST for 20 AdapterDeployments of the same Deployment"
    # A pod changes (the pod watch drops the namespace's reads): the next passes see it.
    kube.pods.pop()
    rt.drop_reads(NS)
    asyncio.run(resync())
    assert calls.count("list_pods") == 2
    assert {kube.objects[n]["status"]["desiredReplicas"] for n in names} == {1}


def test_two_made_in_the_same_second_the_one_that_served_first_keeps_the_served_name(published):
    kube, pods = FakeKube(2), FakePods(answers_for(published))
    rt = runtime(kube, pods)
    # creationTimestamp has whole seconds; "a-intruder" sorts before "owner" by name, and must still lose.
    for name, adapter in (("owner", "a"), ("a-intruder", "b")):
        add(kube, name, *published[adapter])
        kube.objects[name]["metadata"]["creationTimestamp"] = "2026-11-30T10:00:00Z"
        kube.objects[name]["spec"]["servedName"] = "support"
    assert settle(rt, "owner", passes=2)["phase"] == "Ready"
    intruder = settle(rt, "a-intruder", passes=2)
    assert intruder["phase"] == "Refused"
    assert next(c for c in intruder["conditions"] if c["type"] == "Conflict")["reason"] == "ServedNameInUse"
    assert settle(rt, "owner", passes=1)["phase"] == "Ready"
    assert {Path(p["support"]).name for p in pods.served.values()} == {published["a"][1][7:]}
