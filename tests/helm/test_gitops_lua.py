"""The Argo CD health checks of docs/gitops.md, run in gopher-lua (the interpreter Argo CD embeds).

The scripts are read from the page itself, so the documentation and this test cannot drift. Argo CD
calls a health script with the object as the global ``obj`` and reads back a table
``{status=..., message=...}``; here a small wrapper does the same, with the object written as a Lua
table literal. Argo CD runs ``argocd-cm`` health checks with only the base, package and table
libraries and a reduced ``os`` (``util/lua/lua.go``: ``SkipOpenLibs`` unless
``resource.customizations.useOpenLibs.*`` is set), so the wrapper takes away ``string``, ``math``,
``io`` and the string methods before it runs a script: a check that leans on them fails here too.

The objects are real ones: LoRAJob statuses written by the operator's own ``derive_status`` for each
phase, AdapterDeployment statuses built with the API models and the operator's condition writer the
way the controller sets them, all in wire form (``dump``); and, against the dev cluster, objects
created in the API server, their status patched, their spec changed so the server bumps the
generation.
"""

from __future__ import annotations

import json
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubelora.api.v1alpha1 import (
    AdapterDeploymentPhase,
    AdapterDeploymentStatus,
    LoRAJobPhase,
    dump,
    validate_adapterdeployment,
    validate_lorajob,
)
from kubelora.devenv import tools
from kubelora.operator import lorajobs
from kubelora.operator.conditions import set_condition
from kubelora.operator.config import OperatorConfig
from kubelora.operator.observe import Observation, TrainerReport
from tests.conftest import REPO

GITOPS_DOC = REPO / "docs" / "gitops.md"
LORAJOB_EXAMPLE = REPO / "examples" / "lorajob-support-classifier-qlora.yaml"
ADAPTERDEPLOYMENT_EXAMPLE = REPO / "examples" / "adapterdeployment-canary.yaml"
HEALTH_KEY = "resource.customizations.health.kubelora.dev_{kind}"
# Argo CD's health.HealthStatusCode values; anything else becomes Unknown ("invalid health status").
ARGO_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
GENERATION = 3
DIGEST = "sha256:" + "ab" * 32
OLD_DIGEST = "sha256:" + "cd" * 32


# --------------------------------------------------------------------------------------------------------------------
# The scripts and the interpreter


