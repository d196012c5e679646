"""Distributed training on CPU (gloo): ``python -m kubelora.trainer.distributed`` runs the trainer under torchrun.

Two processes train the same adapter as one process with the same global batch, only rank 0 publishes and
reports, the layout (strategy, world size, global batch) is in the events and the manifest, and killing rank 1
fails the attempt while the retry resumes from the last checkpoint to the same final step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubelora.trainer import config as config_mod
from kubelora.trainer import distributed, tiny
from kubelora.trainer.errors import InvalidSpecError
from tests.trainer.helpers import (
    Run,
    TinyKit,
    make_spec,
    read_events,
    s3_bytes,
    s3_json,
    trainer_env,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning")]

#: Adapter weights of the tiny task are ~0.1 after a few steps; a run with the same global batches and the same
#: gradient averaging agrees to float rounding (in practice exactly), a wrong batch is off by ~1e-2.
TOLERANCE = 1e-5


# -- units: layout, FSDP config, 4-bit storage --------------------------------------------------------------------
def spec_with(batch: int, accumulation: int, checkpointing: bool = False) -> Any:
    manifest = make_spec(base="file:///m", train="file:///t.jsonl", output="file:///o", max_steps=4)
    manifest["spec"]["training"].update(
        batchSize=batch, gradientAccumulation=accumulation, gradientCheckpointing=checkpointing
    )
    return config_mod.parse_spec(manifest)[0]


@pytest.mark.parametrize(("nodes", "per_node", "accumulation"), [(1, 1, 4), (1, 2, 2), (2, 2, 1), (1, 4, 1)])
def test_layout_keeps_the_spec_global_batch(nodes: int, per_node: int, accumulation: int) -> None:
    spec = spec_with(batch=3, accumulation=4)
    layout = config_mod.layout(spec, nodes=nodes, processes_per_node=per_node)
    assert layout.world_size == nodes * per_node
    assert (layout.per_device_batch, layout.gradient_accumulation) == (3, accumulation)
    assert layout.global_batch_size == 12 == config_mod.spec_global_batch(spec)
    assert layout.to_dict() == {
        "strategy": "Single" if nodes * per_node == 1 else "DDP",
        "nodes": nodes,
        "processesPerNode": per_node,
        "worldSize": nodes * per_node,
        "globalBatchSize": 12,
    }


def test_layout_refuses_a_world_size_that_cannot_keep_the_global_batch() -> None:
    with pytest.raises(InvalidSpecError) as e:
        config_mod.layout(spec_with(batch=8, accumulation=3), nodes=1, processes_per_node=2)
    message = e.value.message
    for part in ("spec.training.gradientAccumulation (3)", "spec.training.batchSize 8", "global batch of 24", "2"):
        assert part in message
    assert e.value.exit_code == 3  # a retry cannot fix it


def test_checkpoint_fingerprint_has_the_global_batch_not_the_world_size() -> None:
    from kubelora.trainer import cli

    def fingerprint(spec: Any, layout: config_mod.Layout | None) -> str:
        cfg = config_mod.TrainerConfig(spec, None, None, None, 4, 512, Path("/w"), layout=layout)
        data = type("D", (), {"sha256": "abc"})()
        return cli._fingerprint(cfg, "cfg", {"train": data, "validation": None})

    spec = spec_with(batch=4, accumulation=2)
    one = fingerprint(spec, config_mod.layout(spec, nodes=1, processes_per_node=1))
    two = fingerprint(spec, config_mod.layout(spec, nodes=1, processes_per_node=2))
    assert one == two  # a resume on another world size finds the checkpoint, and keeps the global batch
    assert fingerprint(spec_with(batch=4, accumulation=4), None) != one  # another global batch does not


def test_fsdp_config_only_when_the_estimate_says_fsdp() -> None:
    from kubelora.trainer import modeling, train

    spec = spec_with(batch=2, accumulation=2, checkpointing=True)
    ddp = config_mod.layout(spec, nodes=1, processes_per_node=2, strategy="DDP")
    fsdp = config_mod.layout(spec, nodes=1, processes_per_node=2, strategy="FSDP")
    assert train.fsdp_options(ddp, True) == {"fsdp": None, "fsdp_config": None}
    options = train.fsdp_options(fsdp, True)
    assert options["fsdp"] is True
    assert options["fsdp_config"] == {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": True,
    }
    # The trainer's SFTConfig: FSDP with its own activation checkpointing, the derived accumulation. (Building
    # it under FSDP needs a process group; the options are recorded, then processed as transformers does.)
    import trl

    rt = modeling.choose_runtime("lora")
    seen: dict[str, Any] = {}
    real = trl.SFTConfig
    try:
        trl.SFTConfig = lambda **kw: seen.update(kw)  # type: ignore[assignment,misc]
        cfg = config_mod.TrainerConfig(spec, None, None, None, 4, 512, Path("/w"), layout=fsdp)
        train.training_arguments(cfg, rt, Path("/tmp/kubelora-fsdp-args"), has_eval=False)
    finally:
        trl.SFTConfig = real  # type: ignore[misc]
    assert seen["fsdp"] is True and seen["fsdp_config"] == options["fsdp_config"]
    assert seen["activation_checkpointing"] is False and seen["ddp_backend"] == "gloo"
    assert (seen["per_device_train_batch_size"], seen["gradient_accumulation_steps"]) == (2, 1)
    # a real one (one process: more would need the process group), then its FSDP options processed
    single = config_mod.layout(spec, nodes=1, processes_per_node=1)
    cfg = config_mod.TrainerConfig(spec, None, None, None, 4, 512, Path("/w"), layout=single)
    args = train.training_arguments(cfg, rt, Path("/tmp/kubelora-fsdp-args"), has_eval=False)
    assert args.fsdp_plugin_args is None and args.activation_checkpointing
    args.fsdp, args.fsdp_config = seen["fsdp"], dict(seen["fsdp_config"])
    plugin = args._process_fsdp_args()
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["activation_checkpointing"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["reshard_after_forward"] is True


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype() -> None:
    import torch

    from kubelora.trainer import modeling

    rt = modeling.Runtime("cuda", torch.bfloat16, True, bf16=True, fp16=False)
    assert modeling.quantization_config(rt, "FSDP").bnb_4bit_quant_storage == torch.bfloat16
    assert modeling.quantization_config(rt, "DDP").bnb_4bit_quant_storage == torch.uint8
    assert modeling.local_device_index("cuda:3") == 3 and modeling.local_device_index("cpu") == "cpu"


def test_rank_helpers_read_torchrun_environment() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert (distributed.rank(env), distributed.local_rank(env), distributed.world_size(env)) == (3, 1, 4)
    assert distributed.node_count(env) == 2 and not distributed.is_local_main_process(env)
    assert distributed.backend(cuda=False) == "gloo" and distributed.backend(cuda=True) == "nccl"


def test_fsdp_with_eval_is_refused_before_training_naming_spec_eval() -> None:
    from kubelora.trainer import cli

    manifest = make_spec(base="file:///m", train="file:///t.jsonl", output="file:///o", test="file:///test.jsonl")
    manifest["spec"]["training"].update(batchSize=2, gradientAccumulation=2)
    spec = config_mod.parse_spec(manifest)[0]
    fsdp = config_mod.layout(spec, nodes=2, processes_per_node=1, strategy="FSDP")
    with pytest.raises(InvalidSpecError) as e:
        cli.check_layout(spec, fsdp)
    assert e.value.exit_code == 3  # non-retryable: the Job fails at once (podFailurePolicy FailJob)
    assert "spec.eval" in e.value.message and "FSDP" in e.value.message and "hang" in e.value.message
    # DDP keeps a whole model on every rank: evaluation on rank 0 works; FSDP without eval trains as before
    cli.check_layout(spec, config_mod.layout(spec, nodes=2, processes_per_node=1, strategy="DDP"))
    no_eval = spec.model_copy(update={"eval": None})
    cli.check_layout(no_eval, config_mod.layout(no_eval, nodes=2, processes_per_node=1, strategy="FSDP"))


def test_the_exit_code_after_training_is_rank_0s(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelora.trainer import cli

    assert distributed.agree_exit_code(4) == 4  # one process: its own
    # A rank that cannot hear from rank 0 (it died) leaves non-zero (retryable) rather than completing its pod.
    monkeypatch.setenv("RANK", "1")

    def lost(code: int) -> int:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed, "agree_exit_code", lost)
    assert cli._agree_exit_code(0) == 1
    monkeypatch.setenv("RANK", "0")
    assert cli._agree_exit_code(0) == 0 and cli._agree_exit_code(3) == 3  # rank 0 keeps its own


#: torchrun's summary of failed workers: "rank : 1 (local_rank: 1)" then "exitcode : 1 (pid: ...)".
FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def test_every_rank_waits_for_rank_0_and_leaves_with_its_exit_code_when_it_fails_after_training(
    tiny_kit: TinyKit, tmp_path: Path
) -> None:
    """Rank 0 fails in publishing, after training (a retryable error). Rank 1 must not leave with 0 right after
    training (in a multi-node Job its pod would Complete, and the retry of pod 0 alone would wait at the
    rendezvous forever): it waits for rank 0's exit code and leaves with it. No MinIO: file:// everywhere."""
    manifest = make_spec(
        base=f"file://{tiny_kit.model}", train=f"file://{tiny_kit.train}", output=f"file://{tmp_path}/out/"
    )
    manifest["spec"]["training"].update(maxSteps=2, checkpointEverySteps=2, batchSize=4, gradientAccumulation=2)
    pids = tmp_path / "pids"
    env = {"KUBELORA_DEBUG_FAIL_PUBLISH": "1", distributed.PID_DIR_ENV: str(pids)}
    failed = run(tmp_path, "failed", manifest, env, processes=2)
    assert failed.returncode == 1, failed.stderr[-3000:]  # the launcher's: the code the ranks agreed on
    # each rank wrote the exit code it leaves with, once every rank had it
    exits = {r: (pids / f"rank-{r}.exit").read_text() if (pids / f"rank-{r}.exit").exists() else None for r in (0, 1)}
    assert exits == {0: "1", 1: "1"}, failed.stderr[-3000:]
    # torchrun saw both workers fail, none complete (0): each left with the code, or, when the other one left
    # first, was stopped by torchrun's SIGTERM after it had the code (the exit files above)
    codes = {int(r): int(c) for r, c in FAILURE.findall(failed.stderr)}
    assert codes.keys() == {0, 1} and set(codes.values()) <= {1, -signal.SIGTERM}, failed.stderr[-3000:]
    assert 1 in codes.values(), failed.stderr[-3000:]
    assert "Leaving with rank 0's exit code" in failed.stderr
    assert [e["step"] for e in failed.of("checkpoint")] == [2]  # it failed after training
    assert failed.error["reason"] == "InternalError" and "KUBELORA_DEBUG_FAIL_PUBLISH" in failed.error["message"]
    assert not failed.of("result")


