"""The torchrun launcher (kubelora.trainer.distributed): the argv each pod runs, from its shape and environment."""

from __future__ import annotations

import pytest

from kubelora.trainer import distributed

TRAINER_ARGS = ["--spec", "/etc/kubelora/lorajob.json", "--workdir", "/workspace/run"]


def test_one_process_keeps_the_images_entrypoint():
    assert distributed.pod_command(nodes=1, gpus=1, trainer_args=TRAINER_ARGS) is None
    assert distributed.pod_command(nodes=1, gpus=0, trainer_args=TRAINER_ARGS) is None


def test_one_pod_with_several_gpus_runs_one_process_per_gpu_standalone():
    command = distributed.pod_command(nodes=1, gpus=4, trainer_args=TRAINER_ARGS)
    assert command is not None
    launcher_args, trainer_args = distributed.parse_args(command[3:])
    assert command[:3] == ["python", "-m", "kubelora.trainer.distributed"] and trainer_args == TRAINER_ARGS
    argv = distributed.torchrun_argv(
        nnodes=launcher_args.nnodes,
        nproc_per_node=launcher_args.nproc_per_node,
        trainer_args=trainer_args,
        rdzv_endpoint=launcher_args.rdzv_endpoint,
        env={},
        python="python",
    )
    assert argv == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--max-restarts",
        "0",
        "-m",
        "kubelora.trainer",
        *TRAINER_ARGS,
    ]


def test_each_pod_of_a_multi_node_job_takes_its_node_rank_from_the_completion_index():
    host = distributed.rendezvous_host("ft-train-0a1b2c3d", "ft-train-0a1b2c3d")
    assert host == "ft-train-0a1b2c3d-0.ft-train-0a1b2c3d"
    command = distributed.pod_command(nodes=2, gpus=8, trainer_args=TRAINER_ARGS, rdzv_host=host, rdzv_id="uid-1")
    assert command is not None
    launcher_args, trainer_args = distributed.parse_args(command[3:])
    argvs = [
        distributed.torchrun_argv(
            nnodes=launcher_args.nnodes,
            nproc_per_node=launcher_args.nproc_per_node,
            trainer_args=trainer_args,
            rdzv_endpoint=launcher_args.rdzv_endpoint,
            rdzv_id=launcher_args.rdzv_id,
            env={"JOB_COMPLETION_INDEX": str(index)},
            python="python",
        )
        for index in (0, 1)
    ]
    for index, argv in enumerate(argvs):
        flags = dict(zip(argv[3:-6:2], argv[4:-6:2], strict=True))
        assert flags == {
            "--nnodes": "2",
            "--node-rank": str(index),
            "--rdzv-backend": "c10d",
            "--rdzv-endpoint": f"{host}:{distributed.RDZV_PORT}",
            "--rdzv-id": "uid-1",
            "--nproc-per-node": "8",
            "--max-restarts": "0",
        }
        assert argv[-6:] == ["-m", "kubelora.trainer", *TRAINER_ARGS]
    assert "--standalone" not in argvs[0]


def test_a_multi_node_launch_needs_its_endpoint_and_a_valid_index():
    with pytest.raises(ValueError, match="rendezvous"):
        distributed.pod_command(nodes=2, gpus=1, trainer_args=TRAINER_ARGS)
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        distributed.torchrun_argv(nnodes=2, nproc_per_node=1, trainer_args=[], env={})
    with pytest.raises(ValueError, match="not below"):
        distributed.torchrun_argv(
            nnodes=2, nproc_per_node=1, trainer_args=[], rdzv_endpoint="h:1", env={"JOB_COMPLETION_INDEX": "2"}
        )


def test_a_cpu_pod_in_a_multi_node_job_runs_one_process():
    command = distributed.pod_command(nodes=3, gpus=0, trainer_args=[], rdzv_host="j-0.j")
    assert command is not None and command[command.index("--nproc-per-node") + 1] == "1"


def test_rank_world_size_and_main_process_read_torchruns_variables():
    assert distributed.rank({}) == 0 and distributed.world_size({}) == 1 and distributed.is_main_process({})
    env = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert distributed.rank(env) == 3 and distributed.world_size(env) == 16 and distributed.local_rank(env) == 3
    assert not distributed.is_main_process(env)
    assert distributed.global_batch_size(8, 4, 16) == 512


def test_the_launcher_execs_torchrun(monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setattr(distributed.os, "execv", lambda path, argv: seen.append(list(argv)))
    distributed.main(["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", "j-0.j:29400", "--", "--spec", "f"])
    assert seen and seen[0][1:3] == ["-m", "torch.distributed.run"]
    assert seen[0][seen[0].index("--node-rank") + 1] == "1" and seen[0][-2:] == ["--spec", "f"]


def test_the_layout_the_trainer_reports_becomes_status_training():
    from kubelora.api.v1alpha1 import LoRAJob, LoRAJobStatus
    from kubelora.operator.config import OperatorConfig
    from kubelora.operator.lorajobs import derive_status
    from kubelora.operator.observe import Observation, TrainerReport

    lorajob = LoRAJob.model_validate(
        {
            "metadata": {"name": "x", "namespace": "n", "uid": "u", "generation": 1},
            "spec": {
                "baseModel": {"uri": "s3://m/"},
                "dataset": {"train": "s3://d"},
                "output": {"uri": "s3://o/"},
                "resources": {"gpus": 8, "nodes": 2},
            },
        }
    )
    layout = {"strategy": "FSDP", "nodes": 2, "processesPerNode": 8, "worldSize": 16, "globalBatchSize": 256}
    report = TrainerReport(progress={"step": 3, "totalSteps": 10, "training": {**layout, "other": 1}})
    status, _ = derive_status(lorajob, {}, Observation(state="Running", report=report), OperatorConfig())
    assert status["training"] == layout and "training" not in status["progress"]
    assert LoRAJobStatus.model_validate(status).training is not None
    plain, _ = derive_status(lorajob, {}, Observation(state="Running", report=TrainerReport()), OperatorConfig())
    assert "training" not in plain
