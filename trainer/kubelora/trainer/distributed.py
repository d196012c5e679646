"""Launch the trainer with one process per GPU, on one pod or across the pods of an Indexed Job.

No torch at import time: the operator builds the pod command with :func:`pod_command`, and a pod runs
``python -m kubelora.trainer.distributed ... -- <trainer args>``, which runs PyTorch's own launcher
(``python -m torch.distributed.run``, i.e. torchrun) with the argv of :func:`torchrun_argv` as its child, passes
SIGTERM on to it, and exits with the code the pod's workers agreed on (:func:`run_torchrun`; torchrun alone exits
1 for any failure):

- one pod, several GPUs: ``--standalone`` (a c10d rendezvous on loopback) and ``--nproc-per-node`` GPUs;
- several pods (``resources.nodes``): ``--nnodes N``, the c10d rendezvous backend at pod 0's stable
  hostname ``<job>-0.<service>`` (the Indexed Job's pods get ``<job>-<index>`` hostnames under the
  headless Service's subdomain), and the node rank from ``JOB_COMPLETION_INDEX``, which the Job
  controller sets in every pod of an Indexed Job. torchrun's agent on pod 0 sees that the endpoint
  names its own host and serves the rendezvous store.

``--max-restarts 0``: a worker that dies ends its pod (no restart in place); its peers' collectives fail, so
their pods end too, and the Job controller's retry starts a new attempt that resumes from the last checkpoint.

``--shutdown-timeout``: on SIGTERM (pod deletion, preemption) torchrun passes the signal to its workers and kills
them after this many seconds (torch's default is 30 s). The operator sets it from the pod's
terminationGracePeriodSeconds (:func:`shutdown_timeout_for`), so the workers get the time the grace period is
sized for: finish the step under way and upload a checkpoint.

Inside the trainer, :func:`rank`, :func:`world_size` and :func:`is_main_process` read the variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without torchrun they say rank 0 of 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

#: The port of the c10d rendezvous store that pod 0's torchrun agent serves.
RDZV_PORT = 29400
#: The module the pods run instead of the image's entrypoint when they launch more than one process.
LAUNCHER_MODULE = "kubelora.trainer.distributed"
TRAINER_MODULE = "kubelora.trainer"
#: The Job controller sets this in each pod of an Indexed Job: the pod's completion index, 0..nodes-1.
INDEX_ENV = "JOB_COMPLETION_INDEX"
#: torchrun's own default for ``--shutdown-timeout``, and the least the launcher is given.
MIN_SHUTDOWN_TIMEOUT_SECONDS = 30
#: What torchrun keeps of the pod's grace period for itself: the kubelet's SIGKILL comes at the grace period.
SHUTDOWN_MARGIN_SECONDS = 10


def launches(nodes: int, gpus: int) -> bool:
    """Whether a pod of this shape runs torchrun (more than one process in all) rather than the trainer directly."""
    return nodes > 1 or gpus > 1


def processes_per_node(gpus: int) -> int:
    """One process per GPU; a CPU pod runs one process (gloo)."""
    return max(gpus, 1)


def rendezvous_host(job: str, service: str, namespace: str | None = None) -> str:
    """Pod 0's stable hostname: ``<job>-0.<service>`` (with ``.<namespace>.svc`` when a namespace is given)."""
    host = f"{job}-0.{service}"
    return f"{host}.{namespace}.svc" if namespace else host


def shutdown_timeout_for(grace_period_seconds: int) -> int:
    """torchrun's ``--shutdown-timeout`` for a pod with this terminationGracePeriodSeconds: the grace period less
    :data:`SHUTDOWN_MARGIN_SECONDS`, and never below torchrun's default of 30 s."""
    return max(MIN_SHUTDOWN_TIMEOUT_SECONDS, int(grace_period_seconds) - SHUTDOWN_MARGIN_SECONDS)