def test_a_non_retryable_error_under_torchrun_exits_3(tiny_kit: TinyKit, tmp_path: Path) -> None:
    """Every rank refuses the spec before weights move (InvalidSpec, 3); torchrun alone would exit 1, which the
    Job retries: the launcher exits with the workers' 3, which its podFailurePolicy fails the Job on."""
    manifest = make_spec(
        base=f"file://{tiny_kit.model}", train=f"file://{tiny_kit.train}", output=f"file://{tmp_path}/out/"
    )
    manifest["spec"]["training"].update(maxSteps=2, batchSize=4, gradientAccumulation=3)  # not a multiple of 2
    refused = run(tmp_path, "refused", manifest, {}, processes=2)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert refused.error["reason"] == "InvalidSpec" and "gradientAccumulation" in refused.error["message"]


# -- end to end: torchrun, 2 processes, MinIO ---------------------------------------------------------------------
def upload_kit(client: Any, bucket: str, kit: TinyKit) -> dict[str, str]:
    return {
        "base": tiny.upload_dir(client, bucket, "models/tiny", kit.model),
        "train": tiny.upload_file(client, bucket, "data/train.jsonl", kit.train),
    }


def manifest_for(uris: dict[str, str], bucket: str, out: str, *, accumulation: int = 2, **kw: Any) -> dict[str, Any]:
    manifest = make_spec(output=f"s3://{bucket}/{out}/", **uris, **kw)
    # 380 rows, global batch 4 x 2 = 8: every step of these short runs is inside the first epoch
    manifest["spec"]["training"].update(batchSize=4, gradientAccumulation=accumulation)
    return manifest


