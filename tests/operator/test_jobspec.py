"""The trainer Job and the Job-to-phase mapping, as pure functions."""

from __future__ import annotations

import json
import re

import pytest

from kubelora.api.v1alpha1 import LoRAJob
from kubelora.operator import names
from kubelora.operator.config import OperatorConfig
from kubelora.operator.executors import observe_job
from kubelora.operator.jobspec import LORAJOB_LABEL, LORAJOB_UID_LABEL, SPEC_ANNOTATION, build_job, job_name


def lorajob(**spec_overrides):
    spec = {
        "baseModel": {"uri": "s3://models/llama/", "secretRef": {"name": "minio-creds"}},
        "dataset": {"train": "s3://data/train.jsonl"},
        "method": "qlora",
        "resources": {
            "gpus": 2,
            "gpuType": "NVIDIA-A100-SXM4-80GB",
            "tolerations": [{"key": "team", "operator": "Exists"}],
        },
        "output": {"uri": "s3://adapters/x/", "secretRef": {"name": "minio-creds"}},
        "retries": 3,
        "activeDeadlineSeconds": 3600,
    }
    spec.update(spec_overrides)
    return LoRAJob.model_validate(
        {"metadata": {"name": "support", "namespace": "team-a", "uid": "u-1", "generation": 1}, "spec": spec}
    )


