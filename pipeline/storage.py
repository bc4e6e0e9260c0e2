"""Local paths and pyarrow URIs (s3://, gs://, file://, ...) behind one small interface."""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Local paths become absolute (Ray and pyarrow need that); URIs pass through."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any pyarrow-supported URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write via a temporary name and rename, so a reader never sees half a file (where renames are atomic)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)
