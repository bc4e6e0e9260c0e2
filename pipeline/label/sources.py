"""What `imgjobs label` reads: image files found in directories, archives and manifests, local or by URI.

Every input image has a key, the `path` written to the output: an absolute local path, a URI, or
`ARCHIVE!MEMBER` for an archive member.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.images import image_error, is_hidden, is_image_name

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIX = ".zip"
MANIFEST_SUFFIX = ".txt"
MEMBER_SEPARATOR = "!"
MAX_MEMBER_BYTES = 256 * 2**20  # no photo comes near; a member this large is a mistake or a bomb
FAIL_FAST_AFTER = 3  # reads in a row failing after their retries, before the next ones get a single try
Item = tuple  # (key, bytes or None, error or None, error kind or None): what reading yields per input


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(ZIP_SUFFIX):
        return "zip"
    return "tar" if lower.endswith(TAR_SUFFIXES) else None


@dataclass
class Listing:
    files: list[str] = field(default_factory=list)  # keys of image files, each listed once
    archives: list[str] = field(default_factory=list)  # keys of archives, streamed by the read tasks
    roots: list[str] = field(default_factory=list)  # directory inputs (class-folder trees for --evaluate): key+query
    # A URI input's query string (its filesystem's options, e.g. an S3 endpoint) by host. Keys carry none, so the
    # output's paths stay clean; readers open a key with the options of its host.
    options: dict[str, str] = field(default_factory=dict)

    def add_file(self, key: str, seen: set[str]) -> None:
        if key not in seen:  # the same image named by two inputs is still labeled once
            seen.add(key)
            self.files.append(key)


def list_inputs(paths: list[str]) -> Listing:
    """Expand the command's inputs. Every path is checked before any listing starts."""
    resolved = []
    for path in paths:
        fs, fs_path = _resolve(path)
        info = _file_info(fs, fs_path, path)
        if info.type == pafs.FileType.NotFound:
            raise UsageError(f"input {path} not found")
        name = storage.split_query(path)[0]
        if info.type == pafs.FileType.File and not (
            is_image_name(name) or archive_kind(name) or name.lower().endswith(MANIFEST_SUFFIX)
        ):
            raise UsageError(
                f"input {path} is not an image, archive (.tar .tar.gz .tgz .zip), manifest (.txt) or directory"
            )
        resolved.append((path, fs, fs_path, info.type))
    listing, seen = Listing(), set()
    for path, fs, fs_path, kind in resolved:
        path, query = storage.split_query(path)
        prefix = _uri_prefix(path, fs_path)
        key = prefix + fs_path
        if query:
            listing.options[storage.host(key)] = query
        if kind == pafs.FileType.Directory:
            listing.roots.append(key + query)
            for found in storage.walk_images(fs, fs_path):
                listing.add_file(prefix + found, seen)
        elif archive_kind(path):
            if key not in seen:
                seen.add(key)
                listing.archives.append(key)
        elif path.lower().endswith(MANIFEST_SUFFIX):
            for line in _manifest_entries(fs, fs_path, path):
                entry, query = storage.split_query(line)
                if query:
                    listing.options[storage.host(entry)] = query
                if archive_kind(entry):
                    if entry not in seen:
                        seen.add(entry)
                        listing.archives.append(entry)
                else:
                    listing.add_file(entry, seen)
        else:
            listing.add_file(key, seen)
    return listing


def _manifest_entries(fs: pafs.FileSystem, fs_path: str, path: str) -> Iterator[str]:
    """Keys listed in a manifest; relative lines are relative to the manifest's folder. Lines are not checked
    for existence (a million stat calls on object storage would stall): a missing file gets an error row."""
    text = storage.read_bytes(fs, fs_path).decode("utf-8", errors="replace")
    base = (_uri_prefix(path, fs_path) + fs_path).rsplit("/", 1)[0]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if storage.is_uri(line):
            yield line
        elif storage.is_uri(base):
            yield f"{base}/{line}"
        else:
            yield os.path.normpath(os.path.join(base, os.path.expanduser(line)))


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return storage.resolve(path)
    except Exception as e:  # pyarrow raises for unknown schemes or unreachable stores
        raise UsageError(f"input {path} cannot be opened: {str(e).splitlines()[0]}") from None