def health_checks() -> dict[str, str]:
    """The argocd-cm health scripts in docs/gitops.md, by kind."""
    text = GITOPS_DOC.read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```yaml\n")[1:]]
    configmaps = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "argocd-cm"
    ]
    assert len(configmaps) == 1, "docs/gitops.md shows one argocd-cm ConfigMap"
    data = configmaps[0]["data"]
    scripts = {kind: data.get(HEALTH_KEY.format(kind=kind)) for kind in ("LoRAJob", "AdapterDeployment")}
    assert all(scripts.values()), f"health checks missing from argocd-cm: {sorted(data)}"
    return typing.cast(dict[str, str], scripts)


def lua_literal(value: Any) -> str:
    """A JSON-like value as a Lua expression, as Argo CD's decodeValue turns JSON into Lua values."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            "\\" + chr(b) if chr(b) in '"\\' else chr(b) if 32 <= b < 127 else f"\\{b:03d}" for b in value.encode()
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"No Lua literal for {type(value).__name__}")


WRAPPER = """\
local write, tostring, type, loadfile, assert = io.write, tostring, type, loadfile, assert
local string_methods = getmetatable("")
-- What Argo CD opens for argocd-cm health checks: base, package, table, and an os without side effects.
os = {{time = os.time, date = os.date, clock = os.clock, difftime = os.difftime}}
string, math, io, coroutine, debug, channel = nil, nil, nil, nil, nil, nil
string_methods.__index = nil
obj = {obj}
local hs = assert(loadfile({script}))()
write(type(hs), "\\n")
if type(hs) == "table" then
  write(type(hs.status), "\\n", type(hs.message), "\\n", tostring(hs.status), "\\n", tostring(hs.message))
end
"""


def glua() -> Path:
    path = tools.GLUA.path()
    if not path.is_file():
        pytest.fail(f"glua is not built at {path}; run `make tools`")
    return path


def run_health_check(script: str, obj: dict[str, Any], tmp_path: Path) -> tuple[str, str]:
    """(status, message) as Argo CD would read them from the script's returned table."""
    script_file = tmp_path / "health.lua"
    script_file.write_text(script)
    wrapper = tmp_path / "wrapper.lua"
    wrapper.write_text(WRAPPER.format(obj=lua_literal(obj), script=lua_literal(str(script_file))))
    result = subprocess.run([str(glua()), str(wrapper)], capture_output=True, encoding="utf-8", timeout=30, check=False)
    assert result.returncode == 0, f"the health check failed in gopher-lua:\n{result.stdout}{result.stderr}"
    returned, status_type, message_type, status, message = result.stdout.split("\n", 4)
    # Argo CD JSON-encodes the table into health.HealthStatus{Status, Message string}.
    assert (returned, status_type, message_type) == ("table", "string", "string"), result.stdout
    assert status in ARGO_HEALTH, status
    return status, message


@pytest.fixture(scope="module")
def checks() -> dict[str, str]:
    return health_checks()


# --------------------------------------------------------------------------------------------------------------------
# Objects in wire form


def lorajob(status: dict[str, Any] | None = None, generation: int = GENERATION) -> dict[str, Any]:
    body = yaml.safe_load(LORAJOB_EXAMPLE.read_text())
    body["metadata"].update(namespace="team-a", uid="0b5c6f0e-4a8e-4d5e-9b3e-1f2a3b4c5d6e", generation=generation)
    if status is not None:
        body["status"] = status
    return dump(validate_lorajob(body))


def operator_lorajob_status(observation: Observation, generation: int = GENERATION) -> dict[str, Any]:
    """The status the operator writes for what it observed (kubelora.operator.lorajobs.derive_status)."""
    status, _ = lorajobs.derive_status(
        validate_lorajob(lorajob(generation=generation)), {}, observation, OperatorConfig()
    )
    return status


STARTED = "2026-01-01T10:00:00Z"
ADAPTER = {
    "uri": "s3://adapters/support-classifier/",
    "digest": DIGEST,
    "sizeBytes": 83886080,
    "trainableParameters": 41943040,
    "rank": 16,
    "baseModel": "s3://models/meta-llama/Llama-3.1-8B-Instruct/",
}
GATE_FAILED = {"metric": "accuracy", "rule": "min", "threshold": 0.9, "value": 0.71, "passed": False}

LORAJOB_OBSERVATIONS: dict[str, tuple[Observation, LoRAJobPhase, str]] = {
    "pending": (Observation(state="NotStarted"), "Pending", "Progressing"),
    "queued": (
        Observation(
            state="Queued",
            reason="Unschedulable",
            message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu",
            run_name="support-classifier-1",
        ),
        "Queued",
        "Suspended",
    ),
    "training": (
        Observation(
            state="Running",
            attempts=1,
            started_at=STARTED,
            run_name="support-classifier-1",
            report=TrainerReport(phase="Training", progress={"step": 40, "totalSteps": 120, "loss": 1.2}),
        ),
        "Training",
        "Progressing",
    ),
    "evaluating": (
        Observation(
            state="Running",
            attempts=1,
            started_at=STARTED,
            run_name="support-classifier-1",
            report=TrainerReport(phase="Evaluating"),
        ),
        "Evaluating",
        "Progressing",
    ),
    "succeeded": (
        Observation(
            state="Succeeded",
            attempts=1,
            started_at=STARTED,
            finished_at="2026-01-01T11:00:00Z",
            run_name="support-classifier-1",
            report=TrainerReport(phase="Publishing", result={"adapter": ADAPTER, "eval": {"passed": True}}),
        ),
        "Succeeded",
        "Healthy",
    ),
    "trainer-failed": (
        Observation(
            state="Failed",
            attempts=2,
            started_at=STARTED,
            finished_at="2026-01-01T10:20:00Z",
            run_name="support-classifier-2",
            report=TrainerReport(error={"reason": "OutOfMemory", "message": "CUDA out of memory at step 3"}),
        ),
        "Failed",
        "Degraded",
    ),
    "gates-failed": (
        Observation(
            state="Succeeded",
            attempts=1,
            started_at=STARTED,
            finished_at="2026-01-01T11:00:00Z",
            report=TrainerReport(result={"adapter": ADAPTER, "eval": {"passed": False, "gates": [GATE_FAILED]}}),
        ),
        "Failed",
        "Degraded",
    ),
}


def adapterdeployment(status: dict[str, Any] | None = None, generation: int = GENERATION) -> dict[str, Any]:
    body = yaml.safe_load(ADAPTERDEPLOYMENT_EXAMPLE.read_text())
    body["metadata"].update(namespace="team-a", uid="7d1e2f3a-4b5c-4d6e-8f90-a1b2c3d4e5f6", generation=generation)
    if status is not None:
        body["status"] = status
    return dump(validate_adapterdeployment(body))


def adapterdeployment_status(
    phase: AdapterDeploymentPhase,
    ready: bool,
    reason: str,
    message: str,
    active: str | None = DIGEST,
    previous: str | None = None,
    loaded: int = 0,
    generation: int = GENERATION,
) -> dict[str, Any]:
    """A status as the controller writes it: phase, message, and the Ready condition with the same words."""
    conditions = set_condition([], "Admitted", phase != "Refused", "GatesPassed" if phase != "Refused" else reason)
    conditions = set_condition(conditions, "Ready", ready, reason, message, generation)
    status = AdapterDeploymentStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conditions,  # type: ignore[arg-type]
        message=message,
        active_digest=active,
        active_uri="s3://adapters/support-classifier/" if active else None,
        previous_digest=previous,
        desired_replicas=2,
        loaded_replicas=loaded,
    )
    return dump(status)


ADAPTERDEPLOYMENT_STATUSES: dict[str, tuple[dict[str, Any], str, str]] = {
    "pending": (
        adapterdeployment_status(
            "Pending", False, "LoRAJobNotSucceeded", "LoRAJob support-classifier is Training", active=None
        ),
        "Progressing",
        "LoRAJob support-classifier is Training",
    ),
    "refused": (
        adapterdeployment_status(
            "Refused", False, "GatesFailed", "LoRAJob support-classifier failed its evaluation gates", active=None
        ),
        "Degraded",
        "LoRAJob support-classifier failed its evaluation gates",
    ),
    "loading": (
        adapterdeployment_status("Loading", False, "RolloutInProgress", "Loading abababababab on 2 pods"),
        "Progressing",
        "Loading abababababab on 2 pods",
    ),
    "canary": (
        adapterdeployment_status("Canary", False, "RolloutInProgress", "Canary abababababab on 1/2 pods", loaded=1),
        "Progressing",
        "Canary abababababab on 1/2 pods",
    ),
    "promoting": (
        adapterdeployment_status("Promoting", False, "RolloutInProgress", "Promoting abababababab to all 2 pods"),
        "Progressing",
        "Promoting abababababab to all 2 pods",
    ),
    "ready": (
        adapterdeployment_status(
            "Ready", True, "AdapterLoaded", "abababababab loaded on 2/2 pods as support-classifier", loaded=2
        ),
        "Healthy",
        "abababababab loaded on 2/2 pods as support-classifier",
    ),
    "ready-pods-loading": (
        adapterdeployment_status("Ready", False, "ReplicasNotLoaded", "abababababab loaded on 1/2 pods", loaded=1),
        "Progressing",
        "abababababab loaded on 1/2 pods",
    ),
    "rolled-back": (
        adapterdeployment_status(
            "RolledBack",
            False,
            "SmokeCheckFailed",
            "Rollout of abababababab failed (SmokeCheckFailed): 3/10 matched; rolled back to cdcdcdcdcdcd",
            active=OLD_DIGEST,
            previous=DIGEST,
            loaded=2,
        ),
        "Degraded",
        "Rollout of abababababab failed (SmokeCheckFailed): 3/10 matched; rolled back to cdcdcdcdcdcd",
    ),
    "failed": (
        adapterdeployment_status(
            "Failed",
            False,
            "RolloutTimedOut",
            "Rollout of abababababab failed (RolloutTimedOut): did not finish within 600s; autoRollback is off",
        ),
        "Degraded",
        "Rollout of abababababab failed (RolloutTimedOut): did not finish within 600s; autoRollback is off",
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# Statuses the operator writes


def test_every_phase_is_covered():
    """A new phase in the API must get a health decision (and a row in docs/gitops.md)."""
    lorajob_phases = {phase for _, phase, _ in LORAJOB_OBSERVATIONS.values()}
    assert lorajob_phases == set(typing.get_args(LoRAJobPhase))
    adapter_phases = {status["phase"] for status, _, _ in ADAPTERDEPLOYMENT_STATUSES.values()}
    assert adapter_phases == set(typing.get_args(AdapterDeploymentPhase))


@pytest.mark.parametrize("case", sorted(LORAJOB_OBSERVATIONS))
def test_lorajob_health_for_each_phase(case, checks, tmp_path):
    observation, phase, expected = LORAJOB_OBSERVATIONS[case]
    obj = lorajob(operator_lorajob_status(observation))
    assert obj["status"]["phase"] == phase and obj["status"]["observedGeneration"] == GENERATION
    status, message = run_health_check(checks["LoRAJob"], obj, tmp_path)
    assert status == expected, (case, message)
    assert message == obj["status"]["message"] and message


@pytest.mark.parametrize("case", sorted(ADAPTERDEPLOYMENT_STATUSES))
def test_adapterdeployment_health_for_each_phase(case, checks, tmp_path):
    status_body, expected, expected_message = ADAPTERDEPLOYMENT_STATUSES[case]
    obj = adapterdeployment(status_body)
    status, message = run_health_check(checks["AdapterDeployment"], obj, tmp_path)
    assert (status, message) == (expected, expected_message), case


# --------------------------------------------------------------------------------------------------------------------
# Before the operator has caught up


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_stale_generation_is_progressing_whatever_the_phase(kind, checks, tmp_path):
    """The spec changed after the status was written: a Healthy (or Degraded) verdict is for the old spec."""
    if kind == "LoRAJob":
        healthy_status = operator_lorajob_status(LORAJOB_OBSERVATIONS["succeeded"][0])
        failed_status = operator_lorajob_status(LORAJOB_OBSERVATIONS["trainer-failed"][0])
        build = lorajob
    else:
        healthy_status = ADAPTERDEPLOYMENT_STATUSES["ready"][0]
        failed_status = ADAPTERDEPLOYMENT_STATUSES["failed"][0]
        build = adapterdeployment
    assert run_health_check(checks[kind], build(healthy_status), tmp_path)[0] == "Healthy"
    for status_body in (healthy_status, failed_status):
        stale = build(status_body, generation=GENERATION + 1)
        assert stale["status"]["observedGeneration"] < stale["metadata"]["generation"]
        status, message = run_health_check(checks[kind], stale, tmp_path)
        assert status == "Progressing"
        assert message == f"Waiting for the operator to observe generation {GENERATION + 1}"


@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_no_status_yet_is_progressing(kind, checks, tmp_path):
    build = lorajob if kind == "LoRAJob" else adapterdeployment
    obj = build()
    assert "status" not in obj
    assert run_health_check(checks[kind], obj, tmp_path) == ("Progressing", "Waiting for the operator")
    # A status the operator has not written (no observedGeneration), e.g. only a phase set by hand.
    assert run_health_check(checks[kind], {**obj, "status": {"phase": "Succeeded"}}, tmp_path)[0] == "Progressing"


def test_the_sandbox_is_argo_cds(tmp_path):
    """The wrapper takes away what Argo CD does not give argocd-cm scripts, so a check using it fails here."""
    obj = lorajob()
    for script in (
        'return {status = string.upper("healthy"), message = ""}',
        'return {status = ("Healthy"):upper(), message = ""}',
        "return {status = math.floor(1), message = ''}",
    ):
        with pytest.raises(AssertionError, match="failed in gopher-lua"):
            run_health_check(script, obj, tmp_path)
    with pytest.raises(AssertionError):
        run_health_check('return {status = "Fine", message = "x"}', obj, tmp_path)
    assert run_health_check(
        'return {status = obj.metadata.name .. " ok" == "support-classifier ok" and "Healthy" or "Degraded", '
        'message = "\\228\\184\\173"}',
        obj,
        tmp_path,
    ) == ("Healthy", "中")


# --------------------------------------------------------------------------------------------------------------------
# Objects as the API server returns them


def get_json(kubectl, kind: str, name: str, namespace: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout))


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["LoRAJob", "AdapterDeployment"])
def test_objects_from_the_api_server(kind, checks, kubectl, namespace, chart_crds_in_cluster, tmp_path):
    """Created (no status), status written through the status subresource, then the spec edited."""
    if kind == "LoRAJob":
        body = lorajob()
        status_body = operator_lorajob_status(LORAJOB_OBSERVATIONS["succeeded"][0], generation=1)
        # The one mutable field of a LoRAJob's spec.
        spec_patch = {"spec": {"output": {"deleteOnJobDeletion": True}}}
    else:
        body = adapterdeployment()
        status_body = ADAPTERDEPLOYMENT_STATUSES["ready"][0] | {"observedGeneration": 1}
        spec_patch = {"spec": {"rollout": {"smokePrompts": 20}}}
    name = body["metadata"]["name"]
    manifest = {"apiVersion": body["apiVersion"], "kind": kind, "metadata": {"name": name}, "spec": body["spec"]}
    kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    resource = f"{kind.lower()}s.kubelora.dev"

    created = get_json(kubectl, resource, name, namespace)
    assert created["metadata"]["generation"] == 1 and "status" not in created
    assert run_health_check(checks[kind], created, tmp_path) == ("Progressing", "Waiting for the operator")

    kubectl(
        "patch", resource, name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status_body}),
    )  # fmt: skip
    observed = get_json(kubectl, resource, name, namespace)
    assert observed["status"]["observedGeneration"] == 1
    assert run_health_check(checks[kind], observed, tmp_path)[0] == "Healthy"

    kubectl("patch", resource, name, "-n", namespace, "--type=merge", "-p", json.dumps(spec_patch))
    edited = get_json(kubectl, resource, name, namespace)
    assert edited["metadata"]["generation"] == 2 and edited["status"]["observedGeneration"] == 1
    assert run_health_check(checks[kind], edited, tmp_path) == (
        "Progressing",
        "Waiting for the operator to observe generation 2",
    )
