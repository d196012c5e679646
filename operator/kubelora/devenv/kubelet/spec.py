"""Pure functions from a pod spec to what runs: env, command and user, as the kubelet computes them."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

from kubelora.devenv.kubelet.api import Kube

# ------------------------------------------------------------------------------------------------------------
# Env, command and user, as the kubelet computes them


class StartError(Exception):
    """A container cannot be started (yet); ``reason`` is its waiting reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def config_error(message: str) -> StartError:
    return StartError("CreateContainerConfigError", message)


def expand(text: str, mapping: Callable[[str], str | None]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined vars are replaced, ``$$`` is a literal ``$``, the rest stays."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    value = mapping(name)
                    out.append(value if value is not None else f"$({name})")
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def pod_field(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    match = _FIELD_KEY.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in items)
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or [] if i.get("ip")) or status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or [] if i.get("ip")) or status.get("podIP"),
    }
    if path not in simple:
        raise config_error(f'unsupported fieldPath: "{path}"')
    return str(simple[path] or "")


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity(text: str | int | float) -> float:
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"bad quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def resource_field(container: dict[str, Any], ref: dict[str, Any], node_allocatable: dict[str, str]) -> str:
    """resourceFieldRef: limits.* default to the node's allocatable, requests.* to 0 (as the kubelet)."""
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "limits":
        value = node_allocatable.get(name)
    if value is None:
        value = 0
    divisor = quantity(ref.get("divisor") or "1")
    number = quantity(value) / divisor
    return str(int(-(-number // 1)))  # ceiling, as the kubelet rounds up


@dataclasses.dataclass
class Lookup:
    """Secrets, ConfigMaps and the node, read from the API (one sync's worth of cache)."""

    kube: Kube
    namespace: str
    node: str | None = None
    _secrets: dict[str, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    _configmaps: dict[str, dict[str, str] | None] = dataclasses.field(default_factory=dict)
    _allocatable: dict[str, str] | None = None

    def secret(self, name: str) -> dict[str, str] | None:
        if name not in self._secrets:
            obj = self.kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
            self._secrets[name] = (
                None
                if obj is None
                else {
                    k: base64.b64decode(v).decode("utf-8", "surrogateescape")
                    for k, v in (obj.get("data") or {}).items()
                }
            )
        return self._secrets[name]

    def secret_bytes(self, name: str) -> dict[str, bytes] | None:
        data = self.secret(name)
        return None if data is None else {k: v.encode("utf-8", "surrogateescape") for k, v in data.items()}

    def configmap(self, name: str) -> dict[str, str] | None:
        if name not in self._configmaps:
            obj = self.kube.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
            if obj is None:
                self._configmaps[name] = None
            else:
                data = dict(obj.get("data") or {})
                for key, value in (obj.get("binaryData") or {}).items():
                    data[key] = base64.b64decode(value).decode("utf-8", "surrogateescape")
                self._configmaps[name] = data
        return self._configmaps[name]

    def configmap_bytes(self, name: str) -> dict[str, bytes] | None:
        data = self.configmap(name)
        return None if data is None else {k: v.encode("utf-8", "surrogateescape") for k, v in data.items()}

    def allocatable(self) -> dict[str, str]:
        if self._allocatable is None:
            node = self.kube.get(f"/api/v1/nodes/{self.node}") if self.node else None
            self._allocatable = dict(((node or {}).get("status") or {}).get("allocatable") or {})
        return self._allocatable


def service_env(host: str, port: int) -> dict[str, str]:
    """The ``kubernetes`` Service's variables, pointing at the API server's real address."""
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": str(port),
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }


def container_env(
    pod: dict[str, Any], container: dict[str, Any], lookup: Lookup, services: dict[str, str]
) -> dict[str, str]:
    """The kubelet's makeEnvironmentVariables: envFrom, then env (expanded, with valueFrom), then services."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, getter in (("configMapRef", lookup.configmap), ("secretRef", lookup.secret)):
            ref = source.get(kind)
            if not ref:
                continue
            data = getter(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise config_error(f'{"configmap" if kind == "configMapRef" else "secret"} "{ref["name"]}" not found')
            for key, value in data.items():
                if "=" not in key:
                    env[prefix + key] = value

    def mapping(name: str) -> str | None:
        return env.get(name, services.get(name))

    for item in container.get("env") or []:
        name = item["name"]
        source = item.get("valueFrom")
        if not source:
            env[name] = expand(str(item.get("value") or ""), mapping)
            continue
        if source.get("fieldRef"):
            env[name] = pod_field(pod, source["fieldRef"]["fieldPath"])
        elif source.get("resourceFieldRef"):
            env[name] = resource_field(container, source["resourceFieldRef"], lookup.allocatable())
        elif source.get("configMapKeyRef") or source.get("secretKeyRef"):
            is_secret = bool(source.get("secretKeyRef"))
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
            kind = "Secret" if is_secret else "ConfigMap"
            data = lookup.secret(ref["name"]) if is_secret else lookup.configmap(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise config_error(f'{kind.lower()} "{ref["name"]}" not found')
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise config_error(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
            env[name] = data[ref["key"]]
        else:
            raise config_error(f"unsupported valueFrom for env {name}")
    for key, value in services.items():
        env.setdefault(key, value)
    return env


def container_command(container: dict[str, Any], image_config: dict[str, Any], env: dict[str, str]) -> list[str]:
    """command replaces the image's ENTRYPOINT, args replace its CMD; ``$(VAR)`` expands from the env."""
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command:
        argv = command + args
    else:
        argv = list(image_config.get("Entrypoint") or []) + (args or list(image_config.get("Cmd") or []))
    return [expand(str(a), env.get) for a in argv]


def _security(pod: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    value = (container.get("securityContext") or {}).get(field)
    if value is None:
        value = (pod["spec"].get("securityContext") or {}).get(field)
    return value


def container_user(pod: dict[str, Any], container: dict[str, Any], image_config: dict[str, Any]) -> str:
    """runAsUser/runAsGroup (container over pod) else the image's USER; checks runAsNonRoot like the kubelet."""
    image_user = str(image_config.get("User") or "")
    image_uid, _, image_gid = image_user.partition(":")
    uid = _security(pod, container, "runAsUser")
    gid = _security(pod, container, "runAsGroup")
    user = str(uid) if uid is not None else image_uid
    group = str(gid) if gid is not None else (image_gid if uid is None else "")
    if _security(pod, container, "runAsNonRoot"):
        meta = pod["metadata"]
        where = f'(pod: "{meta["name"]}_{meta["namespace"]}({meta["uid"]})", container: {container["name"]})'
        if user and not user.isdigit():
            raise config_error(
                f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root "
                + where
            )
        if not user or int(user) == 0:
            raise config_error(f"container has runAsNonRoot and image will run as root {where}")
    if not user:
        user = "0"
    return f"{user}:{group}" if group else user
