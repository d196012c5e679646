"""A kubelet for kwok pods that runs their containers from local images with buildah (dev cluster only).

kwok plays the kubelets of the dev cluster's fake nodes: it gives pods IPs and walks them through
phases, but runs nothing. :class:`ImageKubelet` takes over the pods that a
:class:`kubelora.devenv.podrunner.PodRunner` in image mode claims, and plays a real kubelet for them:

- every container runs from its image in buildah's local store (``buildah from --pull=never`` then
  ``buildah run --isolation chroot``), with the command, args, env, user, working directory and
  volume mounts a kubelet would give it, and host networking (the pod IP from kwok is passed through
  ``status.podIP`` field refs; 127.x pod IPs can be bound);
- the pod's hostname and a managed /etc/hosts (:mod:`kubelora.devenv.kubelet.hosts`): its own IP under its
  hostname, its ``hostAliases``, and for a pod with ``spec.subdomain`` the names cluster DNS gives the endpoints
  of that headless Service (``<hostname>.<subdomain>[.<namespace>.svc.cluster.local]``), rewritten as they change;
- volumes: emptyDir, hostPath, secret, configMap, downwardAPI, projected (with ServiceAccount tokens
  from the TokenRequest API, bound to the pod), persistentVolumeClaim (the bound PV's ``hostPath`` or
  ``local`` path), and the default ServiceAccount projection at
  ``/var/run/secrets/kubernetes.io/serviceaccount``;
- status goes back through the pod's status subresource as a kubelet writes it: container states
  (waiting with ``CreateContainerConfigError``, ``ErrImageNeverPull``, ``CrashLoopBackOff``; running;
  terminated with the real exit code and termination message), restart counts, readiness from
  ``httpGet``/``tcpSocket`` probes, the Initialized/ContainersReady/Ready conditions and the phase;
- deletion, ``activeDeadlineSeconds`` and a runner-wide maximum per container run kill the container's
  process group (SIGTERM, then SIGKILL after the grace period, capped), remove the working container
  and the pod's emptyDirs.

The runner marks the pods it owns with the annotation :data:`OWNED_ANNOTATION`; the dev cluster's kwok
stages (``stages.yaml``) leave the status of such pods alone, except ``pod-create`` (the pod IP) and
``pod-delete``.

Deviations from a kubelet are listed in docs/standin-server.md ("The podrunner's image mode"). This is
a development tool: it runs images as root's buildah on the host, so use it only on the local dev
cluster.
"""

from kubelora.devenv.kubelet.api import ApiError, Kube
from kubelora.devenv.kubelet.containers import (
    FALLBACK_BYTES,
    FALLBACK_LINES,
    MAX_TERMINATION_MESSAGE,
    Container,
    Probe,
    parse_exit,
    termination_message,
)
from kubelora.devenv.kubelet.runner import ImageKubelet
from kubelora.devenv.kubelet.spec import (
    Lookup,
    StartError,
    config_error,
    container_command,
    container_env,
    container_user,
    expand,
    pod_field,
    quantity,
    resource_field,
    service_env,
)
from kubelora.devenv.kubelet.store import (
    CONTAINER_PREFIX,
    OUTPUT_PATH,
    Image,
    ImageStore,
    container_name,
    container_pids,
    find_executable,
    image_candidates,
    new_runner_token,
    release_runner_token,
    remove_leftovers,
    resolve_in_root,
    run_command,
)
from kubelora.devenv.kubelet.volumes import DEFAULT_SA_VOLUME, SERVICE_ACCOUNT_MOUNT, MountError, Token, Volume, Volumes
from kubelora.devenv.kubelet.worker import (
    DEFAULT_PATH,
    DEFAULT_TERMINATION_PATH,
    OWNED_ANNOTATION,
    KubeletConfig,
    PodWorker,
    now_rfc3339,
)

__all__ = [
    "CONTAINER_PREFIX",
    "DEFAULT_PATH",
    "DEFAULT_SA_VOLUME",
    "DEFAULT_TERMINATION_PATH",
    "FALLBACK_BYTES",
    "FALLBACK_LINES",
    "MAX_TERMINATION_MESSAGE",
    "OUTPUT_PATH",
    "OWNED_ANNOTATION",
    "SERVICE_ACCOUNT_MOUNT",
    "ApiError",
    "Container",
    "Image",
    "ImageKubelet",
    "ImageStore",
    "Kube",
    "KubeletConfig",
    "Lookup",
    "MountError",
    "PodWorker",
    "Probe",
    "StartError",
    "Token",
    "Volume",
    "Volumes",
    "config_error",
    "container_command",
    "container_env",
    "container_name",
    "container_pids",
    "container_user",
    "expand",
    "find_executable",
    "image_candidates",
    "new_runner_token",
    "now_rfc3339",
    "parse_exit",
    "pod_field",
    "quantity",
    "release_runner_token",
    "remove_leftovers",
    "resolve_in_root",
    "resource_field",
    "run_command",
    "service_env",
    "termination_message",
]
