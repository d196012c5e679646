"""The podrunner's image mode against the real control plane: containers run from a local image with
buildah, and the API sees what a kubelet would report (env from Secrets and ConfigMaps, volumes,
ServiceAccount tokens with real RBAC, exit codes, termination messages, restarts, deletion)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubelora.devenv import cluster, kubelet, podrunner
from tests.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: A Debian bookworm minbase with python3 (kubelora.devenv.images builds it; override for other images).
BASE_IMAGE = os.environ.get("KUBELORA_TEST_BASE_IMAGE", "localhost/kubelora-base:bookworm")

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def _image_present(ref: str) -> bool:
    return kubelet.ImageStore().resolve(ref) is not None


@pytest.fixture(scope="session")
def base_image() -> str:
    if not _image_present(BASE_IMAGE) and BASE_IMAGE == "localhost/kubelora-base:bookworm":
        from kubelora.devenv import images

        images.ensure_base()
    assert _image_present(BASE_IMAGE), f"{BASE_IMAGE} is not in buildah's store"
    return BASE_IMAGE


@pytest.fixture
def runner(devenv: cluster.DevEnv, namespace: str, tmp_path: Path, base_image: str) -> Iterator[podrunner.PodRunner]:
    podrunner.ensure_serving_nodes(devenv, 1)
    runner = podrunner.image_runner(devenv, tmp_path / "kubelet", namespace=namespace, grace_cap=5.0).start()
    yield runner
    runner.stop()


def apply(kubectl: Kubectl, namespace: str, *objects: dict[str, Any]) -> None:
    kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return dict(json.loads(result.stdout))


def container_status(pod: dict[str, Any] | None, name: str) -> dict[str, Any]:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s["name"] == name), {})


def condition(pod: dict[str, Any] | None, kind: str) -> str | None:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return next((c["status"] for c in conditions if c["type"] == kind), None)


def wait_pod(
    kubectl: Kubectl,
    runner: podrunner.PodRunner,
    namespace: str,
    name: str,
    what: str,
    check: Callable[..., Any],
    timeout: float = 90,
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        pod = get(kubectl, namespace, "pod", name)
        return pod if pod is not None and check(pod) else None

    try:
        return dict(wait_for(f"pod {name}: {what}", reached, timeout=timeout))
    except AssertionError as exc:
        pod = get(kubectl, namespace, "pod", name)
        status = json.dumps((pod or {}).get("status"), indent=1)
        raise AssertionError(f"{exc}\nstatus={status}\nlogs:\n{runner.logs(namespace)[-4000:]}") from None


def phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase"))


def python(script: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(script)]


MAIN = """
    import errno, json, os, ssl, sys, time, urllib.error, urllib.request
    print("argv", " ".join(sys.argv[1:]), flush=True)
    print("secret", os.environ["PASSWORD"], "mode", os.environ["MODE"], "uid", os.getuid(), flush=True)
    print("pod", os.environ["POD_NAME"], os.environ["POD_NAMESPACE"], os.environ["POD_IP"], flush=True)
    print("note", open("/etc/podinfo/note").read(), flush=True)
    print("pv", open("/data/data.txt").read().strip(), flush=True)
    try:
        open("/data/new.txt", "w").close()
        print("pv write allowed", flush=True)
    except OSError as exc:
        print("pv write", errno.errorcode[exc.errno], flush=True)
    with open("/shared/hello.txt", "w") as f:
        f.write("hello from main")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(sa + "/token").read()
    namespace = open(sa + "/namespace").read()
    context = ssl.create_default_context(cafile=sa + "/ca.crt")
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    url = f"https://{host}:{port}/api/v1/namespaces/{namespace}/pods/{os.environ['POD_NAME']}"
    seen = []
    while True:
        request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                code, body = response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            code, body = exc.code, None
        if code not in seen:
            seen.append(code)
            print("api", code, flush=True)
        if code == 200:
            break
        time.sleep(0.3)
    print("api uid", body["metadata"]["uid"], flush=True)
    while not os.path.exists("/shared/reply.txt"):
        time.sleep(0.1)
    print("reply", open("/shared/reply.txt").read(), flush=True)
    open("/shared/done", "w").close()
    with open("/termination-log", "w") as f:
        f.write("checks passed; api " + " ".join(map(str, seen)))
"""

HELPER = """
    import http.server, os, threading, time
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("serving", os.environ["POD_IP"], "uid", os.getuid(), flush=True)
    while not os.path.exists("/shared/hello.txt"):
        time.sleep(0.1)
    with open("/shared/reply.txt", "w") as f:
        f.write(f"{open('/shared/hello.txt').read()} / reply from uid {os.getuid()}")
    while not os.path.exists("/shared/done"):
        time.sleep(0.1)
