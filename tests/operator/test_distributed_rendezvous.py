"""Two "pods" of a multi-node launch on loopback: the launcher's torchrun argv rendezvous through c10d (gloo, CPU).

Each launcher process plays one pod of the Indexed Job (its JOB_COMPLETION_INDEX), with the endpoint on loopback
instead of pod 0's hostname; a stand-in module does one all_reduce in place of the trainer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow]

WORKER = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
from kubelora.trainer import distributed
out = {
    "rank": distributed.rank(), "world": distributed.world_size(), "main": distributed.is_main_process(),
    "sum": value.item(), "node": os.environ["JOB_COMPLETION_INDEX"],
}
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_nodes_rendezvous_through_c10d_and_all_reduce(tmp_path):
    (tmp_path / "rdzv_worker.py").write_text(WORKER)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), *sys.path]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
    }
    command = [sys.executable, "-m", "kubelora.trainer.distributed", "--nnodes", "2", "--nproc-per-node", "1"]
    command += ["--rdzv-endpoint", endpoint, "--rdzv-id", "test", "--module", "rdzv_worker", "--", str(tmp_path)]
    pods = [
        subprocess.Popen(
            command,
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = [pod.communicate(timeout=300)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    assert [r["main"] for r in results] == [True, False]
    assert all(r["sum"] == 3.0 for r in results)  # 1 + 2: both ranks took part in one collective
    assert sorted(r["node"] for r in results) == ["0", "1"]
    assert "Launching torchrun nnodes=2" in outputs[0]
