"""Step 2, fetch: bring the base model and the datasets to local paths, verified.

The base model's ``config.json`` comes first (so the spec is checked against the model before any
weights move); then its safetensors weights and tokenizer files, in parallel. Pickled weights
(``*.bin``, ``*.pt``...) are never fetched, and Python files only with ``trustRemoteCode``.
``file://`` and ``pvc://`` are used in place.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kubelora.storage import Location, download_tree, local_path, parse_uri, store_for
from kubelora.trainer.errors import BaseModelNotFoundError, DatasetNotFoundError, StorageError, UnsafeWeightsError
from kubelora.trainer.report import kv

log = logging.getLogger(__name__)

UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")
META_FILES = ("config.json",)
TOKENIZER_HASHED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")


@dataclasses.dataclass
class BaseModelFiles:
    uri: str
    directory: Path
    config_sha256: str
    tokenizer_sha256: str | None = None
    fetched_bytes: int = 0


def _model_include(trust_remote_code: bool) -> Callable[[str], bool]:
    patterns = MODEL_FILES + (("*.py",) if trust_remote_code else ())

    def include(name: str) -> bool:
        if "/" in name:  # e.g. original/consolidated.00.pth: not what transformers loads
            return False
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    return include


def _hf_download(loc: Location, revision: str | None, patterns: tuple[str, ...]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise StorageError("hf:// needs huggingface_hub") from e
    try:
        return Path(snapshot_download(repo_id=loc.key, revision=revision, allow_patterns=list(patterns)))
    except Exception as e:
        raise BaseModelNotFoundError(f"{loc.uri}: {e}") from e


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_digest(directory: Path) -> str | None:
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_HASHED:
        p = directory / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest() if found else None


def base_model_dir(workdir: Path) -> Path:
    return workdir / "base-model"


def fetch_base_config(
    uri: str, workdir: Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[Path, str]:
    """(directory holding config.json, its sha256); with ``trust_remote_code`` also the model's ``*.py``,
    so the model can be built on the meta device before its weights are fetched."""
    loc = parse_uri(uri)
    if loc.is_local:
        directory = local_path(loc)
        if not (directory / "config.json").is_file():
            raise BaseModelNotFoundError(f"{uri}: no config.json at {directory}")
        return directory, _sha256(directory / "config.json")
    if loc.scheme == "hf":
        directory = _hf_download(loc, revision, META_FILES + (("*.py",) if trust_remote_code else ()))
        if not (directory / "config.json").is_file():
            raise BaseModelNotFoundError(f"{uri}: no config.json")
        return directory, _sha256(directory / "config.json")
    store = store_for(loc, "BASE_MODEL")
    cfg_loc = loc.child("config.json")
    st = store.stat(cfg_loc)
    if st is None:
        raise BaseModelNotFoundError(f"{uri}: no config.json under it")
    directory = base_model_dir(workdir)
    store.download(cfg_loc, directory / "config.json", size=st.size, etag=st.etag)
    if trust_remote_code:
        download_tree(loc, directory, role="BASE_MODEL", include=lambda n: "/" not in n and n.endswith(".py"))
    return directory, _sha256(directory / "config.json")


def fetch_base_model(
    uri: str, workdir: Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> BaseModelFiles:
    """Weights, tokenizer and config files of the base model, verified, in a local directory."""
    loc = parse_uri(uri)
    t0 = time.monotonic()
    fetched = 0
    if loc.is_local:
        directory = local_path(loc)
        if not directory.is_dir():
            raise BaseModelNotFoundError(f"{uri}: no such directory {directory}")
    elif loc.scheme == "hf":
        directory = _hf_download(loc, revision, MODEL_FILES + (("*.py",) if trust_remote_code else ()))
    else:
        directory = base_model_dir(workdir)
        names = [o.name for o in store_for(loc, "BASE_MODEL").list(loc)]
        if names and not any(n.endswith(".safetensors") for n in names):
            unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
            if unsafe:
                raise UnsafeWeightsError(f"{uri} has only pickled weights ({unsafe[0]}); only safetensors are loaded")
            raise BaseModelNotFoundError(f"{uri}: no *.safetensors weights under it")
        objs = download_tree(loc, directory, role="BASE_MODEL", include=_model_include(trust_remote_code))
        if not objs:
            raise BaseModelNotFoundError(f"{uri}: no model files under it")
        fetched = sum(o.size for o in objs)
        log.info(
            kv("Fetched base model", uri=uri, files=len(objs), bytes=fetched, seconds=round(time.monotonic() - t0, 2))
        )
    if not (directory / "config.json").is_file():
        raise BaseModelNotFoundError(f"{uri}: no config.json")
    return BaseModelFiles(
        uri=uri,
        directory=directory,
        config_sha256=_sha256(directory / "config.json"),
        tokenizer_sha256=_tokenizer_digest(directory),
        fetched_bytes=fetched,
    )


def fetch_dataset(uri: str, workdir: Path, role_name: str) -> Path:
    """One JSONL file, local (in place) or downloaded to ``workdir/data/<role_name>/``."""
    loc = parse_uri(uri)
    if loc.scheme == "hf":
        raise DatasetNotFoundError(f"{uri}: datasets are read from s3://, pvc:// or file://")
    if loc.is_local:
        path = local_path(loc)
        if not path.is_file():
            raise DatasetNotFoundError(f"{uri}: no such file ({path})")
        return path
    store = store_for(loc, "DATASET")
    st = store.stat(loc)
    if st is None:
        raise DatasetNotFoundError(f"{uri}: no such object")
    dest = workdir / "data" / role_name / (loc.name or "data.jsonl")
    store.download(loc, dest, size=st.size, etag=st.etag)
    return dest
