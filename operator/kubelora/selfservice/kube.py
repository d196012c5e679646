"""Kubernetes access for the self-service API: who the caller is, what it may do, and the objects it sees.

The API acts with its own ServiceAccount (the chart's ``<release>-api`` ClusterRole). It never acts as the
caller: it authenticates the caller's bearer token with a TokenReview and authorizes every call with a
SubjectAccessReview in the caller's namespace, then reads and writes only in that namespace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

GROUP, VERSION = "kubelora.dev", "v1alpha1"
SA_PREFIX = "system:serviceaccount:"
#: How long a TokenReview answer is reused (a revoked token keeps working at most this long).
TOKEN_CACHE_SECONDS = 10.0


class ApiError(Exception):
    """An error in the OpenAI shape: HTTP status, type, message, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(what: str, name: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: {name}", param=param, code=f"{what.replace(' ', '_')}_not_found")


@dataclasses.dataclass(frozen=True)
class Caller:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: dict[str, list[str]]
    namespace: str


class Kube:
    """The API's own Kubernetes client, with the reviews it asks for and the objects it reads."""

    def __init__(self, kubeconfig: Path | None = None, audience: str | None = None) -> None:
        from kubernetes import client, config

        #: The audience callers' tokens must be issued for; None: any the API server accepts as its own.
        self.audience = audience or None

        if kubeconfig is not None:
            self.api: Any = config.new_client_from_config(config_file=str(kubeconfig))
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            self.api = client.ApiClient(configuration)
        self.core: Any = client.CoreV1Api(self.api)
        self.batch: Any = client.BatchV1Api(self.api)
        self.custom: Any = client.CustomObjectsApi(self.api)
        self.authn: Any = client.AuthenticationV1Api(self.api)
        self.authz: Any = client.AuthorizationV1Api(self.api)
        self._tokens: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------- auth

    def review_token(self, token: str) -> dict[str, Any]:
        """The TokenReview's user for ``token``; ApiError 401 when the API server does not accept it."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._tokens.get(key)
            if cached and cached[0] > now:
                return cached[1]
        spec: dict[str, Any] = {"token": token}
        if self.audience:
            spec["audiences"] = [self.audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        review = self.api.sanitize_for_serialization(self.authn.create_token_review(body))
        status = review.get("status") or {}
        if not status.get("authenticated"):
            hint = f" for audience {self.audience}" if self.audience else ""
            raise ApiError(
                401, f"Invalid token: the Kubernetes API server did not authenticate it{hint}",
                type_="invalid_request_error", code="invalid_api_key",
            )  # fmt: skip
        if self.audience and self.audience not in (status.get("audiences") or []):
            # An authenticator that ignores spec.audiences answers without them: not a token for this API.
            raise ApiError(
                401, f"Invalid token: it is not issued for audience {self.audience}", type_="invalid_request_error",
                code="invalid_api_key",
            )  # fmt: skip
        user = dict(status.get("user") or {})
        with self._lock:
            if len(self._tokens) > 4096:
                self._tokens.clear()
            self._tokens[key] = (now + TOKEN_CACHE_SECONDS, user)
        return user

    def caller(self, token: str, organization: str | None) -> Caller:
        user = self.review_token(token)
        username = str(user.get("username") or "")
        namespace = organization
        if not namespace and username.startswith(SA_PREFIX):
            namespace = username[len(SA_PREFIX) :].split(":", 1)[0]
        if not namespace:
            raise ApiError(
                400,
                "Cannot tell your namespace: a token that is not a ServiceAccount's needs the OpenAI-Organization "
                "header (the client's organization=) set to the namespace",
                code="namespace_required",
            )
        return Caller(
            username=username,
            uid=str(user.get("uid") or ""),
            groups=tuple(user.get("groups") or ()),
            extra={k: list(v) for k, v in (user.get("extra") or {}).items()},
            namespace=namespace,
        )

    def authorize(self, caller: Caller, verb: str, resource: str, group: str = GROUP) -> None:
        """SubjectAccessReview for ``verb resource`` in the caller's namespace; ApiError 403 when denied."""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": caller.username,
                "uid": caller.uid,
                "groups": list(caller.groups),
                "extra": caller.extra,
                "resourceAttributes": {
                    "namespace": caller.namespace,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                },
            },
        }
        review = self.api.sanitize_for_serialization(self.authz.create_subject_access_review(body))
        if not (review.get("status") or {}).get("allowed"):
            target = f"{resource}.{group}" if group else resource
            raise ApiError(
                403,
                f"{caller.username} may not {verb} {target} in namespace {caller.namespace}",
                type_="permission_error",
                code="forbidden",
            )

    # ---------------------------------------------------------------------------------------------------- objects

    def get_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        from kubelora.operator.preflight import read_secret

        return read_secret(self.core, namespace, name)

    def get_custom(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_custom(self, namespace: str, plural: str, selector: str | None = None) -> list[dict[str, Any]]:
        kwargs = {"label_selector": selector} if selector else {}
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, **kwargs)
        return list(out.get("items") or [])

    def create_custom(self, namespace: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body))

    def patch_custom(self, namespace: str, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, patch))

    def delete_custom(self, namespace: str, plural: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a batch/v1 Job and its pods (background); False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def events_for(self, namespace: str, name: str, uid: str | None) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={name}"
        if uid:
            selector += f",involvedObject.uid={uid}"
        events = self.core.list_namespaced_event(namespace, field_selector=selector)
        return [self.api.sanitize_for_serialization(e) for e in events.items]

    def pod_ip(self, namespace: str, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return str(pod.status.pod_ip) if pod.status and pod.status.pod_ip else None
