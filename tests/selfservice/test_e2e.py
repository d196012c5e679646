"""One client, end to end: upload → fine-tune in the trainer image → events with eval results → chat with the model
(streamed too).

One trained job, shared by the tests of this module: the real operator (LoRAJobs and AdapterDeployments)
runs the trainer image in a pod of the Job it creates (podrunner plays the kubelet on the kwok GPU nodes),
and rolls the adapter into a managed vLLM server (vLLM's CPU build, run by podrunner on the serving
pool) named by the catalogue's serving pool. The user's only tool is the openai client.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kubelora.devenv import cluster, podrunner
from kubelora.operator.managed_server import MANAGED_LABEL
from kubelora.serving import vllm as vllm_module
from kubelora.trainer import tiny
from tests.conftest import kubectl_runner, wait_for
from tests.operator.harness import OperatorProcess, get
from tests.selfservice.conftest import (
    ApiIdentity,
    ApiProcess,
    Tenant,
    client_for,
    drop_tenant,
    empty_bucket,
    make_tenant,
)

# The module's one training run (and a cold image build, when the trainer changed) is in the first test's setup.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.trainer, pytest.mark.timeout(2400)]

MODEL = "tiny-llama"
POOL = "support"


class FullOperator(OperatorProcess):
    """`kubelora operator` (both controllers) with the environment the serving path needs."""

    def start(self) -> None:
        import os

        saved = os.environ.get("KUBELORA_POD_CIDRS")
        os.environ["KUBELORA_POD_CIDRS"] = "127.0.0.0/8"  # never send traffic to a pod outside loopback
        try:
            super().start()
        finally:
            if saved is None:
                os.environ.pop("KUBELORA_POD_CIDRS", None)
            else:
                os.environ["KUBELORA_POD_CIDRS"] = saved


def catalogue(bucket: str, base_uri: str) -> dict[str, Any]:
    identity = base_uri.rstrip("/")
    return {
        "models": {
            MODEL: {
                "uri": base_uri,
                "gpus": 1,
                "gpuType": "NVIDIA-A100-SXM4-80GB",
                # Sized for the tiny task (tests/trainer/helpers.make_spec): learns it in ~150 steps.
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "training": {
                    "maxSteps": 160,
                    "learningRate": 0.005,
                    "batchSize": 16,
                    "maxSeqLength": 64,
                    "checkpointEverySteps": 80,
                    "gradientCheckpointing": False,
                    "warmupRatio": 0.05,
                    "seed": 7,
                },
                "eval": {"metrics": ["exact_match"], "maxNewTokens": 4, "samplePredictions": 10},
                "retries": 0,
            }
        },
        "servingPools": {
            POOL: {
                "target": {
                    "baseModel": identity,  # what the adapters of this model are trained on
                    "port": 8000,
                    "maxLoras": 2,
                    "maxLoraRank": 16,
                    "managed": {
                        # podrunner serves the same tiny model (its model_dir) whatever --model says.
                        "baseModel": {"uri": "hf://kubelora/tiny-llama"},
                        "args": list(vllm_module.CPU_ARGS),
                        "replicas": 1,
                        "gpus": 1,
                        "gpuType": podrunner.SERVING_POOL.product,
                    },
                },
                "rollout": {"strategy": "AllAtOnce"},
            }
        },
    }


@dataclasses.dataclass
class Trained:
    client: Any
    job: Any
    tenant: Tenant
    test_rows: list[dict[str, Any]]
    api: ApiProcess
    operator: OperatorProcess


@pytest.fixture(scope="module")
def trained(
    devenv: cluster.DevEnv,
    api_identity: ApiIdentity,
    images: dict[str, str],
    minio_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Trained]:
    """Upload, create with deployment onto the pool, and poll to succeeded: once for the module."""
    kubectl = kubectl_runner(devenv)
    root = tmp_path_factory.mktemp("selfservice-e2e")
    model_dir = tiny.build_tiny_model(root / "model")
    task = tiny.write_task(root / "task", n_train=320, n_test=32)
    bucket = f"t-sse-{uuid.uuid4().hex[:10]}"
    minio_client.make_bucket(bucket)
    base_uri = tiny.upload_dir(minio_client, bucket, "platform/models/tiny", model_dir)
    tenant = make_tenant(devenv, kubectl, minio_client, bucket)
    podrunner.ensure_serving_nodes(devenv, 1)
    env = {k: v for k, v in devenv.env().items() if k != "PATH"}
    trainer_pods = podrunner.image_runner(
        devenv, root / "pods", namespace=tenant.namespace, selectors=[], node_selectors=["kubelora.dev/pool=a100"]
    )
    servers = podrunner.PodRunner(
        devenv.kubeconfig,
        podrunner.RunnerConfig(workdir=root / "servers", model_dir=model_dir, env=env),
        tenant.namespace,
        [MANAGED_LABEL],
    )
    operator = FullOperator(
        devenv,
        tenant.namespace,
        root,
        trainerImage=images["trainer"],
        vllmImage=images["vllm-cpu"],
        agentImage=images["agent"],
    )
    api = ApiProcess(api_identity, catalogue(bucket, base_uri), root)
    try:
        trainer_pods.start()
        servers.start()
        operator.start()
        api.start()
        client = client_for(api, tenant.users["alice"])
        training = client.files.create(file=Path(task["train"]), purpose="fine-tune")
        validation = client.files.create(file=Path(task["test"]), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=training.id,
            validation_file=validation.id,
            suffix="support",
            metadata={"ticket": "FT-1"},
            extra_body={"kubelora": {"serving_pool": POOL, "gates": [{"metric": "exact_match", "min": 0.8}]}},
        )
        seen: set[str] = set()

        def finished() -> Any:
            current = client.fine_tuning.jobs.retrieve(job.id)
            seen.add(current.status)
            return current if current.status in ("succeeded", "failed", "cancelled") else None

        try:
            done = wait_for("the fine-tuning job to finish", finished, timeout=1200, interval=2)
        except AssertionError as exc:
            lorajob = get(kubectl, tenant.namespace, "lorajob", job.id)
            raise AssertionError(
                f"{exc}\nlorajob status={json.dumps(lorajob.get('status'), indent=1)}\n"
                f"operator log:\n{operator.log()[-4000:]}\napi log:\n{api.log()[-2000:]}"
            ) from None
        assert done.status == "succeeded", (done, operator.log()[-4000:])
        assert "running" in seen, seen
        rows = [json.loads(line) for line in Path(task["test"]).read_text().splitlines()]
        yield Trained(client, done, tenant, rows, api, operator)
    finally:
        api.stop()
        drop_tenant(kubectl, tenant)
        operator.kill(signal.SIGTERM)
        servers.stop()
        trainer_pods.stop()
        empty_bucket(minio_client, bucket)


def test_the_job_succeeds_with_a_served_model(trained, devenv):
    job = trained.job
    assert job.fine_tuned_model == f"ft/{MODEL}/support-{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.error is None and job.finished_at and job.finished_at >= job.created_at
    assert job.metadata == {"ticket": "FT-1"}
    kubectl = kubectl_runner(devenv)
    lorajob = get(kubectl, trained.tenant.namespace, "lorajob", job.id)
    assert lorajob["status"]["phase"] == "Succeeded"
    ad = get(kubectl, trained.tenant.namespace, "adapterdeployment", job.id)
    assert ad["status"]["phase"] == "Ready" and ad["status"]["activeDigest"] == lorajob["status"]["adapter"]["digest"]
    # The job is listed; its checkpoints include the published adapter.
    assert job.id in [j.id for j in trained.client.fine_tuning.jobs.list()]
    checkpoints = trained.client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].fine_tuned_model_checkpoint == lorajob["status"]["adapter"]["uri"]
    assert {c.step_number for c in checkpoints} >= {80, 160}


def test_events_carry_progress_and_eval_results(trained):
    events = list(trained.client.fine_tuning.jobs.list_events(trained.job.id, limit=100))
    assert events == sorted(events, key=lambda e: e.created_at, reverse=True)
    messages = [e.message for e in events]
    assert any(m.startswith("Created fine-tuning job") for m in messages)
    assert any(m.startswith("Succeeded") or "Succeeded" in m for m in messages), messages
    evals = [e for e in events if e.type == "metrics" and isinstance(e.data, dict) and "eval" in e.data]
    assert len(evals) == 1, messages
    result = evals[0].data["eval"]
    assert result["passed"] is True and result["adapter"]["exact_match"] >= 0.8
    assert evals[0].message.startswith("Evaluation passed: exact_match=")
    progress = [e for e in events if e.type == "metrics" and isinstance(e.data, dict) and "step" in e.data]
    assert progress and progress[0].data["step"] == progress[0].data["total_steps"] == 160
    assert any(m.startswith("Serving the fine-tuned model as ") for m in messages)


def test_the_same_client_chats_with_the_fine_tuned_model(trained, devenv):
    model = trained.job.fine_tuned_model
    right = 0
    for row in trained.test_rows[:4]:
        prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
        try:
            reply = trained.client.chat.completions.create(model=model, messages=prompt, max_tokens=4, temperature=0)
        except openai.APIError as exc:
            ad = get(kubectl_runner(devenv), trained.tenant.namespace, "adapterdeployment", trained.job.id)
            raise AssertionError(
                f"{exc}\nstatus={json.dumps(ad.get('status'), indent=1)}\napi log:\n{trained.api.log()[-3000:]}"
            ) from None
        assert reply.model == model and reply.choices
        content = reply.choices[0].message.content
        right += content.strip() == answer
        # The same request streamed through the API: vLLM's events, relayed as they come. At temperature 0
        # vLLM decodes greedily, and the two requests run one after the other (never batched together), so
        # the deltas add up to the very same answer.
        chunks = list(
            trained.client.chat.completions.create(
                model=model, messages=prompt, max_tokens=4, temperature=0, stream=True
            )
        )
        assert len(chunks) > 1 and all(c.model == model for c in chunks), chunks
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() and streamed == content, (streamed, content)
    assert right >= 3, right
    # A model that is not one of the namespace's is not found, streamed or not.
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError):
            trained.client.chat.completions.create(
                model="ft/other", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
