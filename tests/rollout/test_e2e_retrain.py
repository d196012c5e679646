"""Two trainings to one output: both versions stay servable, and a rollback to the first serves it again.

The trainer publishes each adapter under ``<output>/sha256/<hex>/`` and moves a pointer last, so a re-train
never overwrites the files an AdapterDeployment serves or would roll back to. Here the AdapterDeployment
names the output URI itself and a digest, as a GitOps repository pins a version.
"""

from __future__ import annotations

import json

import pytest

from tests.rollout.conftest import ad_manifest, served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def serving(digest: str):
    def check(obj: dict) -> bool:
        status = obj.get("status") or {}
        return status.get("activeDigest") == digest and status.get("phase") == "Ready"

    return check


def test_a_retrain_to_the_same_output_keeps_the_first_servable_and_rolls_back_to_it(
    rollout_env, adapters, track, minio_client
):
    env = rollout_env
    first, second = adapters["retrain-1"], adapters["retrain-2"]
    output = first.uri.split("sha256/")[0]
    assert second.uri.split("sha256/")[0] == output and first.uri != second.uri
    pointer = json.loads(minio_client.get_object(env.bucket, output.split("/", 3)[3] + "kubelora-latest.json").read())
    assert pointer["digest"] == second.digest  # the output's newest is the second training

    def pin(digest: str) -> dict:
        manifest = ad_manifest("retrain", "support-retrain", adapter=first, strategy="AllAtOnce", smoke=0)
        manifest["spec"]["adapter"] = {"uri": output, "digest": digest, "secretRef": {"name": "minio-creds"}}
        return manifest

    track(pin(first.digest))
    obj = env.wait_phase("retrain", "Ready", loaded=len(env.pods()), timeout=240)
    assert obj["status"]["activeDigest"] == first.digest and obj["status"]["activeUri"] == first.uri
    env.apply(pin(second.digest))
    obj = env.wait_ad("retrain", serving(second.digest), "the second version Ready", timeout=240)
    assert obj["status"]["previousDigest"] == first.digest
    # Roll back to the first version: its files are where they were.
    env.apply(pin(first.digest))
    obj = env.wait_ad("retrain", serving(first.digest), "the first version Ready again", timeout=240)
    assert obj["status"]["loadedReplicas"] == len(env.pods())
    for pod in env.pods().values():
        assert served(pod)["support-retrain"].endswith(first.hex)