def pod_command(
    *,
    nodes: int,
    gpus: int,
    trainer_args: Sequence[str],
    rdzv_host: str | None = None,
    rdzv_id: str | None = None,
    python: str = "python",
    shutdown_timeout: int | None = None,
) -> list[str] | None:
    """The container command of a training pod, or None when the image's entrypoint runs the trainer as it is.
    ``shutdown_timeout``: seconds torchrun gives its workers between SIGTERM and SIGKILL (None: torch's 30 s)."""
    if not launches(nodes, gpus):
        return None
    command = [python, "-m", LAUNCHER_MODULE, "--nnodes", str(nodes), "--nproc-per-node"]
    command.append(str(processes_per_node(gpus)))
    if shutdown_timeout is not None:
        command += ["--shutdown-timeout", str(_positive_timeout(shutdown_timeout))]
    if nodes > 1:
        if not rdzv_host:
            raise ValueError("A multi-node launch needs the rendezvous host (pod 0's hostname)")
        command += ["--rdzv-endpoint", f"{rdzv_host}:{RDZV_PORT}"]
        if rdzv_id:
            command += ["--rdzv-id", rdzv_id]
    return [*command, "--", *trainer_args]


def _positive_timeout(seconds: int) -> int:
    if seconds < 1:
        raise ValueError(f"shutdown_timeout={seconds} must be at least 1 second")
    return int(seconds)


def node_rank(env: Mapping[str, str] | None = None) -> int:
    """This pod's node rank: its Indexed Job completion index (0 outside an Indexed Job)."""
    value = (os.environ if env is None else env).get(INDEX_ENV, "")
    if not value:
        return 0
    rank_ = int(value)
    if rank_ < 0:
        raise ValueError(f"{INDEX_ENV}={value} is negative")
    return rank_


def torchrun_argv(
    *,
    nnodes: int,
    nproc_per_node: int,
    trainer_args: Sequence[str],
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    module: str = TRAINER_MODULE,
    shutdown_timeout: int | None = None,
) -> list[str]:
    """The torchrun argv for this pod, from its shape and its environment (pure). ``module`` is what each
    process runs: the trainer, or a stand-in in tests. ``shutdown_timeout``: torchrun's ``--shutdown-timeout``
    (None: torch's default of 30 s)."""
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes={nnodes} and nproc_per_node={nproc_per_node} must be at least 1")
    argv = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        if not rdzv_endpoint:
            raise ValueError("A multi-node launch needs --rdzv-endpoint")
        index = node_rank(env)
        if index >= nnodes:
            raise ValueError(f"{INDEX_ENV}={index} is not below nnodes={nnodes}")
        argv += [
            "--nnodes",
            str(nnodes),
            "--node-rank",
            str(index),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id or "kubelora",
        ]
    argv += ["--nproc-per-node", str(nproc_per_node), "--max-restarts", "0"]
    if shutdown_timeout is not None:
        argv += ["--shutdown-timeout", str(_positive_timeout(shutdown_timeout))]
    argv += ["-m", module, *trainer_args]
    return argv


def _env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    value = (os.environ if env is None else env).get(name, "")
    return int(value) if value else default


def rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (torchrun's RANK); 0 when not launched by torchrun."""
    return _env_int("RANK", 0, env)


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank within its pod (torchrun's LOCAL_RANK): the GPU it uses."""
    return _env_int("LOCAL_RANK", 0, env)


def world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes in the run (torchrun's WORLD_SIZE); 1 when not launched by torchrun."""
    return _env_int("WORLD_SIZE", 1, env)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Rank 0: the one process that uploads checkpoints, writes progress and publishes."""
    return rank(env) == 0


def global_batch_size(per_device_batch: int, gradient_accumulation_steps: int, world: int) -> int:
    """Sequences per optimizer step over every process."""
    return per_device_batch * gradient_accumulation_steps * world


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own flags, and the trainer's arguments after ``--``."""
    args = list(argv)
    trainer_args: list[str] = []
    if "--" in args:
        split = args.index("--")
        args, trainer_args = args[:split], args[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m kubelora.trainer.distributed", description=__doc__)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default=None)
    parser.add_argument("--shutdown-timeout", type=int, default=None)
    parser.add_argument("--module", default=TRAINER_MODULE, help=argparse.SUPPRESS)
    return parser.parse_args(args), trainer_args


def main(argv: Sequence[str] | None = None) -> int:
    args, trainer_args = parse_args(sys.argv[1:] if argv is None else argv)
    command = torchrun_argv(
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        trainer_args=trainer_args,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        module=args.module,
        shutdown_timeout=args.shutdown_timeout,
    )
    print(
        f"Launching torchrun nnodes={args.nnodes} node_rank={node_rank()} nproc_per_node={args.nproc_per_node} "
        f"rdzv_endpoint={args.rdzv_endpoint or 'standalone'} "
        f"shutdown_timeout={args.shutdown_timeout or MIN_SHUTDOWN_TIMEOUT_SECONDS}",
        file=sys.stderr,
        flush=True,
    )
    return run_torchrun(command)


#: Set by the launcher for the workers: each writes the exit code it leaves with to ``<dir>/rank-<rank>.code``.
EXIT_CODE_DIR_ENV = "KUBELORA_EXIT_CODE_DIR"
#: The signals the launcher passes on to torchrun (torchrun passes them to the workers).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_torchrun(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run torchrun as a child, passing on SIGTERM (the pod's), and exit with the code the pod's workers left
    with when they agree on one: torchrun itself exits 1 for any failed worker, which would turn a
    non-retryable error (3, the Job's podFailurePolicy fails the Job at once) into a retried one."""
    import shutil
    import subprocess
    import tempfile

    codes_dir = tempfile.mkdtemp(prefix="kubelora-exit-")
    child_env = {**(os.environ if env is None else env), EXIT_CODE_DIR_ENV: codes_dir}
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:  # before torchrun started: passed on as soon as it has
            pending.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        # Its own session, as torchrun gives each worker: a signal to the launcher's process group (a terminal's
        # Ctrl-C, a process-based kubelet) reaches torchrun once, through the launcher; a second SIGTERM during
        # torchrun's graceful shutdown would cut its --shutdown-timeout short.
        child.append(subprocess.Popen(list(command), env=child_env, start_new_session=True))
        for signum in pending:
            child[0].send_signal(signum)
        returncode = child[0].wait()
        return pod_exit_code(returncode, read_exit_codes(codes_dir))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(codes_dir, ignore_errors=True)


def read_exit_codes(directory: str) -> dict[int, int]:
    """The exit codes the workers recorded (:func:`record_exit_code`), by rank."""
    codes: dict[int, int] = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith("rank-") and name.endswith(".code"):
            try:
                with open(os.path.join(directory, name)) as f:
                    codes[int(name[5:-5])] = int(f.read().strip())
            except (OSError, ValueError):
                continue
    return codes


def pod_exit_code(torchrun_code: int, worker_codes: Mapping[int, int]) -> int:
    """The pod's exit code: torchrun's, unless it failed and every worker recorded the same non-zero code."""
    if torchrun_code == 0:
        return 0
    agreed = set(worker_codes.values())
    if len(agreed) == 1 and (code := next(iter(agreed))) != 0:
        return code
    return torchrun_code if torchrun_code > 0 else 1


def record_exit_code(code: int, env: Mapping[str, str] | None = None) -> None:
    """For the launcher (:func:`run_torchrun`): the exit code this worker leaves with."""
    directory = (os.environ if env is None else env).get(EXIT_CODE_DIR_ENV, "")
    if directory and os.path.isdir(directory):
        path = os.path.join(directory, f"rank-{rank(env)}.code")
        with open(path + ".tmp", "w") as f:
            f.write(str(int(code)))
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())


# -- inside the trainer's processes ------------------------------------------------------------------------------
#: Collective timeout of the process group: long enough for local rank 0 to fetch a large base model while the
#: other ranks of its pod wait (a dead peer is noticed at once anyway: its connections close).
TIMEOUT_ENV = "KUBELORA_DIST_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 7200
#: How long the other ranks wait, after training, for rank 0 to evaluate and publish and send its exit code
#: (:func:`agree_exit_code`). Never less than the collective timeout. A rank 0 that dies is noticed at once (its
#: connections close); this bounds only a rank 0 that is alive but slow, or a node lost without a word.
FINAL_TIMEOUT_ENV = "KUBELORA_DIST_FINAL_TIMEOUT_SECONDS"
DEFAULT_FINAL_TIMEOUT_SECONDS = 24 * 3600
#: Tests: each process writes its pid to ``<dir>/rank-<rank>.pid`` when this is set, and the exit code the ranks
#: agreed on to ``<dir>/rank-<rank>.exit`` (:func:`agree_exit_code`).
PID_DIR_ENV = "KUBELORA_DEBUG_PID_DIR"
#: The gloo group of :func:`agree_exit_code` (CPU, its own timeout), made by :func:`init_process_group`.
_final_group: Any = None


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes in this pod (torchrun's LOCAL_WORLD_SIZE); 1 when not launched by torchrun."""
    return _env_int("LOCAL_WORLD_SIZE", 1, env)


def node_count(env: Mapping[str, str] | None = None) -> int:
    """Pods in the run: the world size over the processes per pod."""
    return max(1, world_size(env) // max(1, local_world_size(env)))


def is_local_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Local rank 0: the process of a pod that fetches into the pod's shared workdir."""
    return local_rank(env) == 0


def backend(cuda: bool) -> str:
    """The process group backend: NCCL between GPUs, gloo on CPU (what accelerate picks as well)."""
    return "nccl" if cuda else "gloo"


def initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return bool(dist.is_available() and dist.is_initialized())


def init_process_group(env: Mapping[str, str] | None = None) -> str | None:
    """Join the process group torchrun set up (``MASTER_ADDR``/``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), before
    anything is fetched, so the ranks can wait for each other; accelerate (inside the HF Trainer) sees it is
    initialized and uses it. Returns the backend, or None for a single process."""
    if world_size(env) <= 1 or initialized():
        return None
    import datetime

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank(env))
    seconds = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, env)
    name = backend(cuda)
    dist.init_process_group(backend=name, timeout=datetime.timedelta(seconds=seconds))
    # Every rank makes it here, at the same point (new_group is collective): a gloo group on the CPU, so the
    # ranks that wait for rank 0's exit code during its evaluation neither spin a GPU nor hit NCCL's watchdog.
    global _final_group
    final_seconds = max(seconds, final_timeout_seconds(env))
    _final_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=final_seconds))
    return name


def final_timeout_seconds(env: Mapping[str, str] | None = None) -> int:
    """How long the other ranks wait for rank 0's exit code after training (:data:`FINAL_TIMEOUT_ENV`)."""
    return max(
        _env_int(FINAL_TIMEOUT_ENV, DEFAULT_FINAL_TIMEOUT_SECONDS, env),
        _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, env),
    )


def agree_exit_code(code: int) -> int:
    """Rank 0's ``code`` on every rank, once every rank has it (``code`` as given in a single process).

    Called by every rank once training is over: the other ranks wait here while rank 0 evaluates and publishes,
    so no pod of a multi-node Job completes before rank 0 knows how the run ends. A retryable failure on rank 0
    then fails every pod, and the Job's retry starts all of them again (a lone pod 0 would wait at the
    rendezvous for peers that already completed). The barrier after the broadcast keeps rank 0 from leaving
    (and torchrun from stopping the others with SIGTERM) before every rank has the code.
    """
    if not initialized():
        return code
    import torch.distributed as dist

    box = [int(code)]
    dist.broadcast_object_list(box, src=0, group=_final_group)
    agreed = int(box[0])
    _write_debug_file("exit", str(agreed))
    dist.barrier(group=_final_group)
    return agreed


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (picklable; ``obj`` as given in a single process)."""
    if not initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, by rank (``[obj]`` in a single process)."""
    if not initialized():
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group (every rank, at the end), so torchrun sees clean exits."""
    global _final_group
    _final_group = None
    if initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def write_pid_file(env: Mapping[str, str] | None = None) -> None:
    """For tests that kill one rank: ``<KUBELORA_DEBUG_PID_DIR>/rank-<rank>.pid``."""
    _write_debug_file("pid", str(os.getpid()), env)


def _write_debug_file(suffix: str, text: str, env: Mapping[str, str] | None = None) -> None:
    directory = (os.environ if env is None else env).get(PID_DIR_ENV, "")
    if directory:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{rank(env)}.{suffix}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
