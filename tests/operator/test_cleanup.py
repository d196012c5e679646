"""deleteOnJobDeletion, without a cluster: which AdapterDeployment fields pin a digest, and what a deletion plans.

tests/operator/test_e2e_lorajob.py deletes for real (API server, operator process, MinIO).
"""

from __future__ import annotations

import pytest

from kubelora import storage
from kubelora.operator import handlers
from tests.operator.test_jobspec import lorajob

DIGEST = "sha256:" + "ab" * 32
DIR = f"s3://adapters/x/sha256/{'ab' * 32}/"


def ad(name: str, spec_digest: str | None = None, **status: str) -> dict:
    adapter = {"uri": DIR, "digest": spec_digest} if spec_digest else {"loraJob": "support"}
    return {"metadata": {"namespace": "team-b", "name": name}, "spec": {"adapter": adapter}, "status": status}


def test_an_adapterdeployment_pins_its_spec_active_and_previous_digests():
    other = "sha256:" + "cd" * 32
    assert handlers.digest_references(ad("a", DIGEST)) == {DIGEST: ("team-b", "a", "spec.adapter.digest")}
    assert handlers.digest_references(ad("b", activeDigest=DIGEST, previousDigest=other)) == {
        DIGEST: ("team-b", "b", "status.activeDigest"),
        other: ("team-b", "b", "status.previousDigest"),
    }
    assert handlers.digest_references(ad("c", DIGEST, activeDigest=DIGEST)) == {
        DIGEST: ("team-b", "c", "spec.adapter.digest, status.activeDigest")
    }
    assert handlers.digest_references(ad("d")) == {}
    assert handlers.digest_references({"metadata": {}, "spec": {"adapter": None}, "status": None}) == {}


def test_the_plan_names_only_this_lorajobs_files():
    job = lorajob()
    plan = handlers.plan_cleanup(job, {"adapter": {"uri": DIR, "digest": DIGEST}}, {}, [])
    assert plan.adapter == storage.parse_s3(DIR) and plan.digest == DIGEST
    assert plan.pointer == storage.parse_s3("s3://adapters/x/kubelora-latest.json")
    assert [str(p) for p in plan.prefixes] == ["s3://adapters/x/_kubelora/u-1", "s3://adapters/x/checkpoints"]
    assert plan.events == [] and plan.in_use is None
    # nothing published: the report and the checkpoints
    nothing = handlers.plan_cleanup(job, {"phase": "Failed"}, {}, [])
    assert nothing.adapter is None and nothing.pointer is None and len(nothing.prefixes) == 2


def test_an_adapter_in_use_is_kept_and_the_rest_goes():
    refs = {DIGEST: [("team-b", "serve", "status.previousDigest")]}
    plan = handlers.plan_cleanup(lorajob(), {"adapter": {"uri": DIR, "digest": DIGEST}}, refs, [])
    assert plan.adapter is None and plan.pointer is None and len(plan.prefixes) == 2
    assert plan.in_use is not None and plan.in_use.reason == "AdapterInUse" and plan.events == [plan.in_use]
    assert "AdapterDeployment team-b/serve (status.previousDigest)" in plan.in_use.message
    assert DIGEST in plan.in_use.message


def test_an_adapter_outside_the_digest_directories_is_left_alone():
    # An older trainer published at the output root; a result that names another place is not trusted either.
    for uri, digest in (("s3://adapters/x/", DIGEST), ("s3://adapters/y/sha256/" + "ab" * 32, DIGEST), (DIR, "md5:1")):
        plan = handlers.plan_cleanup(lorajob(), {"adapter": {"uri": uri, "digest": digest}}, {}, [])
        assert plan.adapter is None and plan.pointer is None
        assert [e.reason for e in plan.events] == ["AdapterLeft"]


def test_checkpoints_stay_while_another_lorajob_writes_to_the_output():
    plan = handlers.plan_cleanup(lorajob(), {}, {}, ["team-a/next"])
    assert [str(p) for p in plan.prefixes] == ["s3://adapters/x/_kubelora/u-1"]
    assert [(e.reason, "team-a/next" in e.message) for e in plan.events] == [("CheckpointsKept", True)]


def test_bucket_roots_and_digests():
    assert storage.parse_s3("s3://bucket").is_bucket_root and storage.parse_s3("s3://bucket/").is_bucket_root
    assert not storage.parse_s3("s3://bucket/a/").is_bucket_root
    assert storage.digest_dir("s3://b/out", DIGEST) == storage.digest_dir("s3://b/out/", DIGEST)
    assert storage.digest_dir("s3://b/", DIGEST) == f"s3://b/sha256/{'ab' * 32}/"
    for bad in ("sha256:AB", "sha256:" + "ab" * 31, "sha256:../../" + "ab" * 29, ""):
        with pytest.raises(ValueError, match="digest"):
            storage.digest_hex(bad)
