"""The platform catalogue: base models, serving pools and the per-namespace storage convention.

A YAML document, mounted by the chart from the ConfigMap ``<release>-api-catalogue``::

    storageSecret: kubelora-api-storage    # the Secret in each tenant namespace: accessKey, secretKey, endpoint,
                                           # bucket and (optional) prefix; also the LoRAJobs' S3 secretRef
    maxFileBytes: 536870912                # upload size limit
    audience: kubelora-api                 # optional: the audience callers' tokens must be issued for
                                           # (TokenReview spec.audiences); unset: tokens for the API server
    allowedStorageEndpoints: [minio.storage:9000]  # optional: the S3 endpoints a storage Secret may name
                                           # (host[:port]); empty: any
    models:
      llama-3.1-8b:
        uri: s3://models/llama-3.1-8b/     # spec.baseModel.uri
        secretName: models-readonly        # optional: the base model's Secret in the tenant namespace
        gpus: 1
        gpuType: NVIDIA-A100-SXM4-80GB
        training: {...}                    # optional spec.training defaults (wire form)
        lora: {...}                        # optional spec.lora defaults
        eval: {...}                        # optional spec.eval defaults (metrics, labels, maxNewTokens, gates)
        retries: 2
    servingPools:
      support-pool:
        target: {...}                      # an AdapterDeployment spec.target (wire form)
        rollout: {...}                     # optional spec.rollout
        endpoint: http://vllm.serving:8000 # optional: where chat completions for this pool go
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubelora.api.v1alpha1 import ServingTarget

DEFAULT_STORAGE_SECRET = "kubelora-api-storage"  # noqa: S105 - a Secret name
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024
#: An AdapterDeployment's spec.servedName (kubelora.api.v1alpha1); a served name is ``ft/<model>/<suffix>-<id>``.
SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
SERVED_NAME_MAX = 128


def endpoint_host(endpoint: str) -> str:
    """What the S3 client connects to for ``endpoint`` (``host:port`` or a URL; as kubelora.storage.make_client
    reads it), lower-cased, for comparing endpoints. Nothing is stripped: ``user@host`` is not ``host``."""
    return (urlparse(endpoint).netloc if "://" in endpoint else endpoint).lower()


class _Entry(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class CatalogueModel(_Entry):
    uri: str
    secret_name: str | None = None
    gpus: int = 1
    gpu_type: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    retries: int | None = None
    active_deadline_seconds: int | None = None


class ServingPool(_Entry):
    target: dict[str, Any]
    rollout: dict[str, Any] = Field(default_factory=dict)
    endpoint: str | None = None

    def validated_target(self) -> ServingTarget:
        return ServingTarget.model_validate(self.target)


class Catalogue(_Entry):
    storage_secret: str = DEFAULT_STORAGE_SECRET
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, ge=1)
    #: The audience callers' tokens must carry (TokenReview spec.audiences); None: the API server's own.
    audience: str | None = None
    #: The S3 endpoints (host[:port]) a tenant storage Secret may name; empty: any.
    allowed_storage_endpoints: list[str] = Field(default_factory=list)
    models: dict[str, CatalogueModel] = Field(default_factory=dict)
    serving_pools: dict[str, ServingPool] = Field(default_factory=dict)

    def storage_endpoint_allowed(self, endpoint: str) -> bool:
        if not self.allowed_storage_endpoints:
            return True
        return endpoint_host(endpoint) in {endpoint_host(e) for e in self.allowed_storage_endpoints}


def load(path: Path | None) -> Catalogue:
    """The catalogue at ``path`` (an empty one without a path); ValueError names what is wrong."""
    if path is None:
        return Catalogue()
    data = yaml.safe_load(path.read_text()) or {}
    catalogue = Catalogue.model_validate(data)
    for name in catalogue.models:
        if not SERVED_NAME.match(name) or len(name) > 64:
            raise ValueError(
                f"models.{name}: a model name is part of served names: at most 64 of A-Z a-z 0-9 . _ / -, "
                "starting with a letter or digit"
            )
    for name, pool in catalogue.serving_pools.items():
        try:
            pool.validated_target()
        except ValueError as exc:
            raise ValueError(f"servingPools.{name}.target: {exc}") from exc
    return catalogue