def start(
    tmp: Path, name: str, manifest: dict[str, Any], env: dict[str, str], processes: int
) -> tuple[subprocess.Popen[str], Path]:
    d = tmp / name
    spec = write_spec(d, manifest)
    report = d / "report.jsonl"
    trainer = ["--spec", str(spec), "--report-file", str(report), "--workdir", str(d / "work")]
    if processes > 1:
        launcher = ["-m", "kubelora.trainer.distributed", "--nnodes", "1", "--nproc-per-node", str(processes), "--"]
    else:
        launcher = ["-m", "kubelora.trainer"]
    proc = subprocess.Popen(
        [sys.executable, *launcher, *trainer],
        env=trainer_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, report


def run(tmp: Path, name: str, manifest: dict[str, Any], env: dict[str, str], processes: int) -> Run:
    proc, report = start(tmp, name, manifest, env, processes)
    out, err = proc.communicate(timeout=300)
    return Run(proc.returncode, out, err, report)


def adapter_tensors(client: Any, bucket: str, result: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load

    key = result["adapter"]["uri"].removeprefix(f"s3://{bucket}/") + "adapter_model.safetensors"
    return dict(load(s3_bytes(client, bucket, key)))


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.e2e
@pytest.mark.parametrize("packing", [False, True], ids=["length-grouped", "packed"])
def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str], packing: bool
) -> None:
    """Without packing the batches come from the seeded length-grouped sampler, with packing from accelerate's
    seeded random sampler over the packed rows."""
    uris = upload_kit(minio_client, bucket, tiny_kit)
    steps: dict[str, Any] = dict(max_steps=6, checkpoint_every=3, training__packing=packing)
    one = run(tmp_path, "one", manifest_for(uris, bucket, "one", **steps), s3_env, processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path, "two", manifest_for(uris, bucket, "two", **steps), s3_env, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]

    layout = {"strategy": "DDP", "nodes": 1, "processesPerNode": 2, "worldSize": 2, "globalBatchSize": 8}
    single = {"strategy": "Single", "nodes": 1, "processesPerNode": 1, "worldSize": 1, "globalBatchSize": 8}
    assert one.result["training"] == one.result["training"] | single
    # Rank 0 alone reports and publishes: one result, one checkpoint event per save, one digest directory.
    assert len(two.of("result")) == 1 and not two.of("error")
    assert two.result["training"] == two.result["training"] | layout and two.result["training"]["steps"] == 6
    assert [e["step"] for e in two.of("checkpoint")] == [3, 6]
    assert all(e["training"] == layout for e in two.of("progress"))
    assert two.stderr.count("Published adapter") == 1
    digests = {o.object_name.split("/")[2] for o in minio_client.list_objects(bucket, "two/sha256/", recursive=True)}
    assert len(digests) == 1
    key = two.result["adapter"]["uri"].removeprefix(f"s3://{bucket}/")
    manifest = s3_json(minio_client, bucket, key + "kubelora-manifest.json")
    assert manifest["training"] == manifest["training"] | layout
    progress = s3_json(minio_client, bucket, "two/_kubelora/progress.json")
    assert progress["progress"]["training"] == layout

    # Same global batches (accelerate deals the seeded length-grouped batches out in turn), same averaging
    # (loss over the tokens of every process): the same adapter.
    reference = adapter_tensors(minio_client, bucket, one.result)
    diff = max_difference(reference, adapter_tensors(minio_client, bucket, two.result))
    assert diff <= TOLERANCE, diff
    assert one.result["training"]["trainLoss"] == pytest.approx(two.result["training"]["trainLoss"], rel=1e-5)

    if packing:
        return  # the tolerance is shown once, below
    # The tolerance tells a wrong batch apart: two processes that each accumulate the spec's 2 micro-batches
    # (gradientAccumulation 4 over 2 processes, a global batch of 16) train another adapter.
    wrong = run(tmp_path, "wrong", manifest_for(uris, bucket, "wrong", accumulation=4, **steps), s3_env, processes=2)
    assert wrong.returncode == 0, wrong.stderr[-3000:]
    assert wrong.result["training"]["globalBatchSize"] == 16
    wrong_diff = max_difference(reference, adapter_tensors(minio_client, bucket, wrong.result))
    assert wrong_diff > 100 * TOLERANCE, wrong_diff