def test_job_requests_gpus_selects_product_and_tolerates_taints():
    job = build_job(lorajob(), OperatorConfig(trainer_image="registry/trainer:1"))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "team", "operator": "Exists"} in pod["tolerations"]
    assert job["spec"]["backoffLimit"] == 3
    # The deadline bounds each attempt (the pod), not the Job: retries and time queued for a GPU are not in it.
    assert pod["activeDeadlineSeconds"] == 3600 and "activeDeadlineSeconds" not in job["spec"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_job_is_restricted_and_never_holds_a_secret_value():
    job = build_job(lorajob(), OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["OUTPUT_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "minio-creds",
        "key": "secretKey",
    }
    assert all("value" not in e for name, e in env.items() if "AWS_" in name)
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    spec = json.loads(job["spec"]["template"]["metadata"]["annotations"][SPEC_ANNOTATION])
    assert spec["spec"]["method"] == "qlora"


def test_job_name_is_deterministic_short_and_new_for_a_new_uid():
    name = job_name(lorajob())
    assert name == job_name(lorajob()) and re.fullmatch(r"support-train-[0-9a-f]{8}", name), name
    recreated = lorajob()
    recreated.metadata.uid = "u-2"  # deleted and created again under the same name
    assert job_name(recreated) != name


@pytest.mark.parametrize("length", [62, 63, 64, 200, 253])
def test_names_up_to_253_characters_give_valid_job_names_and_labels(length):
    long = lorajob()
    long.metadata.name = ("a.b-" * 64)[: length - 1] + "z"
    job = build_job(long, OperatorConfig())
    name = job["metadata"]["name"]
    # The Job controller copies the name into the pods' job-name label: a DNS label, at most 63.
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        for value in labels.values():
            assert len(value) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value), value
        assert labels[LORAJOB_UID_LABEL] == "u-1"
    assert build_job(long, OperatorConfig())["metadata"] == job["metadata"]  # deterministic
    other = lorajob()
    other.metadata.name = long.metadata.name[:-1] + "y"  # same start, other name
    other_labels = build_job(other, OperatorConfig())["metadata"]["labels"]
    assert other_labels[LORAJOB_LABEL] != job["metadata"]["labels"][LORAJOB_LABEL]


def test_controller_uid_reads_only_the_controller_reference_of_the_right_kind():
    meta = {
        "ownerReferences": [
            {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAJob", "uid": "not-controller"},
            {"apiVersion": "batch/v1", "kind": "Job", "uid": "j-1", "controller": True},
        ]
    }
    assert names.controller_uid(meta, "kubelora.dev/v1alpha1", "LoRAJob") is None
    assert names.controller_uid(meta, "batch/v1", "Job") == "j-1"
    assert names.controller_uid({"labels": {LORAJOB_LABEL: "support"}}, "batch/v1", "Job") is None


def test_observe_job_maps_pod_and_job_conditions():
    job = {"metadata": {"name": "support-train"}, "status": {}}
    unschedulable = {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }
    queued = observe_job(job, [unschedulable])
    assert queued.state == "Queued" and "Insufficient nvidia.com/gpu" in queued.message
    failed = {
        "metadata": {"name": "support-train"},
        "status": {
            "failed": 3,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    }
    observed = observe_job(failed, [])
    assert observed.state == "Failed" and observed.reason == "BackoffLimitExceeded" and observed.attempts == 3
    assert observe_job(None, []).state == "NotStarted"


def test_each_role_reads_with_its_own_secret_and_a_role_without_one_gets_none():
    job = build_job(
        lorajob(
            baseModel={"uri": "s3://models/llama/", "secretRef": {"name": "models-ro"}},
            dataset={"train": "s3://data/train.jsonl", "secretRef": {"name": "data-ro"}},
            output={"uri": "s3://adapters/x/"},
        ),
        OperatorConfig(),
    )
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs["BASE_MODEL_AWS_ACCESS_KEY_ID"] == {"name": "models-ro", "key": "accessKey"}
    assert refs["DATASET_AWS_SECRET_ACCESS_KEY"] == {"name": "data-ro", "key": "secretKey"}
    assert refs["DATASET_S3_ENDPOINT"] == {"name": "data-ro", "key": "endpoint", "optional": True}
    # No shared fallback: the trainer would otherwise use the first Secret for every location.
    assert not any(name.startswith(("OUTPUT_", "AWS_")) for name in refs)


def test_pvc_inputs_mount_read_only_and_a_pvc_output_read_write():
    job = build_job(
        lorajob(
            baseModel={"uri": "pvc://models/llama-3-8b/"},
            dataset={"train": "pvc://data/support/train.jsonl", "validation": "pvc://data/support/val.jsonl"},
            output={"uri": "pvc://scratch/adapters/support/"},
            eval={"testSet": "pvc://scratch/support/test.jsonl"},
        ),
        OperatorConfig(image_pull_secrets=["regcred"]),
    )
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {name: v["persistentVolumeClaim"]["readOnly"] for name, v in claims.items()} == {
        "models": True,
        "data": True,
        "scratch": False,  # the output's claim, also read for the test set: mounted once, writable
    }
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    for claim, volume in claims.items():
        mount = mounts[f"/mnt/pvc/{claim}"]
        assert mount["name"] == volume["name"]
        assert mount["readOnly"] is volume["persistentVolumeClaim"]["readOnly"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" not in build_job(lorajob(), OperatorConfig())["spec"]["template"]["spec"]


def test_container_config_errors_reach_the_observation():
    job = {"metadata": {"name": "support-train"}, "status": {"active": 1}}
    pod = {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": "couldn't find key accessKey in Secret team-a/minio-creds",
                        }
                    },
                }
            ],
        },
    }
    observed = observe_job(job, [pod])
    assert observed.state == "Pending" and observed.reason == "CreateContainerConfigError"
    assert "Secret team-a/minio-creds" in observed.message


def test_a_failed_job_takes_reason_and_message_from_the_trainers_termination_summary():
    job = {
        "metadata": {"name": "support-train"},
        "status": {
            "failed": 1,
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 3"}
            ],
        },
    }

    def pod(message: str) -> dict:
        terminated = {"exitCode": 3, "reason": "Error", "message": message}
        return {
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
            },
        }

    summary = json.dumps({"reason": "MalformedDataset", "message": 'train.jsonl:17: missing "messages"'})
    observed = observe_job(job, [pod(summary)])
    assert observed.reason == "MalformedDataset"
    assert observed.message == 'train.jsonl:17: missing "messages"; exit code 3'
    # A log tail (FallbackToLogsOnError) is passed on as text, under the Job's reason.
    tail = observe_job(job, [pod("Traceback ...\nValueError: boom")])
    assert tail.reason == "PodFailurePolicy" and tail.message.startswith("Traceback ...")


