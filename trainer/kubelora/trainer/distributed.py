"""Launch the trainer with one process per GPU, on one pod or across the pods of an Indexed Job.

No torch at import time: the operator builds the pod command with :func:`pod_command`, and a pod runs
``python -m kubelora.trainer.distributed ... -- <trainer args>``, which execs PyTorch's own launcher
(``python -m torch.distributed.run``, i.e. torchrun) with the argv of :func:`torchrun_argv`:

- one pod, several GPUs: ``--standalone`` (a c10d rendezvous on loopback) and ``--nproc-per-node`` GPUs;
- several pods (``resources.nodes``): ``--nnodes N``, the c10d rendezvous backend at pod 0's stable
  hostname ``<job>-0.<service>`` (the Indexed Job's pods get ``<job>-<index>`` hostnames under the
  headless Service's subdomain), and the node rank from ``JOB_COMPLETION_INDEX``, which the Job
  controller sets in every pod of an Indexed Job. torchrun's agent on pod 0 sees that the endpoint
  names its own host and serves the rendezvous store.

``--max-restarts 0``: a worker that dies ends its pod (no restart in place); its peers' collectives fail, so
their pods end too, and the Job controller's retry starts a new attempt that resumes from the last checkpoint.

Inside the trainer, :func:`rank`, :func:`world_size` and :func:`is_main_process` read the variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without torchrun they say rank 0 of 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

#: The port of the c10d rendezvous store that pod 0's torchrun agent serves.
RDZV_PORT = 29400
#: The module the pods run instead of the image's entrypoint when they launch more than one process.
LAUNCHER_MODULE = "kubelora.trainer.distributed"
TRAINER_MODULE = "kubelora.trainer"
#: The Job controller sets this in each pod of an Indexed Job: the pod's completion index, 0..nodes-1.
INDEX_ENV = "JOB_COMPLETION_INDEX"


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


def pod_command(
    *,
    nodes: int,
    gpus: int,
    trainer_args: Sequence[str],
    rdzv_host: str | None = None,
    rdzv_id: str | None = None,
    python: str = "python",
) -> list[str] | None:
    """The container command of a training pod, or None when the image's entrypoint runs the trainer as it is."""
    if not launches(nodes, gpus):
        return None
    command = [python, "-m", LAUNCHER_MODULE, "--nnodes", str(nodes), "--nproc-per-node"]
    command.append(str(processes_per_node(gpus)))
    if nodes > 1:
        if not rdzv_host:
            raise ValueError("A multi-node launch needs the rendezvous host (pod 0's hostname)")
        command += ["--rdzv-endpoint", f"{rdzv_host}:{RDZV_PORT}"]
        if rdzv_id:
            command += ["--rdzv-id", rdzv_id]
    return [*command, "--", *trainer_args]


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
) -> list[str]:
    """The torchrun argv for this pod, from its shape and its environment (pure). ``module`` is what each
    process runs: the trainer, or a stand-in in tests."""
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
    argv += ["--nproc-per-node", str(nproc_per_node), "--max-restarts", "0", "-m", module, *trainer_args]
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
    )
    print(
        f"Launching torchrun nnodes={args.nnodes} node_rank={node_rank()} nproc_per_node={args.nproc_per_node} "
        f"rdzv_endpoint={args.rdzv_endpoint or 'standalone'}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(command[0], command)  # noqa: S606 (torchrun replaces this process, as the pod command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())


# -- inside the trainer's processes ------------------------------------------------------------------------------
#: Collective timeout of the process group: long enough for local rank 0 to fetch a large base model while the
#: other ranks of its pod wait (a dead peer is noticed at once anyway: its connections close).
TIMEOUT_ENV = "KUBELORA_DIST_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 7200
#: Tests: each process writes its pid to ``<workdir>/pids/rank-<rank>.pid`` when this is set.
PID_DIR_ENV = "KUBELORA_DEBUG_PID_DIR"


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
    return name


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
    if initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def write_pid_file(env: Mapping[str, str] | None = None) -> None:
    """For tests that kill one rank: ``<KUBELORA_DEBUG_PID_DIR>/rank-<rank>.pid``."""
    directory = (os.environ if env is None else env).get(PID_DIR_ENV, "")
    if directory:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{rank(env)}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
