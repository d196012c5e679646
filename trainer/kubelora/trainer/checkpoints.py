"""Checkpoints in the output location, under ``checkpoints/checkpoint-<step>/``.

Every file is uploaded (and verified) first; the marker object ``COMPLETE`` (JSON: step,
fingerprint, every file's size and sha256) is written last, so only checkpoints with a marker count.
On start the trainer resumes from the newest complete checkpoint whose fingerprint (hyperparameters,
base model config and dataset digests) matches this run; checkpoints of another spec are removed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from kubelora.storage import Location, parse_uri, sha256_file, store_for, upload_tree
from kubelora.trainer.errors import VerificationError
from kubelora.trainer.report import kv, now_iso

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointStore:
    def __init__(self, output_uri: str, fingerprint: str, keep: int = 2) -> None:
        self.loc: Location = parse_uri(output_uri).child("checkpoints")
        self.store = store_for(self.loc, "OUTPUT")
        self.fingerprint = fingerprint
        self.keep = keep

    def uri(self, step: int) -> str:
        return self.loc.child(f"checkpoint-{step}").uri + "/"

    def complete(self) -> list[tuple[int, dict[str, Any]]]:
        """Complete checkpoints, oldest first, as (step, marker)."""
        steps = set()
        for obj in self.store.list(self.loc):
            parts = obj.name.split("/")
            if len(parts) == 2 and parts[1] == MARKER and (m := _DIR.match(parts[0])):
                steps.add(int(m.group(1)))
        out = []
        for step in sorted(steps):
            raw = self.store.get_bytes(self.loc.child(f"checkpoint-{step}", MARKER))
            try:
                marker = json.loads(raw or b"")
            except json.JSONDecodeError:
                log.warning(kv("Ignoring checkpoint with an unreadable marker", step=step))
                continue
            out.append((step, marker))
        return out

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest complete checkpoint of this run's fingerprint; others are deleted."""
        found = self.complete()
        foreign = [s for s, m in found if m.get("fingerprint") != self.fingerprint]
        if foreign:
            log.warning(kv("Removing checkpoints of a different spec", steps=foreign, uri=self.loc.uri))
            for s in foreign:
                self.delete(s)
        mine = [(s, m) for s, m in found if m.get("fingerprint") == self.fingerprint]
        return mine[-1] if mine else None

    def upload(self, local_dir: Path, step: int) -> str:
        target = self.loc.child(f"checkpoint-{step}")
        names = upload_tree(local_dir, target, role="OUTPUT")
        files = [
            {"name": n, "size": (local_dir / n).stat().st_size, "sha256": sha256_file(local_dir / n)} for n in names
        ]
        marker = {"step": step, "fingerprint": self.fingerprint, "files": files, "createdAt": now_iso()}
        self.store.put_bytes(target.child(MARKER), json.dumps(marker, indent=1).encode())
        self.prune()
        return self.uri(step)

    def download(self, step: int, marker: dict[str, Any], dest: Path) -> Path:
        """Fetch a checkpoint, checking every file against the marker's sha256 and size."""
        if dest.exists():
            shutil.rmtree(dest)
        src = self.loc.child(f"checkpoint-{step}")
        for f in marker.get("files", []):
            self.store.download(src.child(f["name"]), dest / f["name"], size=f["size"], sha256=f["sha256"])
        if not marker.get("files"):
            raise VerificationError(f"{self.uri(step)}: the marker lists no files")
        return dest

    def delete(self, step: int) -> None:
        d = self.loc.child(f"checkpoint-{step}")
        # marker first, so a half-deleted checkpoint is never taken for a complete one
        if self.store.stat(d.child(MARKER)) is not None:
            self.store.put_bytes(d.child(MARKER), b"")  # unreadable marker: ignored if the delete below fails
        self.store.delete_prefix(d)

    def prune(self) -> None:
        found = self.complete()
        for step, _ in found[: max(0, len(found) - self.keep)]:
            self.delete(step)
