"""Image keys and the one reader of them that both jobs use.

An input image's key is the `path` labeling writes and training reads back: an absolute local path, a URI, or
`ARCHIVE!MEMBER` for a member of a .tar or .zip archive.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.images import image_error, is_hidden, is_image_name

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIX = ".zip"
MEMBER_SEPARATOR = "!"
MAX_MEMBER_BYTES = 256 * 2**20  # no photo comes near; a member this large is a mistake or a bomb
Item = tuple  # (key, bytes or None, error or None, error kind or None): what reading yields per input


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(ZIP_SUFFIX):
        return "zip"
    return "tar" if lower.endswith(TAR_SUFFIXES) else None


class Keys:
    """Keys gathered into Arrow chunks, not kept as a Python string each: a listing may hold 10⁸ of them."""

    CHUNK = 1 << 16

    def __init__(self):
        self.chunks: list[pa.Array] = []
        self.buffer: list[str] = []

    def append(self, key: str) -> None:
        self.buffer.append(key)
        if len(self.buffer) == self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.chunks.append(pa.array(self.buffer, pa.large_string()))
            self.buffer = []

    def sorted_unique(self) -> pa.Array:
        """The keys, each once, in sorted order: the same inputs always give the same array."""
        self._flush()
        keys = pc.unique(pa.chunked_array(self.chunks, pa.large_string()))
        return keys.take(pc.sort_indices(keys))


class Reader:
    """Reads keys' bytes; one filesystem object per URI host, because creating one can cost a network call.
    `options` are the hosts' query strings (Listing.options). Archive members over `max_member_bytes` get an
    error row without being read into memory."""

    def __init__(self, options: dict[str, str] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.options = options or {}
        self.max_member_bytes = max_member_bytes
        self._filesystems: dict[str, tuple[pafs.FileSystem, int]] = {}
        self.retrying = storage.Retrying()  # this reader's failures in a row decide how hard it retries
        self._archives: dict[str, object] = {}  # archive key -> member name -> bytes (read_key)

    @classmethod
    def for_root(cls, root: str) -> Reader:
        """A reader of the keys under `root`, a path or a URI whose query string (an S3 endpoint) they lack."""
        path, query = storage.split_query(root)
        return cls({storage.host(path): query} if query else {})

    def open(self, key: str):
        if not storage.is_uri(key):
            return open(key, "rb")
        fs, fs_path = self._resolve(key)
        return fs.open_input_file(fs_path)

    def read(self, key: str) -> bytes:
        """The key's bytes, under the storage's retry policy (storage.Retrying)."""
        def read_all() -> bytes:
            with self.open(key) as f:
                return f.read()

        return self.retrying(read_all)

    def read_key(self, key: str) -> bytes:
        """The bytes of any key: a file, a URI, or a member of an archive (ARCHIVE!MEMBER), read by itself. A .zip
        or a .tar is opened once and indexed; a compressed tar cannot be read member by member, so it is streamed up
        to the member, which suits a few reads (a grid of val images), not a training set (pipeline.train.shards)."""
        archive, member = split_member(key)
        if archive is None:
            return self.read(key)
        if archive_kind(archive) == "tar" and not archive.lower().endswith(".tar"):
            found = next((data for name, data, _, _ in self.archive_members(archive, set()) if name == key), None)
            if found is None:
                raise FileNotFoundError(f"{member} is not in {archive}")
            return found
        if archive not in self._archives:
            f = self.retrying(lambda: self.open(archive))
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
            with self.retrying(lambda: self.open(key)) as f:
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
