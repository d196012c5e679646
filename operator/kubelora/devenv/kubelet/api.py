"""The API server, through the kubernetes client's connection (auth and TLS from the kubeconfig)."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------------------
# The API server, through the kubernetes client's connection (auth and TLS from the kubeconfig)


class ApiError(Exception):
    def __init__(self, status: int, body: bytes | str) -> None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        self.status = status
        self.reason = str(data.get("reason") or "")
        self.message = str(data.get("message") or text[:500])
        super().__init__(f"{status} {self.reason}: {self.message}")


class Kube:
    """JSON requests to the API server over a ``kubernetes.client.ApiClient``'s connection."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        parsed = urllib.parse.urlparse(api_client.configuration.host)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params, _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError(response.status, data or b"")
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def ca_pem(self) -> bytes | None:
        """The CA bundle the kubeconfig trusts for the API server."""
        config = self.client.configuration
        if getattr(config, "ssl_ca_cert", None) and Path(config.ssl_ca_cert).is_file():
            return Path(config.ssl_ca_cert).read_bytes()
        return None
