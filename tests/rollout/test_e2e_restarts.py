"""Serving that needs no operator to stay correct (issue 14): managed pods preload their adapter.

The operator keeps ``<managed-name>-adapters`` (what the pods serve after the last completed rollout); the agent
downloads it at pod start and links it by servedName for vLLM's filesystem LoRA resolver, and its ``/ready`` keeps
the pod out of Ready until then. With the operator stopped, a replacement pod, a scaled-up pod and a restarted
container each serve the adapter, and no Ready pod ever answers 404 or the base model's answer under its name.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.rollout.adapters import Published
from tests.rollout.conftest import API_KEY, SERVER_PORT, RolloutEnv, ad_manifest, managed_target

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVED = "support-restarts"
AD = "restarts"
MANAGED = "restarts-vllm"


def _sample(adapter: Published) -> dict[str, Any]:
    """An eval sample whose adapter answer is not the base model's: a base answer would show."""
    for sample in adapter.samples:
        if sample["adapter"].strip() and not sample["base"].strip().startswith(sample["adapter"].strip()):
            return sample
    raise AssertionError("no eval sample tells the adapter from the base model")


def _classify(got: str, sample: dict[str, Any]) -> str:
    got = got.strip()
    if got.startswith(sample["adapter"].strip()):
        return "adapter"
    if got.startswith(sample["base"].strip()):
        return "base"
    return "other"


def _ask(ip: str, sample: dict[str, Any], timeout: float = 30) -> tuple[int, str]:
    messages = [m for m in sample["messages"] if m.get("role") != "assistant"]
    response = httpx.post(
        f"http://{ip}:{SERVER_PORT}/v1/chat/completions",
        json={"model": SERVED, "messages": messages, "max_tokens": 64, "temperature": 0},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=timeout,
    )
    if response.status_code != 200:
        return response.status_code, response.text[:200]
    return 200, str(response.json()["choices"][0]["message"]["content"] or "")


@dataclass
class Answer:
    at: float
    pod: str
    status: int  # 0: no HTTP answer (connection refused, reset)
    kind: str  # adapter | base | other | error


class ServiceLike:
    """Polls every Ready pod of the managed server, as a Service routes: what each answered for servedName."""

    def __init__(self, env: RolloutEnv, sample: dict[str, Any]) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        self.api = kube_config.new_client_from_config(config_file=str(env.devenv.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.namespace = env.namespace
        self.sample = sample
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def ready_pods(self) -> dict[str, str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"kubelora.dev/adapterdeployment={AD}")
        out = {}
        for pod in pods.items:
            conditions = pod.status.conditions or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            if ready and pod.metadata.deletion_timestamp is None and pod.status.pod_ip:
                out[pod.metadata.name] = pod.status.pod_ip
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            for name, ip in self.ready_pods().items():
                try:
                    status, text = _ask(ip, self.sample, timeout=20)
                except httpx.HTTPError:
                    self.answers.append(Answer(time.monotonic(), name, 0, "error"))
                    continue
                kind = _classify(text, self.sample) if status == 200 else "error"
                self.answers.append(Answer(time.monotonic(), name, status, kind))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=60)
            self.api.close()

    def served_adapter_since(self, pod: str, since: float) -> bool:
        return any(a.pod == pod and a.at >= since and a.kind == "adapter" for a in self.answers)


def test_pods_serve_the_adapter_with_the_operator_stopped(rollout_env, adapters, track, capsys):
    env, good = rollout_env, adapters["good-a"]
    sample = _sample(good)
    env.lorajob("restarts-a", good)
    target = managed_target()
    name = track(ad_manifest(AD, SERVED, lora_job="restarts-a", canary=1, smoke=2, target=target))
    status = env.wait_phase(name, "Ready", loaded=1, timeout=300)["status"]
    # What a pod that starts now should serve: written when the rollout completed, owned by the AdapterDeployment.
    configmap = wait_for("the preload ConfigMap", lambda: env.get("configmap", f"{MANAGED}-adapters"), timeout=30)
    assert json.loads(configmap["data"]["adapters.json"]) == {
        SERVED: {"uri": status["activeUri"], "digest": good.digest}
    }
    owner = configmap["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("AdapterDeployment", AD, True)
    first = next(n for n in env.runner.running() if n.startswith(MANAGED))
    timings: dict[str, float] = {}
    service = ServiceLike(env, sample)
    service.start()
    env.operator.kill(signal.SIGTERM)
    try:
        # (a) a deleted pod's replacement and (b) a scale-up, at once (two vLLM starts in parallel)
        started = time.monotonic()
        env.kubectl("delete", "pod", first, "-n", env.namespace, "--wait=false")
        env.kubectl("scale", "deployment", MANAGED, "-n", env.namespace, "--replicas=2")

        def two_new_pods_serving() -> list[str] | None:
            ready = service.ready_pods()
            new = [p for p in ready if p != first]
            for pod in new:
                if pod not in timings and service.served_adapter_since(pod, started):
                    timings[pod] = time.monotonic() - started
            return new if len(new) == 2 and all(p in timings for p in new) else None

        new_pods = wait_for("a replacement and a scaled-up pod serving the adapter", two_new_pods_serving, 400)
        # (c) a container restart (vLLM and the agent): out of Ready, then back and serving
        restarted = new_pods[0]
        started = time.monotonic()
        env.runner.restart(restarted, env.namespace, agent=True)
        wait_for("the restarted pod out of Ready", lambda: restarted not in service.ready_pods(), timeout=30)

        def serving_again() -> bool:
            return restarted in service.ready_pods() and service.served_adapter_since(restarted, started)

        wait_for("the restarted pod serving the adapter again", serving_again, timeout=420)
        timings[f"{restarted} (restart)"] = time.monotonic() - started
    finally:
        service.stop()
        env.operator.start()
    answers = service.answers
    wrong = [a for a in answers if a.status == 404 or a.kind in ("base", "other") or (a.status and a.status != 200)]
    errors = [a for a in answers if a.status == 0]
    with capsys.disabled():
        print(
            f"\nrestarts: seconds to Ready and serving (operator down) {json.dumps(timings)}; "
            f"answers={len(answers)} adapter={sum(a.kind == 'adapter' for a in answers)} "
            f"no-connection={len(errors)} wrong={len(wrong)}"
        )
    assert not wrong, f"a Ready pod answered something other than the adapter: {wrong[:5]}"
    assert sum(a.kind == "adapter" for a in answers) >= 3
