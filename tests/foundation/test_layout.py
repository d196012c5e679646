"""Packaging: `kubelora.*` import names, and the operator/ folder never shadows the standard library."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubelora.devenv import cluster
from tests.conftest import REPO


def test_stdlib_operator_is_not_shadowed_from_the_checkout():
    code = "import operator, kubelora.operator; print(operator.__file__); print(operator.itemgetter)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "/work" not in out.splitlines()[0] or "lib/python" in out.splitlines()[0]
    assert "itemgetter" in out


def test_kubelora_namespace_spans_operator_and_trainer():
    import kubelora.operator
    import kubelora.trainer

    assert "operator/kubelora/operator" in kubelora.operator.__file__
    assert "trainer/kubelora/trainer" in kubelora.trainer.__file__


def test_gpu_pools_parse_and_name_the_bad_field():
    pools = cluster.parse_pools(
        "- {name: h100, count: 1, gpusPerNode: 8, product: NVIDIA-H100-80GB-HBM3, memoryMiB: 81559}"
    )
    assert pools[0].gpus_per_node == 8
    node = cluster.gpu_node(pools[0], 0)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    with pytest.raises(ValueError, match=r"GPU pool 0.*gpusPerNode"):
        cluster.parse_pools("- {name: h100, count: 1, product: x, memoryMiB: 1}")