def checkpoint_steps(client: Any, bucket: str, prefix: str) -> list[int]:
    names = [o.object_name for o in client.list_objects(bucket, f"{prefix}/checkpoints/", recursive=True)]
    return sorted(int(n.split("/")[2].removeprefix("checkpoint-")) for n in names if n.endswith("/COMPLETE"))


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.e2e
def test_killing_rank_1_fails_the_attempt_and_the_retry_resumes_to_the_same_step(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    uris = upload_kit(minio_client, bucket, tiny_kit)
    manifest = manifest_for(uris, bucket, "killed", max_steps=10, checkpoint_every=2)
    pids = tmp_path / "pids"
    env = {**s3_env, "KUBELORA_DEBUG_STEP_SLEEP": "0.4", distributed.PID_DIR_ENV: str(pids)}
    proc, report = start(tmp_path, "a", manifest, env, processes=2)
    try:
        wait_for("the first checkpoint in MinIO", lambda: checkpoint_steps(minio_client, bucket, "killed"), timeout=240)
        pid = int((pids / "rank-1.pid").read_text())
        assert environ(pid)["RANK"] == "1" and environ(pid)["LOCAL_RANK"] == "1"
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, err[-3000:]
    events = read_events(report)
    assert not [e for e in events if e["type"] == "result"]
    assert not list(minio_client.list_objects(bucket, "killed/sha256/"))
    saved = checkpoint_steps(minio_client, bucket, "killed")
    assert saved and saved[-1] < 10, (saved, err[-3000:])
    assert not list(minio_client.list_objects(bucket, "killed/kubelora-latest.json"))  # nothing published

    retry = run(tmp_path, "b", manifest, s3_env, processes=2)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert [e["step"] for e in retry.of("resumed")] == [saved[-1]]
    training = retry.result["training"]
    assert training["resumedFromStep"] == saved[-1] and training["steps"] == training["totalSteps"] == 10
    assert training["worldSize"] == 2 and training["globalBatchSize"] == 8
    assert len(retry.of("result")) == 1


@pytest.mark.e2e
def test_resume_on_another_world_size_keeps_the_global_batch(
    tiny_kit: TinyKit, tmp_path: Path, minio_client: Any, bucket: str, s3_env: dict[str, str]
) -> None:
    """A checkpoint of one process resumes on two: the fingerprint has the global batch, not the world size, and
    the two processes go on with the same batches (each accumulates half), ending at the uninterrupted adapter."""
    uris = upload_kit(minio_client, bucket, tiny_kit)
    steps = dict(max_steps=6, checkpoint_every=2)
    reference = run(tmp_path, "ref", manifest_for(uris, bucket, "ref", **steps), s3_env, processes=1)
    assert reference.returncode == 0, reference.stderr[-3000:]

    manifest = manifest_for(uris, bucket, "moved", **steps)
    proc, report = start(tmp_path, "a", manifest, {**s3_env, "KUBELORA_DEBUG_STEP_SLEEP": "0.4"}, processes=1)
    try:
        wait_for("the first checkpoint", lambda: checkpoint_steps(minio_client, bucket, "moved"), timeout=240)
        proc.send_signal(signal.SIGTERM)  # stops at the next step, after saving a checkpoint
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    saved = checkpoint_steps(minio_client, bucket, "moved")
    assert saved[-1] < 6 and not [e for e in read_events(report) if e["type"] == "result"]

    resumed = run(tmp_path, "b", manifest, s3_env, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in resumed.of("resumed")] == [saved[-1]]
    training = resumed.result["training"]
    assert (training["worldSize"], training["globalBatchSize"], training["steps"]) == (2, 8, 6)
    diff = max_difference(
        adapter_tensors(minio_client, bucket, reference.result), adapter_tensors(minio_client, bucket, resumed.result)
    )
    assert diff <= TOLERANCE, diff
