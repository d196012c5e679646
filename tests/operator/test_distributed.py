"""The torchrun launcher (kubelora.trainer.distributed): the argv each pod runs, from its shape and environment."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

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


def test_the_launcher_runs_torchrun(monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setattr(distributed, "run_torchrun", lambda argv: seen.append(list(argv)) or 0)
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


def test_torchrun_gets_the_shutdown_timeout_from_the_pods_grace_period():
    """torchrun, the container's first process, gets the pod's SIGTERM and SIGKILLs its workers after
    --shutdown-timeout (30 s by default): the operator passes the grace period less 10 s, at least 30 s."""
    assert distributed.shutdown_timeout_for(358) == 348
    assert distributed.shutdown_timeout_for(120) == 110
    assert distributed.shutdown_timeout_for(35) == 30 and distributed.shutdown_timeout_for(0) == 30
    for nodes, gpus, host in ((1, 4, None), (2, 8, "j-0.j")):
        command = distributed.pod_command(
            nodes=nodes, gpus=gpus, trainer_args=TRAINER_ARGS, rdzv_host=host, shutdown_timeout=348
        )
        assert command is not None
        launcher_args, trainer_args = distributed.parse_args(command[3:])
        assert launcher_args.shutdown_timeout == 348 and trainer_args == TRAINER_ARGS
        argv = distributed.torchrun_argv(
            nnodes=launcher_args.nnodes,
            nproc_per_node=launcher_args.nproc_per_node,
            trainer_args=trainer_args,
            rdzv_endpoint=launcher_args.rdzv_endpoint,
            env={"JOB_COMPLETION_INDEX": "0"},
            python="python",
            shutdown_timeout=launcher_args.shutdown_timeout,
        )
        # a launcher flag of torchrun's own (before -m), in the spelling torch 2.15's run.py accepts
        script = argv.index("-m", 3)
        assert argv[argv.index("--shutdown-timeout") + 1] == "348" and argv.index("--shutdown-timeout") < script
        assert argv[script:] == ["-m", "kubelora.trainer", *TRAINER_ARGS]
    # Without it (an older operator's pods), torchrun keeps its default.
    default = distributed.pod_command(nodes=1, gpus=2, trainer_args=TRAINER_ARGS)
    assert default is not None and "--shutdown-timeout" not in default
    launcher_args, _ = distributed.parse_args(default[3:])
    assert launcher_args.shutdown_timeout is None
    assert "--shutdown-timeout" not in distributed.torchrun_argv(nnodes=1, nproc_per_node=2, trainer_args=[])
    with pytest.raises(ValueError, match="shutdown_timeout"):
        distributed.torchrun_argv(nnodes=1, nproc_per_node=2, trainer_args=[], shutdown_timeout=0)


def test_torchrun_accepts_the_shutdown_timeout_flag():
    """The flag is torchrun's own: its parser (torch.distributed.run) reads it into shutdown_timeout."""
    from torch.distributed.run import get_args_parser

    argv = distributed.torchrun_argv(nnodes=1, nproc_per_node=2, trainer_args=["--spec", "f"], shutdown_timeout=110)
    parsed = get_args_parser().parse_args(argv[3:])
    assert parsed.shutdown_timeout == 110 and parsed.training_script == "kubelora.trainer" and parsed.module


def test_the_launcher_passes_the_shutdown_timeout_to_torchrun(monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(distributed, "run_torchrun", lambda argv: seen.append(list(argv)) or 0)
    distributed.main(["--nnodes", "1", "--nproc-per-node", "2", "--shutdown-timeout", "290", "--", "--spec", "f"])
    assert seen and seen[0][seen[0].index("--shutdown-timeout") + 1] == "290"


def test_the_pod_exits_with_the_code_its_workers_agreed_on():
    """torchrun exits 1 for any failed worker; a non-retryable 3 must reach the pod (podFailurePolicy FailJob)."""
    assert distributed.pod_exit_code(1, {0: 3, 1: 3}) == 3
    assert distributed.pod_exit_code(1, {0: 1, 1: 1}) == 1
    assert distributed.pod_exit_code(1, {0: 143, 1: 143}) == 143  # stopped by SIGTERM after a checkpoint
    assert distributed.pod_exit_code(1, {0: 3}) == 3  # rank 1 killed before it could record one
    assert distributed.pod_exit_code(1, {0: 3, 1: 1}) == 1  # no agreement: torchrun's
    assert distributed.pod_exit_code(1, {0: 0, 1: 0}) == 1 and distributed.pod_exit_code(1, {}) == 1
    assert distributed.pod_exit_code(0, {0: 3}) == 0
    assert distributed.pod_exit_code(-15, {}) == 1


#: A stand-in for torchrun: its "workers" record exit code 3 (as the trainer does), then it exits 1.
FAKE_TORCHRUN = """
import os, sys
for rank in (0, 1):
    with open(os.path.join(os.environ["KUBELORA_EXIT_CODE_DIR"], f"rank-{rank}.code"), "w") as f:
        f.write("3")
sys.exit(1)
"""


def test_the_launcher_passes_the_workers_code_through_torchrun():
    assert distributed.run_torchrun([sys.executable, "-c", FAKE_TORCHRUN]) == 3
    assert distributed.run_torchrun([sys.executable, "-c", "import sys; sys.exit(0)"]) == 0
    assert distributed.run_torchrun([sys.executable, "-c", "import sys; sys.exit(1)"]) == 1
    # the trainer's side: the code goes where the launcher looks, by rank
    env = {distributed.EXIT_CODE_DIR_ENV: "/nonexistent-kubelora", "RANK": "1"}
    distributed.record_exit_code(3, env)  # no such directory (not under the launcher): nothing written


def test_the_launcher_passes_sigterm_on_to_torchrun(tmp_path: Path):
    """The kubelet's SIGTERM goes to the container's first process, the launcher: torchrun must get it."""
    started, got = tmp_path / "started", tmp_path / "got"
    child = f"""
import signal, sys, time, pathlib
def stop(signum, frame):
    pathlib.Path({str(got)!r}).write_text(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pathlib.Path({str(started)!r}).write_text("1")
time.sleep(60)
sys.exit(0)
"""

    def terminate_when_started() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_started)
    killer.start()
    t0 = time.monotonic()
    code = distributed.run_torchrun([sys.executable, "-c", child])
    killer.join()
    assert code == 143 and got.read_text() == str(int(signal.SIGTERM))
    assert time.monotonic() - t0 < 30
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the launcher's only while it waits
