"""Step 7, publish: upload the adapter (peft layout), eval results and samples, then the manifest last.

Layout under the output URI::

    adapter_model.safetensors
    adapter_config.json
    eval/results.json          EvalResults (wire form) and details
    eval/samples.jsonl         prompt, expected, base and adapter outputs
    merged/...                 only with output.mergedModel
    kubelora-manifest.json     written last: identity, digests, hyperparameters, metrics, versions

Each file is uploaded and verified (stored size and ETag, and for the adapter, eval files and the
manifest a re-download compared by sha256) before the manifest is written; any old manifest is
removed first, so a reader never pairs an old manifest with new files. The adapter digest reported
is ``sha256:<hex of the manifest bytes>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import AdapterArtifact, dump
from kubelora.trainer.errors import PublishError, TrainerError
from kubelora.trainer.report import kv, now_iso
from kubelora.trainer.storage import Location, parse_uri, store_for

log = logging.getLogger(__name__)

MANIFEST = "kubelora-manifest.json"
MANIFEST_KIND = "AdapterManifest"
LIBRARIES = (
    "kubelora",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "tokenizers",
    "datasets",
    "minio",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def base_model_identity(uri: str) -> str:
    """``hf://org/name`` → ``org/name``; any other URI as given, without a trailing slash."""
    return uri[len("hf://") :].strip("/") if uri.startswith("hf://") else uri.rstrip("/")


@dataclasses.dataclass
class Staged:
    path: str  # relative to the output
    local: Path
    verify_download: bool = True


def stage(
    workdir: Path,
    adapter_dir: Path,
    base_identity: str,
    eval_doc: dict[str, Any] | None,
    samples: list[dict[str, Any]] | None,
    merged_dir: Path | None = None,
) -> list[Staged]:
    """Copy what will be published into ``workdir/publish``; the adapter config names the base identity."""
    out = workdir / "publish"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    files = []
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        src = adapter_dir / name
        if not src.is_file():
            raise PublishError(f"the trained adapter has no {name}")
        dst = out / name
        if name == "adapter_config.json":
            conf = json.loads(src.read_text())
            conf["base_model_name_or_path"] = base_identity
            dst.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src, dst)
        files.append(Staged(name, dst))
    if eval_doc is not None:
        (out / "eval").mkdir()
        (out / "eval" / "results.json").write_text(json.dumps(eval_doc, indent=2) + "\n")
        files.append(Staged("eval/results.json", out / "eval" / "results.json"))
        with (out / "eval" / "samples.jsonl").open("w") as f:
            for s in samples or []:
                f.write(json.dumps(s) + "\n")
        files.append(Staged("eval/samples.jsonl", out / "eval" / "samples.jsonl"))
    if merged_dir is not None:
        for p in sorted(merged_dir.rglob("*")):
            if p.is_file():
                files.append(Staged("merged/" + p.relative_to(merged_dir).as_posix(), p, verify_download=False))
    return files


def publish(
    output_uri: str,
    files: list[Staged],
    manifest_body: dict[str, Any],
    *,
    trainable_parameters: int,
    rank: int,
    base_identity: str,
    workdir: Path,
) -> AdapterArtifact:
    out: Location = parse_uri(output_uri)
    store = store_for(out, "OUTPUT")
    t0 = time.monotonic()
    try:
        if store.stat(out.child(MANIFEST)) is not None:
            store.delete(out.child(MANIFEST))
        entries: list[dict[str, Any]] = []
        for f in files:
            h = store.upload(f.local, out.child(f.path), verify_download=f.verify_download)
            entries.append({"path": f.path, "sizeBytes": h.size, "sha256": h.sha256.hexdigest()})
        manifest = {**manifest_body, "files": entries, "createdAt": now_iso()}
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        local = workdir / MANIFEST
        local.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        h = store.upload(local, out.child(MANIFEST), verify_download=True)
        if h.sha256.hexdigest() != digest:  # pragma: no cover - the file was just written
            raise PublishError("the manifest changed while it was uploaded")
    except TrainerError as e:
        raise PublishError(
            f"publishing to {output_uri} failed: {e.message}",
            reason=e.reason if e.reason in ("VerificationFailed",) else "PublishFailed",
        ) from e
    adapter_bytes = sum(e["sizeBytes"] for e in entries if not str(e["path"]).startswith(("eval/", "merged/")))
    log.info(
        kv(
            "Published adapter",
            uri=out.uri,
            digest=f"sha256:{digest}",
            files=len(entries) + 1,
            seconds=round(time.monotonic() - t0, 2),
        )
    )
    uri = out.uri if out.uri.endswith("/") else out.uri + "/"
    return AdapterArtifact(
        uri=uri,
        digest=f"sha256:{digest}",
        size_bytes=adapter_bytes,
        trainable_parameters=trainable_parameters,
        rank=rank,
        base_model=base_identity,
    )


def manifest_body(
    *,
    cfg: Any,
    base: Any,
    base_config: dict[str, Any],
    datasets: dict[str, Any],
    estimate: dict[str, Any] | None,
    outcome: Any,
    evaluation: Any,
    chat_template: str,
    precision: str,
    trainable_parameters: int,
) -> dict[str, Any]:
    spec = cfg.spec
    body: dict[str, Any] = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": MANIFEST_KIND,
        "job": {"name": cfg.job_name, "namespace": cfg.namespace},
        "baseModel": {
            "name": base_model_identity(spec.base_model.uri),
            "uri": spec.base_model.uri,
            "revision": spec.base_model.revision,
            "configSha256": base.config_sha256,
            "tokenizerSha256": base.tokenizer_sha256,
            "modelType": base_config.get("model_type"),
            "architectures": base_config.get("architectures"),
        },
        "adapter": {
            "format": "peft",
            "method": spec.method,
            "rank": spec.lora.rank,
            "alpha": spec.lora.alpha,
            "trainableParameters": trainable_parameters,
            "trainingPrecision": precision,
            "chatTemplate": chat_template,
        },
        "hyperparameters": cfg.hyperparameters(),
        "datasets": {k: v.digest() for k, v in datasets.items() if v is not None},
        "training": {
            "steps": outcome.global_step,
            "totalSteps": outcome.total_steps,
            "resumedFromStep": outcome.resumed_from_step,
            "trainLoss": outcome.train_loss,
            "evalLoss": outcome.eval_loss,
            "seconds": round(outcome.seconds, 3),
        },
        "estimate": estimate,
        "libraries": library_versions(),
    }
    if evaluation is not None:
        body["eval"] = dump(evaluation.results)
    return body