def test_a_pod_that_just_ended_keeps_the_run_in_progress_until_the_job_says_more():
    job = {"metadata": {"name": "support-train"}, "status": {"active": 1}}
    ended = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Succeeded"}}
    assert observe_job(job, [ended]).state == "Running"
    retry = {"metadata": {"name": "q", "creationTimestamp": "2026-01-01T00:01:00Z"}, "status": {"phase": "Pending"}}
    assert observe_job(job, [ended, retry]).state == "Pending"


def test_managed_vllm_pods_get_the_configured_agent_image_and_pull_secrets():
    from kubelora.api.v1alpha1 import AdapterDeployment
    from kubelora.operator.managed_server import managed_deployment
    from kubelora.operator.server_pods import Settings

    ad = AdapterDeployment.model_validate(
        {
            "metadata": {"name": "support", "namespace": "team-a", "uid": "u-2", "generation": 1},
            "spec": {
                "adapter": {"loraJob": "support"},
                "servedName": "support",
                "target": {
                    "baseModel": "tiny",
                    "managed": {"baseModel": {"uri": "hf://org/tiny"}, "image": "vllm/vllm-openai:v0.11.0"},
                },
            },
        }
    )
    config = OperatorConfig(agent_image="registry.example/agent:2.0.0", image_pull_secrets=["regcred"])
    body = managed_deployment(
        ad, Settings.from_env(config.agent_image), "u-2", image_pull_secrets=config.image_pull_secrets
    )
    pod = body["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "kubelora-agent")
    assert agent["image"] == "registry.example/agent:2.0.0"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_a_managed_server_spans_its_gpus_with_tensor_parallelism():
    from kubelora.api.v1alpha1 import AdapterDeployment
    from kubelora.operator.managed_server import managed_deployment
    from kubelora.operator.server_pods import Settings

    def args_for(gpus: int) -> list[str]:
        ad = AdapterDeployment.model_validate(
            {
                "apiVersion": "kubelora.dev/v1alpha1",
                "kind": "AdapterDeployment",
                "metadata": {"name": "tp", "namespace": "team-a", "uid": "u-1"},
                "spec": {
                    "adapter": {"loraJob": "j"},
                    "servedName": "s",
                    "target": {
                        "baseModel": "m",
                        "managed": {"baseModel": {"uri": "hf://org/m"}, "gpus": gpus, "args": ["--dtype", "bfloat16"]},
                    },
                },
            }
        )
        return list(managed_deployment(ad, Settings(), "u-1")["spec"]["template"]["spec"]["containers"][0]["args"])

    eight = args_for(8)
    assert eight[eight.index("--tensor-parallel-size") + 1] == "8"
    assert eight[-2:] == ["--dtype", "bfloat16"]  # spec.target.managed.args stay last
    assert "--tensor-parallel-size" not in args_for(1)


def test_a_multi_node_lorajob_is_an_indexed_job_with_a_headless_service():
    from kubelora.operator.jobspec import build_service, service_name
    from kubelora.trainer import distributed

    job_object = lorajob(resources={"gpus": 8, "nodes": 2, "gpuType": "NVIDIA-A100-SXM4-80GB"}, retries=2)
    job = build_job(job_object, OperatorConfig(trainer_image="registry/trainer:1"))
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    # One attempt that fails may end every pod of it; the retries count attempts.
    assert spec["backoffLimit"] == 4
    assert "backoffLimitPerIndex" not in spec
    pod = spec["template"]["spec"]
    service = build_service(job_object)
    assert service is not None
    name = job["metadata"]["name"]
    assert service["metadata"]["name"] == service_name(job_object) == pod["subdomain"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LORAJOB_UID_LABEL: "u-1", "job-name": name}
    # Job and Service are both controlled by the LoRAJob: the garbage collector removes them with it.
    for child in (job, service):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == "u-1" and owner["controller"] is True and owner["kind"] == "LoRAJob"
    # Pod hostnames <job>-<index> are DNS labels.
    assert len(f"{name}-1") <= 63
    container = pod["containers"][0]
    assert container["command"][:3] == ["python", "-m", "kubelora.trainer.distributed"]
    assert container["args"] == []
    launcher, trainer_args = distributed.parse_args(container["command"][3:])
    assert (launcher.nnodes, launcher.nproc_per_node) == (2, 8)
    assert launcher.rdzv_endpoint == f"{name}-0.{service['metadata']['name']}:{distributed.RDZV_PORT}"
    assert trainer_args == ["--spec", "/etc/kubelora/lorajob.json", "--workdir", "/workspace/run"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"  # per pod


def test_one_node_one_gpu_keeps_the_plain_job():
    from kubelora.operator.jobspec import build_service

    job_object = lorajob(resources={"gpus": 1})
    job = build_job(job_object, OperatorConfig())
    assert build_service(job_object) is None
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container and container["args"][0] == "--spec"
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_long_names_leave_room_for_the_pod_index():
    job_object = LoRAJob.model_validate(
        {
            "metadata": {"name": "x" * 253, "namespace": "n", "uid": "u-2"},
            "spec": {
                "baseModel": {"uri": "s3://m/"},
                "dataset": {"train": "s3://d"},
                "output": {"uri": "s3://o/"},
                "resources": {"gpus": 1, "nodes": 12},
            },
        }
    )
    name = build_job(job_object, OperatorConfig())["metadata"]["name"]
    assert len(f"{name}-11") <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)


def test_a_queued_lorajob_makes_a_suspended_job_for_kueue():
    from kubelora.operator.jobspec import QUEUE_LABEL

    job = build_job(lorajob(queueName="team-a-gpus"), OperatorConfig())
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a-gpus"
    plain = build_job(lorajob(), OperatorConfig())
    assert "suspend" not in plain["spec"] and QUEUE_LABEL not in plain["metadata"]["labels"]


def test_kueues_reason_and_a_quota_refusal_reach_the_observation():
    from kubelora.operator.executors import QUOTA_EXCEEDED, job_suspended, quota_refusal, workload_state

    pending = {
        "status": {
            "conditions": [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": "Pending",
                    "message": "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu",
                }
            ]
        }
    }
    assert workload_state(pending) == (
        "KueuePending",
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu",
    )
    assert workload_state(None)[0] == "PendingAdmission"
    assert job_suspended({"spec": {"suspend": True}, "status": {}})
    finished = {"spec": {"suspend": True}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert not job_suspended(finished) and not job_suspended({"spec": {}})

    message = (
        'Error creating: pods "ft-train-1-abcde" is forbidden: exceeded quota: gpus, requested: '
        "requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=1"
    )
    events = [
        {"reason": "FailedCreate", "message": "Error creating: something else", "lastTimestamp": "1"},
        {"reason": "FailedCreate", "message": message, "lastTimestamp": "2"},
    ]
    assert quota_refusal(events) == message
    assert quota_refusal(events[:1]) is None
    job = {"metadata": {"name": "ft-train-1"}, "status": {"startTime": "2026-01-01T00:00:00Z"}}
    observation = observe_job(job, [], quota_message=message)
    assert observation.state == "Pending" and observation.reason == QUOTA_EXCEEDED
    assert "requests.nvidia.com/gpu=1" in observation.message


def test_training_pods_get_the_grace_period_to_finish_a_step_and_upload_a_checkpoint():
    from kubelora.operator.jobspec import grace_period_seconds

    config = OperatorConfig(trainer_image="registry/trainer:1")

    def grace(job_object, estimate=None):
        return build_job(job_object, config, estimate=estimate)["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]

    big = {"trainableParameters": 500_000_000, "gpuHours": 80.0, "worldSize": 16}
    # 80 GPU-hours over 16 GPUs and 1000 steps: 18 s a step; 12 B x 5e8 + 1 MB = 6.001 GB at 20 MB/s: 300.05 s.
    assert grace(lorajob(training={"maxSteps": 1000}), big) == 358  # ceil(30 + 27 + 300.05)
    # Without a step time (no maxSteps, so no GPU-hours): 120 s and 60 s per 500 MB of checkpoint.
    assert grace(lorajob(training={"epochs": 2}), {**big, "gpuHours": None}) == 841  # ceil(120 + 60 x 12.002)
    # A small adapter on quick steps still gets two minutes.
    small = {"trainableParameters": 4_000_000, "gpuHours": 0.01, "worldSize": 1}
    assert grace(lorajob(training={"maxSteps": 100}), small) == 120
    assert grace_period_seconds(small, 100) == 120
    # Slow steps count: 0.5 GPU-hours over 10 steps is 180 s a step; 30 + 270 + 2.45 s.
    assert grace(lorajob(training={"maxSteps": 10}), {**small, "gpuHours": 0.5}) == 303
    # Nothing known (the base model's config.json was not read): five minutes.
    assert grace(lorajob()) == 300
    # The preflight estimate in the LoRAJob's status serves when none is passed.
    with_status = LoRAJob.model_validate(
        {**lorajob(training={"maxSteps": 1000}).model_dump(by_alias=True), "status": {"estimate": big}}
    )
    assert grace(with_status) == 358


def test_grace_period_from_the_operators_own_estimate():
    from kubelora.operator.estimates import estimate_spec

    llama = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    job_object = lorajob(training={"maxSteps": 500}, lora={"rank": 64}, method="lora")
    estimate = estimate_spec(job_object.spec, llama)
    trainable, gpu_hours, world = estimate["trainableParameters"], estimate["gpuHours"], estimate["worldSize"]
    assert trainable > 10_000_000 and gpu_hours and world == 2
    step = gpu_hours * 3600 / world / 500
    expected = max(120, -(-(30 + 1.5 * step + (12 * trainable + 1_000_000) / 20e6) // 1))
    pod = build_job(job_object, OperatorConfig(), estimate=estimate)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == int(expected)


def test_multi_process_pods_give_torchrun_the_grace_period():
    """torchrun would SIGKILL the workers 30 s after the pod's SIGTERM whatever terminationGracePeriodSeconds says:
    its --shutdown-timeout is the grace period less 10 s."""
    from kubelora.trainer import distributed

    config = OperatorConfig(trainer_image="registry/trainer:1")
    big = {"trainableParameters": 500_000_000, "gpuHours": 80.0, "worldSize": 16}
    for resources in ({"gpus": 8, "nodes": 2}, {"gpus": 4}):
        job = build_job(lorajob(resources=resources, training={"maxSteps": 1000}), config, estimate=big)
        pod = job["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 358
        launcher, _ = distributed.parse_args(pod["containers"][0]["command"][3:])
        assert launcher.shutdown_timeout == 348
    # the least grace period (120 s) leaves 110 s; one process has no torchrun in between
    small = {"trainableParameters": 4_000_000, "gpuHours": 0.01, "worldSize": 2}
    pod = build_job(lorajob(training={"maxSteps": 100}), config, estimate=small)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert distributed.parse_args(pod["containers"][0]["command"][3:])[0].shutdown_timeout == 110
    single = build_job(lorajob(resources={"gpus": 1}), config)["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in single


def test_attempts_of_a_multi_node_job_count_attempts_not_pods():
    from kubelora.operator import handlers

    def job(nodes, **status):
        body = build_job(lorajob(resources={"gpus": 8, "nodes": nodes}), OperatorConfig())
        body["status"] = status
        return handlers._slim(body)  # what the operator's index keeps of the Job

    two = job(2, active=2)
    assert two["spec"]["parallelism"] == 2 and two["spec"]["completionMode"] == "Indexed"
    assert observe_job(two, []).attempts == 1  # the first attempt runs both pods
    assert observe_job(job(2, failed=2, active=2), []).attempts == 2
    assert observe_job(job(2, failed=1, terminating=1, active=2), []).attempts == 2
    assert observe_job(job(2, succeeded=2), []).attempts == 1
    assert observe_job(job(4, failed=4, active=1), []).attempts == 2  # the second attempt's pods are coming up
    assert observe_job(job(1, failed=2, active=1), []).attempts == 3  # one pod per attempt
    assert observe_job({"metadata": {"name": "j"}, "status": {"failed": 1, "active": 1}}, []).attempts == 2
    # a suspended Job (queued in Kueue) keeps its shape and its suspend flag in the index
    queued = build_job(lorajob(resources={"gpus": 8, "nodes": 2}, queueName="q"), OperatorConfig())
    assert handlers._slim(queued)["spec"] == {
        "parallelism": 2,
        "completions": 2,
        "completionMode": "Indexed",
        "suspend": True,
    }