def _file_info(fs: pafs.FileSystem, fs_path: str, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(fs_path)
    except Exception as e:
        raise UsageError(f"input {path} cannot be opened: {str(e).splitlines()[0]}") from None


def _uri_prefix(path: str, fs_path: str) -> str:
    """What goes in front of a filesystem path to make its key: nothing for local paths, `s3://`,
    `file://` or `hdfs://host:port` for URIs, so keys stay URIs that any reader can open."""
    if not storage.is_uri(path):
        return ""
    path = path.rstrip("/")
    return path[: len(path) - len(fs_path)] if path.endswith(fs_path) else path.split("://", 1)[0] + "://"


class Reader:
    """Reads keys' bytes; one filesystem object per URI host, because creating one can cost a network call.
    `options` are the hosts' query strings (Listing.options). Archive members over `max_member_bytes` get an
    error row without being read into memory."""

    def __init__(self, options: dict[str, str] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.options = options or {}
        self.max_member_bytes = max_member_bytes
        self._filesystems: dict[str, tuple[pafs.FileSystem, int]] = {}
        self._failing = 0  # reads in a row that failed after their retries
        self._archives: dict[str, object] = {}  # archive key -> member name -> bytes (read_key)

    def open(self, key: str):
        if not storage.is_uri(key):
            return open(key, "rb")
        fs, fs_path = self._resolve(key)
        return fs.open_input_file(fs_path)

    def read(self, key: str) -> bytes:
        """The key's bytes, retried while the storage fails transiently; once reads keep failing after their
        retries (a wrong endpoint, a dead mount), each gets one try, until one succeeds."""
        def read_all() -> bytes:
            with self.open(key) as f:
                return f.read()

        try:
            data = storage.retrying(read_all, tries=1 if self._failing >= FAIL_FAST_AFTER else storage.READ_TRIES)
        except OSError:
            self._failing += 1
            raise
        self._failing = 0
        return data

    def read_key(self, key: str) -> bytes:
        """The bytes of any key: a file, a URI, or a member of a .tar or .zip archive (ARCHIVE!MEMBER), read by
        itself. Each archive is opened once and indexed; compressed tars cannot be read member by member."""
        archive, member = split_member(key)
        if archive is None:
            return self.read(key)
        if archive not in self._archives:
            f = storage.retrying(lambda: self.open(archive))
            if archive_kind(archive) == "zip":
                self._archives[archive] = zipfile.ZipFile(f).read
            else:
                tar = tarfile.open(fileobj=f, mode="r:")  # random access: uncompressed tars only
                members = {m.name: m for m in tar.getmembers()}
                self._archives[archive] = lambda name: tar.extractfile(members[name]).read()
        try:
            return self._archives[archive](member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {archive}") from None

    def _resolve(self, key: str) -> tuple[pafs.FileSystem, str]:
        host = storage.host(key)
        if host not in self._filesystems:
            fs, fs_path = pafs.FileSystem.from_uri(key + self.options.get(host, ""))
            self._filesystems[host] = (fs, len(key) - len(fs_path))
        fs, prefix = self._filesystems[host]
        return fs, key[prefix:]

    def archive_members(self, key: str, done: set[str]) -> Iterator[Item]:
        """(member key, bytes, None, None) for each image member not in `done`, streamed without extracting to
        disk. A member that cannot be read gives (key, None, reason, kind); a broken archive ends with (archive
        key, None, reason, kind). Member names are only labels, so `../` or absolute names cannot write anywhere."""
        try:
            with storage.retrying(lambda: self.open(key)) as f:
                if archive_kind(key) == "zip":
                    yield from self._zip_members(key, f, done)
                else:
                    yield from self._tar_members(key, f, done)
        except Exception as e:
            if key not in done:
                yield key, None, f"unreadable archive: {image_error(e)}", error_kind(e)

    def _tar_members(self, key: str, f, done: set[str]):
        with tarfile.open(fileobj=f, mode="r|*") as tar:  # stream mode: one pass, no seeking, works on URIs
            for member in tar:
                member_key = f"{key}{MEMBER_SEPARATOR}{member.name}"
                if not member.isfile() or not _image_member(member.name) or member_key in done:
                    continue
                done.add(member_key)  # a tar may hold the same name twice; label it once
                if member.size > self.max_member_bytes:
                    yield self._too_large(member_key, member.size)
                else:
                    yield member_key, tar.extractfile(member).read(), None, None

    def _zip_members(self, key: str, f, done: set[str]):
        with zipfile.ZipFile(f) as archive:  # zip needs seeks: pyarrow's input files and local files have them
            for info in archive.infolist():
                member_key = f"{key}{MEMBER_SEPARATOR}{info.filename}"
                if info.is_dir() or not _image_member(info.filename) or member_key in done:
                    continue
                done.add(member_key)
                if info.file_size > self.max_member_bytes:  # as declared: zipfile never inflates past that
                    yield self._too_large(member_key, info.file_size)
                    continue
                try:
                    data = archive.read(info)
                except Exception as e:  # a bad member (CRC, encryption) does not spoil the others
                    yield member_key, None, image_error(e), error_kind(e)
                else:
                    yield member_key, data, None, None

    def _too_large(self, member_key: str, size: int) -> Item:
        return (member_key, None, f"archive member of {size / 2**20:.0f} MiB is over the "
                f"{self.max_member_bytes / 2**20:g} MiB cap (--max-member-mb)", "too_large")


def split_member(key: str) -> tuple[str | None, str]:
    """(archive, member) for an ARCHIVE!MEMBER key, (None, key) for others; either part may contain a '!'."""
    cut = key.find(MEMBER_SEPARATOR)
    while cut >= 0:
        if archive_kind(key[:cut]):
            return key[:cut], key[cut + 1:]
        cut = key.find(MEMBER_SEPARATOR, cut + 1)
    return None, key


def error_kind(error: BaseException) -> str:
    """`io` when the storage failed (a rerun tries again), `decode` when the bytes themselves are bad."""
    return "io" if isinstance(error, OSError) else "decode"


def _image_member(name: str) -> bool:
    return is_image_name(name) and not any(map(is_hidden, name.split("/")))
