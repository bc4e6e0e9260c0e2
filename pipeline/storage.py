"""Local paths and pyarrow URIs (s3://, gs://, file://, ...) behind one small interface, and the one retry policy
for storage."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyarrow.fs as pafs
import tenacity

from pipeline.console import printable
from pipeline.errors import UsageError
from pipeline.images import is_hidden

T = TypeVar("T")
READ_TRIES = 4  # around pyarrow's own S3 retries (about 6 s), with waits of 0.5, 1 and 2 s: outages of 20 s or so
FAIL_FAST_AFTER = 3  # calls in a row failing after their retries, before the next ones get a single try
# Failures no wait cures. pyarrow raises a plain OSError for S3 errors, named in its message.
PERMANENT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
PERMANENT_MESSAGES = ("ACCESS_DENIED", "NO_SUCH_BUCKET", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Local paths become absolute (Ray and pyarrow need that); URIs pass through."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any pyarrow-supported URI. A URI's query string carries
    the filesystem's options (`s3://bucket/data?endpoint_override=host:port&scheme=http`); AWS_ENDPOINT_URL and
    AWS_ENDPOINT_URL_S3 in the environment work too."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def split_query(uri: str) -> tuple[str, str]:
    """("s3://bucket/path", "?endpoint_override=...") ; the query is "" when there is none."""
    path, sep, query = uri.partition("?")
    return path, sep + query


def join(base: str, *parts: str) -> str:
    """base/part/...; for a URI, before its query string, which must stay at the end."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    path, query = split_query(base)
    return "/".join([path.rstrip("/"), *parts]) + query


def host(uri: str) -> str:
    """scheme://bucket (or scheme://host:port): the part of a URI that one filesystem object serves."""
    scheme, rest = split_query(uri)[0].split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def refuse_credentials(uri: str, where: str) -> None:
    """A URI that carries credentials (`s3://KEY:SECRET@bucket/...`) raises a UsageError that shows it masked
    (`s3://***@bucket/...`). A URI travels into keys, Parquet files, summaries, console lines and Ray job metadata,
    so its secret would too. `where` names it for the user: `--input`, `manifest M line 3:`..."""
    path, query = split_query(uri)
    if "://" not in path:
        return
    scheme, rest = path.split("://", 1)
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
    elif ":" in authority and "@" in rest and not authority.rpartition(":")[2].isdigit():
        # Not a port: a secret holding an unescaped "/" (AWS secrets can) ended the authority early.
        userinfo = rest.rpartition("@")[0]
    else:
        return
    # A user name alone is a login (hdfs://user@namenode), except on S3, where pyarrow takes it as an access key.
    if ":" in userinfo or scheme.lower() == "s3":
        shown = f"{scheme}://***@{rest[len(userinfo) + 1:]}{query}"
        raise UsageError(f"{where} {shown} carries credentials, which would be copied into outputs, logs and job "
                         "metadata; remove them and give credentials by environment (AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) or a credentials file "
                         "(~/.aws/credentials)")


def resolve_keyed(path: str) -> tuple[pafs.FileSystem, str, str]:
    """resolve(), and what goes in front of a path in that filesystem to make its key (uri_prefix)."""
    fs, fs_path = resolve(path)
    return fs, fs_path, uri_prefix(split_query(path)[0], fs_path)


def uri_prefix(path: str, fs_path: str) -> str:
    """What goes in front of a filesystem path to make its key: nothing for local paths, `s3://`,
    `file://` or `hdfs://host:port` for URIs, so keys stay URIs that any reader can open."""
    if not is_uri(path):
        return ""
    path = path.rstrip("/")
    return path[: len(path) - len(fs_path)] if path.endswith(fs_path) else path.split("://", 1)[0] + "://"


class Retrying:
    """The retry policy of every storage call: a call is retried with exponential backoff while it fails
    transiently (an OSError that is not a missing file, a folder, or a refusal: is_permanent), and its last failure
    is raised. Once FAIL_FAST_AFTER calls in a row have failed after their retries (a wrong endpoint, a dead mount),
    each call gets a single try until one succeeds, so a job over a million unreadable keys does not wait out
    every key's backoff. One instance per reader: the count is that reader's."""

    def __init__(self, tries: int = READ_TRIES, sleep: Callable[[float], None] = time.sleep):
        self.tries, self.sleep = tries, sleep  # tests pass a sleep of their own
        self.failing = 0  # calls in a row that failed after their retries

    def __call__(self, call: Callable[[], T]) -> T:
        tries = 1 if self.failing >= FAIL_FAST_AFTER else self.tries
        policy = tenacity.Retrying(stop=tenacity.stop_after_attempt(tries), reraise=True,
                                   wait=tenacity.wait_exponential(multiplier=0.5),
                                   retry=tenacity.retry_if_exception(is_transient), sleep=self.sleep)
        try:
            result = policy(call)
        except OSError:
            self.failing += 1
            raise
        self.failing = 0
        return result


def retrying(call: Callable[[], T], tries: int = READ_TRIES) -> T:
    """call() under the retry policy, on its own (no failures in a row before it)."""
    return Retrying(tries)(call)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, OSError) and not is_permanent(error)


def is_permanent(error: OSError) -> bool:
    return isinstance(error, PERMANENT_ERRORS) or any(name in str(error) for name in PERMANENT_MESSAGES)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(read)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write via a temporary name and rename, so a reader never sees half a file (where renames are atomic)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def walk(fs: pafs.FileSystem, root: str, wanted: Callable[[str], bool]) -> Iterator[str]:
    """Files under `root` whose name is `wanted`, in sorted order, hidden names skipped. On object stores one
    recursive listing: about a thousand keys per request."""
    return (path for path, _ in _walk(fs, root, wanted))


def walk_sizes(fs: pafs.FileSystem, root: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, int]]:
    """As walk, with each file's size in bytes (from the same listing on object stores)."""
    for path, entry in _walk(fs, root, wanted):
        yield path, entry.size if isinstance(entry, pafs.FileInfo) else entry.stat().st_size


def _walk(fs: pafs.FileSystem, root: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, object]]:
    """(path, its FileInfo or os.DirEntry)."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local(root, wanted)
        return
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    prefix = len(root.rstrip("/")) + 1
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[prefix:]
        if info.type == pafs.FileType.File and wanted(rel) and not any(map(is_hidden, rel.split("/"))):
            yield info.path, info


def _walk_local(root: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, os.DirEntry]]:
    """os.scandir, much faster than a stat call per file on a million-file tree. Symlinked folders are not
    followed, so links cannot loop."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # an unreadable folder must not stop the listing, but it must not be silent
            print(printable(f"warning: cannot list {folder}: {e.strerror or e}"), file=sys.stderr)
            continue
        subdirs = []
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():  # their targets can be inputs themselves
                    subdirs.append(entry.path)
            elif wanted(entry.name):  # broken links stay in, and get an error row
                yield entry.path, entry
        stack.extend(reversed(subdirs))