"""

FIELD_ENV = [
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
]


@pytest.fixture
def hostpath_pv(devenv: cluster.DevEnv, kubectl: Kubectl, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    directory = tmp_path / "pv"
    directory.mkdir()
    (directory / "data.txt").write_text("from the persistent volume\n")
    name = f"pv-{uuid.uuid4().hex[:10]}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Mi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": name,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(directory)},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pv))
    yield name, directory
    kubectl("delete", "pv", name, "--wait=false", check=False)


def test_pod_runs_from_its_image_like_a_kubelet(runner, kubectl, namespace, base_image, hostpath_pv):
    pv_name, pv_dir = hostpath_pv
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}}
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "fast"}}
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": pv_name,
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}}
    apply(kubectl, namespace, secret, settings, claim, account)
    wait_for(
        "the claim to be Bound",
        lambda: (get(kubectl, namespace, "pvc", "data") or {}).get("status", {}).get("phase") == "Bound",
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "checks", "annotations": {"kubelora.dev/note": "a note from the API"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "reader",
            "nodeSelector": podrunner.NODE_SELECTOR,
            "tolerations": podrunner.TOLERATIONS,
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
            "containers": [
                {
                    "name": "main",
                    "image": base_image,
                    "command": python(MAIN),
                    "args": ["mode-arg=$(MODE)", "escaped=$$(MODE)"],
                    "env": [
                        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        *FIELD_ENV,
                    ],
                    "terminationMessagePath": "/termination-log",
                    "volumeMounts": [
                        {"name": "shared", "mountPath": "/shared"},
                        {"name": "podinfo", "mountPath": "/etc/podinfo"},
                        {"name": "data", "mountPath": "/data", "readOnly": True},
                    ],
                },
                {
                    "name": "helper",
                    "image": base_image,
                    "command": python(HELPER),
                    "env": FIELD_ENV,
                    "securityContext": {"runAsUser": 1000},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                },
            ],
            "volumes": [
                {"name": "shared", "emptyDir": {}},
                {
                    "name": "podinfo",
                    "downwardAPI": {
                        "items": [
                            {"path": "note", "fieldRef": {"fieldPath": "metadata.annotations['kubelora.dev/note']"}}
                        ]
                    },
                },
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            ],
        },
    }
    apply(kubectl, namespace, pod)

    # Running and Ready (the helper's readiness probe answers on the pod IP); no RBAC yet: 403.
    running = wait_pod(
        kubectl, runner, namespace, "checks", "Ready with the API answering 403",
        lambda p: condition(p, "Ready") == "True" and "api 403" in runner.logs(namespace, "checks", "main"),
    )  # fmt: skip
    assert phase(running) == "Running"
    for name in ("main", "helper"):
        status = container_status(running, name)
        assert "running" in status["state"], status
        assert status["ready"] is True and status["started"] is True, status
        assert status["containerID"].startswith("buildah://")
    assert running["metadata"]["annotations"][kubelet.OWNED_ANNOTATION]
    worker = runner.kubelet.worker("checks", namespace)
    assert worker is not None
    main_pid = next(c.process.pid for c in worker.containers if c.name == "main" and c.process is not None)
    assert Path(f"/proc/{main_pid}").exists()

    # A Role that lets the ServiceAccount get pods: the same token now gets 200.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "get-pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "reader-gets-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "get-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    apply(kubectl, namespace, role, binding)
    done = wait_pod(kubectl, runner, namespace, "checks", "Succeeded", lambda p: phase(p) in ("Succeeded", "Failed"))
    assert phase(done) == "Succeeded", runner.logs(namespace)
    main = container_status(done, "main")["state"]["terminated"]
    assert main["exitCode"] == 0 and main["reason"] == "Completed"
    assert main["message"] == "checks passed; api 403 200"
    assert container_status(done, "helper")["state"]["terminated"]["exitCode"] == 0
    assert condition(done, "Ready") == "False"

    log = runner.logs(namespace, "checks", "main")
    assert "argv mode-arg=fast escaped=$(MODE)" in log
    assert "secret s3cr3t mode fast uid 65532" in log
    assert f"pod checks {namespace} {running['status']['podIP']}" in log
    assert "note a note from the API" in log
    assert "pv from the persistent volume" in log
    assert "pv write EROFS" in log
    assert f"api uid {running['metadata']['uid']}" in log
    assert "reply hello from main / reply from uid 1000" in log
    assert not (pv_dir / "new.txt").exists()


def test_job_pod_failure_policy_sees_the_real_exit_code(runner, kubectl, namespace, base_image):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "exits-3"},
        "spec": {
            "backoffLimit": 6,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}}
                ]
            },
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": base_image,
                            "command": python("import sys; print('failing'); sys.exit(3)"),
                        }
                    ],
                }
            },
        },
    }
    apply(kubectl, namespace, job)

    def failed() -> dict[str, Any] | None:
        obj = get(kubectl, namespace, "job", "exits-3") or {}
        return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == "Failed"), None)

    try:
        cond = wait_for("the Job to fail", failed, timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{runner.logs(namespace)}") from None
    assert cond["reason"] == "PodFailurePolicy", cond
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "job-name=exits-3", "-o", "json").stdout)["items"]
    assert len(pods) == 1, "FailJob: no retries"
    terminated = container_status(pods[0], "main")["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert phase(pods[0]) == "Failed"
    assert "failing" in runner.logs(namespace, container="main")


def test_missing_secret_is_a_config_error_until_it_appears(runner, kubectl, namespace, base_image):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "needs-secret"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": base_image,
                    "command": python("import os; print('token', os.environ['TOKEN'])"),
                    "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}],
                }
            ],
        },
    }
    apply(kubectl, namespace, pod)

    def waiting(message: str) -> Callable[[dict[str, Any]], bool]:
        def check(p: dict[str, Any]) -> bool:
            state = container_status(p, "main").get("state") or {}
            return state.get("waiting", {}) == {"reason": "CreateContainerConfigError", "message": message}

        return check

    pending = wait_pod(kubectl, runner, namespace, "needs-secret", "no Secret", waiting('secret "later" not found'))
    assert phase(pending) == "Pending" and condition(pending, "Ready") == "False"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "later"}, "stringData": {"other": "x"}}
    apply(kubectl, namespace, secret)
    message = f"couldn't find key token in Secret {namespace}/later"
    pending = wait_pod(kubectl, runner, namespace, "needs-secret", "no key", waiting(message))
    assert phase(pending) == "Pending"
    events = kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=needs-secret", "-o", "json"
    )
    assert any(e["reason"] == "Failed" and message in e["message"] for e in json.loads(events.stdout)["items"])

    secret["stringData"] = {"token": "arrived"}
    apply(kubectl, namespace, secret)
    done = wait_pod(
        kubectl, runner, namespace, "needs-secret", "Succeeded", lambda p: phase(p) in ("Succeeded", "Failed")
    )
    assert phase(done) == "Succeeded"
    assert "token arrived" in runner.logs(namespace, "needs-secret")


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def test_deleting_a_running_pod_kills_its_processes(runner, kubectl, namespace, base_image):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "main",
                    "image": base_image,
                    "command": python("import os, time; print('up', os.getpid(), flush=True); time.sleep(3600)"),
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                }
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    }
    apply(kubectl, namespace, pod)
    wait_pod(
        kubectl,
        runner,
        namespace,
        "sleeper",
        "running",
        lambda p: "up" in runner.logs(namespace, "sleeper") and phase(p) == "Running",
    )
    worker = runner.kubelet.worker("sleeper", namespace)
    assert worker is not None
    container = worker.containers[0]
    assert container.process is not None
    pids = _group_pids(container.process.pid)
    python_pid = int(runner.logs(namespace, "sleeper").split("up ")[1].split()[0])
    assert python_pid in pids and len(pids) >= 2  # buildah and the container's python
    working, pod_dir = container.working, worker.directory
    assert working in kubelet.ImageStore().containers()
    assert (pod_dir / "volumes" / "scratch").is_dir()

    kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    wait_for(
        "the pod's processes to be gone", lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=30
    )
    wait_for("the pod to be gone", lambda: get(kubectl, namespace, "pod", "sleeper") is None, timeout=60)
    wait_for(
        "its working container and emptyDir to be removed",
        lambda: working not in kubelet.ImageStore().containers() and not pod_dir.exists(),
        timeout=30,
    )


def test_failed_container_restarts_and_reports_its_log_as_message(runner, kubectl, namespace, base_image):
    script = """
        import os, sys
        if os.path.exists("/state/ran"):
            print("second run", flush=True)
            sys.exit(0)
        open("/state/ran", "w").close()
        for i in range(100):
            print(f"line {i}")
        print("something broke", flush=True)
        sys.exit(5)
    """
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "flaky"},
        "spec": {
            "restartPolicy": "OnFailure",
            "containers": [
                {
                    "name": "main",
                    "image": base_image,
                    "command": python(script),
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [{"name": "state", "mountPath": "/state"}],
                }
            ],
            "volumes": [{"name": "state", "emptyDir": {}}],
        },
    }
    apply(kubectl, namespace, pod)
    done = wait_pod(kubectl, runner, namespace, "flaky", "Succeeded", lambda p: phase(p) in ("Succeeded", "Failed"))
    assert phase(done) == "Succeeded"
    status = container_status(done, "main")
    assert status["restartCount"] == 1
    last = status["lastState"]["terminated"]
    assert last["exitCode"] == 5 and last["reason"] == "Error"
    assert last["message"].endswith("something broke\n")
    assert "line 20\n" not in last["message"] and "line 99\n" in last["message"]  # the last 80 lines
    assert status["state"]["terminated"]["exitCode"] == 0
    assert "message" not in status["state"]["terminated"]


def test_active_deadline_fails_the_pod(runner, kubectl, namespace, base_image):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-long"},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 3,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": base_image, "command": python("import time; time.sleep(3600)")}],
        },
    }
    apply(kubectl, namespace, pod)
    done = wait_pod(kubectl, runner, namespace, "too-long", "Failed", lambda p: phase(p) in ("Succeeded", "Failed"))
    assert done["status"]["reason"] == "DeadlineExceeded"
    terminated = container_status(done, "main")["state"]["terminated"]
    assert terminated["exitCode"] in (137, 143)


def test_missing_image_is_never_pulled(runner, kubectl, namespace):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "no-image"},
        "spec": {"containers": [{"name": "main", "image": "localhost/kubelora-no-such-image:0"}]},
    }
    apply(kubectl, namespace, pod)
    message = 'Container image "localhost/kubelora-no-such-image:0" is not present with pull policy of Never'
    wait_pod(
        kubectl, runner, namespace, "no-image", "ErrImageNeverPull",
        lambda p: container_status(p, "main").get("state", {}).get("waiting") == {"reason": "ErrImageNeverPull", "message": message},
    )  # fmt: skip


def test_a_command_missing_from_the_image_is_a_start_error(runner, kubectl, namespace, base_image):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "no-command"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": base_image, "command": ["kubelora-nope"]}],
        },
    }
    apply(kubectl, namespace, pod)
    done = wait_pod(kubectl, runner, namespace, "no-command", "Failed", lambda p: phase(p) in ("Succeeded", "Failed"))
    terminated = container_status(done, "main")["state"]["terminated"]
    assert terminated["exitCode"] == 128 and terminated["reason"] == "StartError"
    assert terminated["message"] == 'exec: "kubelora-nope": executable file not found in $PATH'


@pytest.fixture(scope="session")
def agent_image() -> str:
    from kubelora.devenv import images

    ref = images.image_ref("agent")
    if not _image_present(ref):
        images.ensure_images(["agent"])
    return ref


def test_serving_pods_run_the_agent_sidecar_from_its_image(devenv, kubectl, namespace, tmp_path, agent_image):
    """Serving mode (here with the fake vLLM of the many-pod benches): the agent runs from the agent image."""
    import httpx

    podrunner.ensure_serving_nodes(devenv, 1)
    creds = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "minio-creds"},
        "stringData": {
            "accessKey": devenv.minio_access_key,
            "secretKey": devenv.minio_secret_key,
            "endpoint": devenv.minio_endpoint,
            "token": "agent-token-from-the-secret",
        },
    }
    env = [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": "minio-creds", "key": key}}}
        for name, key in (
            ("AWS_ACCESS_KEY_ID", "accessKey"),
            ("AWS_SECRET_ACCESS_KEY", "secretKey"),
            ("S3_ENDPOINT", "endpoint"),
            ("KUBELORA_AGENT_TOKEN", "token"),
        )
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "server", "labels": {podrunner.POD_LABEL: "fake"}},
        "spec": {
            "nodeSelector": podrunner.NODE_SELECTOR,
            "tolerations": podrunner.TOLERATIONS,
            "containers": [
                {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "args": ["--port", "8000"]},
                {
                    "name": podrunner.AGENT_CONTAINER,
                    "image": agent_image,
                    "args": ["--host", "0.0.0.0", "--port", "8001", "--dir", "/adapters"],
                    "env": env,
                },
            ],
        },
    }
    config = podrunner.RunnerConfig(workdir=tmp_path / "servers", server="fake", agent_from_image=True)
    with podrunner.PodRunner(devenv.kubeconfig, config, namespace, [podrunner.POD_LABEL]) as runner:
        apply(kubectl, namespace, creds, pod)
        running = runner.wait_healthy(1, timeout=120)["server"]
        agent = running.procs["agent"]
        assert isinstance(agent, podrunner.ImageProc)
        # Adapters live where the image's uid can reach them, at the same path on the host and in vLLM.
        adapters = podrunner.shared_adapters_dir(running.uid, create=False)
        assert agent.argv[-6:] == ["--host", running.ip, "--port", "8001", "--dir", str(adapters)]
        assert adapters.is_dir()
        url = f"http://{running.ip}:8001/v1/adapters"
        assert httpx.get(url, timeout=10).status_code == 401  # the token came from the pod's Secret
        response = httpx.get(url, headers={"Authorization": "Bearer agent-token-from-the-secret"}, timeout=10)
        assert response.status_code == 200, response.text
        assert agent.process is not None
        pids = kubelet.container_pids(agent.process.pid)
        assert pids, "the agent's process runs in the buildah container"
        uids = Path(f"/proc/{pids[0]}/status").read_text().split("Uid:")[1].split()
        assert uids[0] == "65532"  # the image's USER
        working = agent.working
        assert working in kubelet.ImageStore().containers()
        kubectl("delete", "pod", "server", "-n", namespace, "--wait=false")
        wait_for(
            "the agent's container to be gone", lambda: working not in kubelet.ImageStore().containers(), timeout=60
        )
        wait_for("the pod's adapters to be removed", lambda: not adapters.parent.exists(), timeout=60)


def test_init_containers_run_first_and_a_failing_liveness_probe_restarts(runner, kubectl, namespace, base_image):
    serve = """
        import http.server, os
        first = not os.path.exists("/work/ran")
        open("/work/ran", "w").close()
        print("init said", open("/work/ready.txt").read(), "first" if first else "again", flush=True)
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(500 if first else 200)
                self.end_headers()
            def log_message(self, *args):
                pass
        http.server.HTTPServer((os.environ["POD_IP"], 8081), Handler).serve_forever()
    """
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "lively"},
        "spec": {
            "nodeSelector": podrunner.NODE_SELECTOR,
            "tolerations": podrunner.TOLERATIONS,
            "terminationGracePeriodSeconds": 2,
            "initContainers": [
                {
                    "name": "prepare",
                    "image": base_image,
                    "command": python("open('/work/ready.txt', 'w').write('prepared'); print('prepared')"),
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": base_image,
                    "command": python(serve),
                    "env": FIELD_ENV,
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": 8081},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }
            ],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    }
    apply(kubectl, namespace, pod)

    def restarted_and_ready(p: dict[str, Any]) -> bool:
        status = container_status(p, "main")
        return (
            status.get("restartCount", 0) >= 1
            and "running" in status.get("state", {})
            and condition(p, "Ready") == "True"
        )

    ready = wait_pod(
        kubectl, runner, namespace, "lively", "restarted by its liveness probe, then Ready", restarted_and_ready
    )
    assert phase(ready) == "Running"
    init = ready["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed" and init["ready"] is True
    main = container_status(ready, "main")
    assert main["restartCount"] == 1
    assert main["lastState"]["terminated"]["exitCode"] in (137, 143)
    logs = wait_for(
        "the second run's output",
        lambda: "again" in runner.logs(namespace, "lively", "main") and runner.logs(namespace, "lively", "main"),
    )
    assert "init said prepared first" in logs and "init said prepared again" in logs
    events = json.loads(
        kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=lively", "-o", "json").stdout
    )["items"]
    assert any("failed liveness probe" in e["message"] for e in events)


def test_pods_are_claimed_by_the_node_they_run_on(devenv, kubectl, namespace, tmp_path, base_image):
    def pod(name: str, gpu: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": base_image, "command": python("print('on a GPU node')")}],
        }
        if gpu:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
            spec["tolerations"] = podrunner.TOLERATIONS
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    runner = podrunner.image_runner(
        devenv, tmp_path / "kubelet", namespace=namespace, selectors=[], node_selectors=["kubelora.dev/pool=a100"]
    )
    with runner:
        apply(kubectl, namespace, pod("trainer-like", gpu=True), pod("elsewhere", gpu=False))
        done = wait_pod(kubectl, runner, namespace, "trainer-like", "Succeeded", lambda p: phase(p) == "Succeeded")
        assert done["spec"]["nodeName"].startswith("gpu-a100-")
        assert "on a GPU node" in runner.logs(namespace, "trainer-like")
        # the pod on cpu-0 is kwok's: Running, never owned, never run
        other = wait_pod(kubectl, runner, namespace, "elsewhere", "Running (kwok)", lambda p: phase(p) == "Running")
        assert kubelet.OWNED_ANNOTATION not in (other["metadata"].get("annotations") or {})
        assert runner.logs(namespace, "elsewhere") == ""
