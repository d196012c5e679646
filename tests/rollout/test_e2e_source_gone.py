"""A rollout whose source disappears mid-bake: it keeps converging, honours its deadline, and rolls back.

Against the real API server, MinIO and the real agent, with stand-in pods (podrunner's fake vLLM, which
serves only /health, /v1/models and runtime LoRA loading; docs/standin-server.md): nothing here needs vLLM's
answers (smokePrompts 0), and three fake pods start in seconds where real ones take minutes and 9 GB.

The operator runs with a short rollout deadline (KUBELORA_ROLLOUT_TIMEOUT_SECONDS); a canary's deadline is
that plus its bake times, counted from the rollout's start (the Progressing condition's transition).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubelora.devenv import cluster, podrunner
from tests.conftest import kubectl_runner, wait_for
from tests.operator.harness import create_s3_secret, install_crds
from tests.rollout.adapters import publish_synthetic
from tests.rollout.conftest import (
    AGENT_TOKEN,
    AGENT_TOKEN_SECRET,
    DEPLOYMENT,
    REPLICAS,
    AdapterOperator,
    RolloutEnv,
    StatusRecorder,
    ad_manifest,
    condition,
    served,
    server_deployment,
)

pytestmark = [pytest.mark.e2e]

TIMEOUT_SECONDS = 20  # the operator's rollout timeout
BAKE_SECONDS = 10  # the canary step's bake: the deadline is 30 s after the rollout starts


@pytest.fixture(scope="module")
def standin_env(devenv: cluster.DevEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutEnv]:
    """A namespace with three fake-vLLM pods of an 'existing' Deployment and the AdapterDeployment controller."""
    kubectl = kubectl_runner(devenv)
    install_crds(devenv)
    namespace = f"t-gone-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", namespace)
    runner: podrunner.PodRunner | None = None
    operator: AdapterOperator | None = None
    try:
        create_s3_secret(kubectl, namespace, devenv)
        kubectl(
            "create", "secret", "generic", AGENT_TOKEN_SECRET, "-n", namespace, "--from-literal", f"token={AGENT_TOKEN}"
        )
        podrunner.ensure_serving_nodes(devenv, 1)
        config = podrunner.RunnerConfig(
            workdir=tmp_path_factory.mktemp("podrunner-fake"),
            server="fake",
            env={k: v for k, v in devenv.env().items() if k != "PATH"},
        )
        runner = podrunner.PodRunner(devenv.kubeconfig, config, namespace, [podrunner.POD_LABEL]).start()
        operator = AdapterOperator(devenv, namespace, tmp_path_factory.mktemp("adapter-operator-gone"))
        operator.extra_env = {
            "KUBELORA_ROLLOUT_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
            "KUBELORA_POD_CIDRS": "127.0.0.0/8",
        }
        images = {"vllm-cpu": "fake-vllm", "agent": "fake-agent"}  # fake mode runs neither image
        env = RolloutEnv(devenv, namespace, "", runner, operator, kubectl, images)
        env.apply(server_deployment(DEPLOYMENT, REPLICAS, {"app": DEPLOYMENT}, images))
        runner.wait_healthy(REPLICAS, timeout=120)
        # the pods Ready in the API, not just healthy processes: rollouts count those
        kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "-n", namespace, "--timeout=120s")
        operator.start()
        yield env
    finally:
        if operator is not None and operator.process is not None:
            kubectl("delete", "adapterdeployments", "--all", "-n", namespace, "--timeout=60s", check=False)
            operator.kill(signal.SIGTERM)
        if runner is not None:
            runner.stop()
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def serving(env: RolloutEnv, served_name: str) -> dict[str, str | None]:
    """Pod name -> the digest hex it serves under ``served_name`` (None: nothing)."""
    out: dict[str, str | None] = {}
    for name, pod in env.pods().items():
        root = served(pod).get(served_name)
        out[name] = root.rstrip("/").rsplit("/", 1)[-1] if root else None
    return out


def test_a_canary_whose_source_is_deleted_mid_bake_keeps_converging_and_rolls_back_at_its_deadline(
    standin_env: RolloutEnv, minio_client: Any, bucket: str, api_client: Any
) -> None:
    env = standin_env
    old = publish_synthetic(minio_client, bucket, "old", seed=1)
    new = publish_synthetic(minio_client, bucket, "new", seed=2)
    target = {"deploymentName": DEPLOYMENT, "baseModel": old.base_model, "port": 8000, "maxLoraRank": 16}

    def manifest(adapter: Any, strategy: str) -> dict[str, Any]:
        body = ad_manifest(
            "gone", "support-gone", adapter=adapter, strategy=strategy, smoke=0, require_eval=False,
            target=target, api_key=False,
        )  # fmt: skip
        body["spec"]["rollout"]["steps"] = [{"replicas": 1, "bakeSeconds": BAKE_SECONDS}]
        return body

    env.apply(manifest(old, "AllAtOnce"))
    try:
        env.wait_phase("gone", "Ready", loaded=REPLICAS)
        assert set(serving(env, "support-gone").values()) == {old.hex}

        with StatusRecorder(api_client, env.namespace, "gone") as recorder:
            applied = time.monotonic()
            env.apply(manifest(new, "Canary"))
            obj = env.wait_ad(
                "gone", lambda o: condition(o, "Progressing")["reason"] == "Baking", "the canary baking", timeout=60
            )
            canary = [r["pod"] for r in obj["status"]["replicas"] if r.get("digest") == new.digest]
            assert len(canary) == 1, obj["status"]["replicas"]
            # The source goes away mid-bake: every object of the new adapter is deleted from MinIO.
            for item in minio_client.list_objects(bucket, prefix="new/", recursive=True):
                minio_client.remove_object(bucket, item.object_name)

            def unavailable(o: dict[str, Any]) -> bool:
                status = o.get("status") or {}
                return status.get("phase") == "Canary" and "source unavailable" in (status.get("message") or "")

            obj = env.wait_ad("gone", unavailable, "the rollout to notice its source is gone", timeout=30)
            assert condition(obj, "Admitted")["reason"] == "AdapterNotFound"
            assert obj["status"]["activeDigest"] == new.digest
            # It keeps converging what it has: the canary serves the new adapter, the others the old one.
            now = serving(env, "support-gone")
            assert now[canary[0]] == new.hex and [h for p, h in now.items() if p != canary[0]] == [old.hex] * 2, now

            obj = env.wait_phase("gone", "RolledBack", loaded=REPLICAS, timeout=90)
            elapsed = time.monotonic() - applied
        deadline = TIMEOUT_SECONDS + BAKE_SECONDS
        # Not before its deadline, and not long after it either.
        assert deadline - 1 <= elapsed <= deadline + 20, elapsed
        phases = recorder.phases()
        assert phases[phases.index("Canary") :] == ["Canary", "RolledBack"], recorder.seen
        assert {s["currentStep"] for s in recorder.seen if s["phase"] == "Canary"} <= {0, None}, recorder.seen

        status = obj["status"]
        assert (status["activeDigest"], status["previousDigest"]) == (old.digest, new.digest)
        ready = condition(obj, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "RolloutTimedOut")
        assert f"did not finish within {deadline}s" in ready["message"] and "rolled back to" in ready["message"]
        assert "source unavailable" in ready["message"]
        assert condition(obj, "Progressing")["reason"] == "RolledBack"
        event = env.wait_event("gone", "RolloutTimedOut")
        assert event["type"] == "Warning" and "rolled back to" in event["message"]
        reasons = [e["reason"] for e in env.events("gone")]
        assert "RolloutStep" not in reasons and reasons.count("RolloutComplete") == 1, reasons

        # Every pod is back on the previous adapter (the canary too), and it stays rolled back.
        wait_for("the old adapter on every pod", lambda: set(serving(env, "support-gone").values()) == {old.hex})
        obj = env.ad("gone")
        assert obj["status"]["phase"] == "RolledBack", json.dumps(obj["status"])
    finally:
        env.kubectl("delete", "adapterdeployment", "gone", "-n", env.namespace, "--timeout=60s", check=False)
