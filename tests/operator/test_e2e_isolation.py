"""One tenant's dead S3 endpoint delays only that tenant's LoRAJob (issue 14), against the real control plane."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from tests.conftest import wait_for
from tests.operator.harness import (
    OperatorProcess,
    create_s3_secret,
    get,
    install_crds,
    job_of,
    lorajob_manifest,
    seed_inputs,
    wait_phase,
)
from tests.operator.test_e2e_lorajob import finish_pods, jobs_in, publish_result, warning_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The operator's S3 timeouts in this test: long, so the dead tenant's preflight is still hanging while the
#: other tenant's LoRAJob goes all the way to Succeeded (the production defaults are 3 s and 15 s).
HANG_SECONDS = 25


@pytest.fixture
def blackhole():
    """An S3 endpoint that takes connections and never answers (the kernel accepts them into the backlog).

    Like an unroutable address (10.255.255.1:9000) whose connect hangs, but the same on every network: some
    sandboxes answer for unroutable addresses.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def test_a_blackhole_endpoint_never_delays_another_tenants_lorajob(
    devenv, namespace, tmp_path, kubectl, minio_client, bucket, blackhole
):
    install_crds(devenv)
    create_s3_secret(kubectl, namespace, devenv)
    seed_inputs(minio_client, bucket)
    kubectl(
        "create", "secret", "generic", "blackhole-creds", "-n", namespace,
        "--from-literal=accessKey=a", "--from-literal=secretKey=b", f"--from-literal=endpoint={blackhole}",
    )  # fmt: skip
    operator = OperatorProcess(
        devenv, namespace, tmp_path, s3ConnectTimeoutSeconds=HANG_SECONDS, s3ReadTimeoutSeconds=HANG_SECONDS
    )
    operator.start()
    try:
        dead = lorajob_manifest("dead-endpoint", bucket)
        for role in ("baseModel", "dataset", "output"):
            dead["spec"][role]["secretRef"] = {"name": "blackhole-creds"}
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dead))
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(lorajob_manifest("neighbour", bucket)))

        # The neighbour trains and finishes while the dead tenant's preflight has not even come back.
        training = wait_phase(kubectl, namespace, "neighbour", "Training", timeout=HANG_SECONDS)
        assert "InputsFound" not in conditions(get(kubectl, namespace, "lorajob", "dead-endpoint"))
        publish_result(minio_client, bucket, f"adapters/neighbour/_kubelora/{training['metadata']['uid']}/result.json")
        finish_pods(kubectl, namespace, job_of(kubectl, namespace, "neighbour"))
        done = wait_phase(kubectl, namespace, "neighbour", "Succeeded", "Failed", timeout=HANG_SECONDS)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        waiting = get(kubectl, namespace, "lorajob", "dead-endpoint")
        assert "InputsFound" not in conditions(waiting), waiting.get("status")
        assert waiting.get("status", {}).get("phase") in (None, "Pending")

        # Then the dead tenant's preflight gives up, with a condition that names the endpoint, and no Job.
        def unavailable() -> dict | None:
            obj = get(kubectl, namespace, "lorajob", "dead-endpoint")
            return obj if conditions(obj).get("InputsFound", {}).get("reason") == "StorageUnavailable" else None

        stuck = wait_for("dead-endpoint: InputsFound StorageUnavailable", unavailable, timeout=3 * HANG_SECONDS)
        status = stuck["status"]
        assert status["phase"] == "Pending" and "jobName" not in status
        assert blackhole in conditions(stuck)["InputsFound"]["message"]
        assert blackhole in status["message"] and conditions(stuck)["Ready"]["reason"] == "StorageUnavailable"
        assert "StorageUnavailable" in wait_for(
            "the event", lambda: warning_events(kubectl, namespace, "dead-endpoint")
        )
        assert [j["metadata"]["ownerReferences"][0]["name"] for j in jobs_in(kubectl, namespace)] == ["neighbour"]
        assert operator.healthy()
    finally:
        operator.kill(signal.SIGTERM)
