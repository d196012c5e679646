"""Uploads to ``POST /v1/files``: the multipart body spooled to disk, its file part checked row by row with the
trainer's own checks, and sent on by offset (never held in memory)."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import BinaryIO

from kubelora.selfservice.kube import ApiError

#: Room for the multipart framing around the file part of an upload.
MULTIPART_SLACK = 64 * 1024


def boundary(content_type: str) -> str:
    """The boundary of a multipart/form-data Content-Type; ApiError 400 for any other body."""
    boundary = None
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not content_type.lower().startswith("multipart/form-data") or not boundary:
        raise ApiError(400, "Expected a multipart/form-data upload", code="invalid_upload")
    return boundary


def parse_multipart(body: Path, content_type: str) -> tuple[dict[str, str], tuple[str, int, int] | None]:
    """Fields and the ``file`` part (filename, start, end offsets in ``body``) of a multipart/form-data body."""
    delimiter = b"--" + boundary(content_type).encode()
    fields: dict[str, str] = {}
    file_part: tuple[str, int, int] | None = None
    if body.stat().st_size == 0:
        raise ApiError(400, "Empty upload", code="invalid_upload")
    with body.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = data.find(delimiter)
        while pos >= 0:
            start = pos + len(delimiter)
            if data[start : start + 2] == b"--":
                break
            header_end = data.find(b"\r\n\r\n", start)
            if header_end < 0:
                break
            headers = data[start:header_end].decode("utf-8", "replace")
            content_start = header_end + 4
            next_pos = data.find(b"\r\n" + delimiter, content_start)
            if next_pos < 0:
                raise ApiError(400, "Truncated multipart upload", code="invalid_upload")
            name = filename = None
            for line in headers.split("\r\n"):
                if line.lower().startswith("content-disposition:"):
                    for item in line.split(";")[1:]:
                        k, _, v = item.strip().partition("=")
                        if k == "name":
                            name = v.strip('"')
                        elif k == "filename":
                            filename = v.strip('"')
            if name == "file":
                file_part = (filename or "upload.jsonl", content_start, next_pos)
            elif name:
                if next_pos - content_start > MULTIPART_SLACK:
                    raise ApiError(400, f"The form field {name} is too long", param=name, code="invalid_upload")
                fields[name] = data[content_start:next_pos].decode("utf-8", "replace")
            pos = next_pos + 2
    return fields, file_part


def validate_upload(path: Path, filename: str, fmt: str, start: int = 0, end: int | None = None) -> int:
    """The trainer's own row checks, row by row, on bytes [start, end) of ``path``; the number of rows.
    ApiError 400 naming file and line of the first bad row."""
    from kubelora.trainer.data import validate_jsonl
    from kubelora.trainer.errors import MalformedDatasetError

    try:
        return validate_jsonl(path, fmt, name=filename, start=start, end=end)
    except MalformedDatasetError as exc:
        raise ApiError(400, f"Invalid training file: {exc}", param="file", code="invalid_file_format") from None


class FileRange:
    """Bytes [start, end) of an open file as a readable stream (the file part of an upload, for put_object)."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        f.seek(start)
        self.f = f
        self.remaining = end - start

    def read(self, size: int | None = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        n = self.remaining if size is None or size < 0 else min(size, self.remaining)
        chunk = self.f.read(n)
        self.remaining -= len(chunk)
        return chunk


def too_large(limit: int, what: str = "The request body", param: str | None = None, code: str = "") -> ApiError:
    return ApiError(413, f"{what} is larger than the limit of {limit} bytes", param=param, code=code or None)
