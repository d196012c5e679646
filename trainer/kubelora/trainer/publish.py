"""Step 7, publish: content-addressed, one directory per adapter digest, then a pointer to the newest.

Layout under the output URI::

    sha256/<hex>/adapter_model.safetensors
    sha256/<hex>/adapter_config.json
    sha256/<hex>/chat_template.jinja     the chat template training rendered rows with (serving must use it too)
    sha256/<hex>/eval/results.json       EvalResults (wire form) and details
    sha256/<hex>/eval/samples.jsonl      prompt, expected, base and adapter outputs
    sha256/<hex>/merged/...              only with output.mergedModel
    sha256/<hex>/kubelora-manifest.json  written last: identity, digests, hyperparameters, metrics, versions
    kubelora-latest.json                 the pointer (kind AdapterPointer): digest and uri of the newest adapter

The chat template is listed in the manifest's files and, with its sha256, as ``adapter.chatTemplateFile``, so
serving can render prompts exactly as training did (a vLLM server takes it as ``--chat-template``; the merged
model carries it in its tokenizer files).

``sha256:<hex>`` is the adapter digest, the sha256 of the manifest bytes. Every file's size and sha256 is
computed locally first, so the manifest (and so the digest) is known before anything is uploaded. Each file
is uploaded into the digest directory and verified (stored size and ETag, and for the adapter, the eval
files and the manifest a re-download compared by sha256); a file already stored with the same size and
MD5 is not sent again. The manifest is uploaded last, so a directory with a manifest is complete; only then
is the pointer rewritten. Earlier digest directories are never touched, and publishing the same content
again is idempotent: same bytes, same digest, same directory (the manifest holds no timestamp; the pointer
does). The eval documents carry no ``samplesUri``: it would name the digest directory, which depends on them;
the result event's ``eval.samplesUri`` does (:func:`samples_uri`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kubelora.api.v1alpha1 import API_VERSION, AdapterArtifact, dump
from kubelora.storage import (
    DIGEST_DIR,
    MANIFEST,
    POINTER,
    POINTER_KIND,
    Hashes,
    Location,
    Store,
    _single_part_md5,
    file_hashes,
    parse_uri,
    store_for,
)
from kubelora.trainer.errors import PublishError, TrainerError, VerificationError
from kubelora.trainer.report import kv, now_iso

log = logging.getLogger(__name__)

MANIFEST_KIND = "AdapterManifest"
CHAT_TEMPLATE = "chat_template.jinja"
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
    *,
    chat_template: Any = None,
) -> list[Staged]:
    """Copy what will be published into ``workdir/publish``; the adapter config names the base identity.

    ``chat_template`` is the template the rows were rendered with (the tokenizer's ``chat_template``; a dict of
    named templates publishes its ``default``): written as ``chat_template.jinja`` next to the adapter files.
    """
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
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    if isinstance(chat_template, str) and chat_template:
        (out / CHAT_TEMPLATE).write_text(chat_template)
        files.append(Staged(CHAT_TEMPLATE, out / CHAT_TEMPLATE))
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


def digest_location(out: Location, digest: str) -> Location:
    """``<output>/sha256/<hex>`` for ``sha256:<hex>``."""
    return out.child(DIGEST_DIR, digest.removeprefix("sha256:"))


def directory_uri(loc: Location) -> str:
    return loc.uri if loc.uri.endswith("/") else loc.uri + "/"


def samples_uri(artifact: AdapterArtifact) -> str:
    """Where the published eval samples are: inside the adapter's digest directory."""
    return directory_uri(parse_uri(artifact.uri)) + "eval/samples.jsonl"


def _stored_already(store: Store, loc: Location, local: Hashes) -> bool:
    """The object is there with this size and, by its single-part ETag, this MD5 (else: upload it)."""
    info = store.stat(loc)
    md5 = _single_part_md5(info.etag) if info is not None else None
    return info is not None and info.size == local.size and md5 == local.md5.hexdigest()


def _put(store: Store, local: Path, loc: Location, hashes: Hashes, *, verify_download: bool) -> None:
    """Upload ``local`` to ``loc`` unless it is stored already; verified either way."""
    if _stored_already(store, loc, hashes):
        if verify_download:
            with tempfile.TemporaryDirectory(prefix="kubelora-verify-") as d:
                store.download(loc, Path(d) / "blob", size=hashes.size, sha256=hashes.sha256.hexdigest())
        return
    stored = store.upload(local, loc, verify_download=verify_download)
    if stored.sha256.hexdigest() != hashes.sha256.hexdigest():
        raise VerificationError(f"{local} changed while it was published")


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
    # The manifest first, from local hashes: it names the directory everything goes into.
    hashes = {f.path: file_hashes(f.local) for f in files}
    entries: list[dict[str, Any]] = [
        {"path": f.path, "sizeBytes": hashes[f.path].size, "sha256": hashes[f.path].sha256.hexdigest()} for f in files
    ]
    manifest = {**manifest_body, "files": entries}
    template = next((e for e in entries if e["path"] == CHAT_TEMPLATE), None)
    if template is not None:
        about = manifest.get("adapter")
        manifest["adapter"] = {**(about if isinstance(about, dict) else {}), "chatTemplateFile": dict(template)}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    local_manifest = workdir / MANIFEST
    local_manifest.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    target = digest_location(out, digest)
    uri = directory_uri(target)
    try:
        for f in files:
            _put(store, f.local, target.child(f.path), hashes[f.path], verify_download=f.verify_download)
        _put(store, local_manifest, target.child(MANIFEST), file_hashes(local_manifest), verify_download=True)
        pointer = {
            "apiVersion": API_VERSION,
            "kind": POINTER_KIND,
            "digest": digest,
            "uri": uri,
            "job": manifest_body.get("job") or {"name": None, "namespace": None},
            "createdAt": now_iso(),
        }
        pointer_bytes = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
        store.put_bytes(out.child(POINTER), pointer_bytes)
        stored_pointer = store.get_bytes(out.child(POINTER))
        if stored_pointer is None:
            raise VerificationError(f"{out.child(POINTER).uri}: missing right after it was written")
        if stored_pointer != pointer_bytes:  # another run published to this output meanwhile: its pointer stands
            log.warning(kv("The pointer was rewritten meanwhile", uri=out.child(POINTER).uri, digest=digest))
    except TrainerError as e:
        raise PublishError(
            f"publishing to {uri} failed: {e.message}",
            reason=e.reason if e.reason in ("VerificationFailed",) else "PublishFailed",
        ) from e
    adapter_bytes = sum(e["sizeBytes"] for e in entries if not str(e["path"]).startswith(("eval/", "merged/")))
    log.info(
        kv(
            "Published adapter",
            uri=uri,
            digest=digest,
            files=len(entries) + 1,
            seconds=round(time.monotonic() - t0, 2),
        )
    )
    return AdapterArtifact(
        uri=uri,
        digest=digest,
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
            # strategy, nodes, processesPerNode, worldSize, globalBatchSize (config.Layout)
            **(cfg.run_layout.to_dict() if hasattr(cfg, "run_layout") else {}),
        },
        "estimate": estimate,
        "libraries": library_versions(),
    }
    if evaluation is not None:
        body["eval"] = dump(evaluation.results)
    return body
