"""The `kubelora` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="kubelora: LoRA fine-tuning on Kubernetes", no_args_is_help=True, add_completion=False)


@app.command()
def operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch only this namespace (repeatable)")
    ] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace")] = False,
    config: Annotated[Path | None, typer.Option(help="Operator config file (YAML)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port")] = None,
    health_port: Annotated[int | None, typer.Option(help="Serve /healthz on this port")] = None,
    peering: Annotated[str | None, typer.Option(help="kopf peering name: one active replica, others stand by")] = None,
    priority: Annotated[int | None, typer.Option(help="kopf peering priority (random when --peering is given)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the operator."""
    from kubelora.operator.main import run

    run(namespace or [], all_namespaces, config, metrics_port, health_port, peering, verbose, priority)


@app.command()
def estimate(
    manifest: Annotated[Path, typer.Argument(help="A LoRAJob manifest (YAML or JSON)")],
    model_config: Annotated[
        Path | None, typer.Option("--model-config", help="The base model's config.json, if not read from storage")
    ] = None,
    output_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Trainable parameters, memory per GPU, strategy, GPU-hours and cost for a LoRAJob, before running it.

    Exits 1 when the run does not fit its GPUs (the operator's preflight refuses it too), 2 on a bad manifest.
    """
    from kubelora.operator.estimates import estimate_manifest, refusal, render_estimate

    try:
        result = estimate_manifest(manifest, model_config)
    except (OSError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if output_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_estimate(result)
    refused = refusal(result)
    if refused:
        typer.echo(refused, err=True)
        raise typer.Exit(1)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "0.0.0.0",  # noqa: S104 - a server in a pod
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
    catalogue: Annotated[
        Path | None, typer.Option(help="The platform catalogue (YAML): base models, serving pools, storage")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig of the API's own identity; in a pod, its ServiceAccount")
    ] = None,
    audience: Annotated[
        str | None,
        typer.Option(help="The audience callers' tokens must be made for (else the catalogue's `audience`)"),
    ] = None,
) -> None:
    """Serve the OpenAI Files and Fine-tuning API over LoRAJobs (docs/self-service.md)."""
    from kubelora.selfservice.server import run

    run(host, port, catalogue, kubeconfig, audience)


if __name__ == "__main__":
    app()
