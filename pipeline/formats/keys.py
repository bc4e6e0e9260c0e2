"""Image keys and the one reader of them that both jobs use.

An input image's key is the `path` labeling writes and training reads back: an absolute local path, a URI, or
`ARCHIVE!MEMBER` for a member of a .tar or .zip archive.

Keys are UTF-8 text, so a name that is not valid UTF-8 (a Latin-1 `café.jpg` on disk, in an S3 key or in a tar) gets
an escaped key: each byte that is not part of valid UTF-8 is written `\\xNN` (`caf\\xe9.jpg`), the way Python's
`backslashreplace` and `ls -b` write it. Names that are valid UTF-8 keep their key unchanged, byte for byte. A local
key is read by its literal name first and by its unescaped name only when no such file exists. Zip names without
the UTF-8 flag decode as cp437, as the zip format says (zipfile's rule), so they are never escaped.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator, Set
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.formats import archives
from pipeline.formats.archives import Limits, Refused, StorageFailed, TooLarge, Unsupported
from pipeline.images import image_error, is_hidden, is_image_name

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIX = ".zip"
ARCHIVE_NAMES = "(.tar .tar.gz .tgz .tar.bz2 .tar.xz .zip)"  # for messages
MEMBER_SEPARATOR = "!"
ESCAPE = "\\x"
FILE_URI = "file://"  # keys of file:// inputs: the path follows, as listing wrote it


class Item(NamedTuple):
    """What reading yields per input: its bytes, or why not and the error_kind of that."""

    key: str
    data: bytes | None
    error: str | None = None
    kind: str | None = None


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(ZIP_SUFFIX):
        return "zip"
    return "tar" if lower.endswith(TAR_SUFFIXES) else None


def escape(name: str) -> str:
    """The key text of a name as Python's file APIs give it (undecodable bytes as surrogates, PEP 383)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPED = re.compile(r"\\x([89a-f][0-9a-f])")


def unescape(key: str) -> str:
    """The name an escaped key stands for, with its bytes as surrogates again (what open() and tarfile take)."""
    return _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), key)


class Keys:
    """Keys gathered into Arrow chunks, not kept as a Python string each: a listing may hold 10⁸ of them."""

    CHUNK = 1 << 16

    def __init__(self):
        self.chunks: list[pa.Array] = []
        self.buffer: list[str] = []

    def append(self, key: str) -> None:
        self.buffer.append(escape(key))
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
    """Reads keys' bytes within `limits` (pipeline.formats.archives.Limits); one filesystem object per URI host, because
    creating one can cost a network call. `options` are the hosts' query strings (Listing.options). Only regular
    files are read: a FIFO, a device or a link to one is refused without being opened in a way that can block."""

    def __init__(self, options: dict[str, str] | None = None, limits: Limits = Limits()):
        self.options = options or {}
        self.limits = limits
        self._filesystems: dict[str, tuple[pafs.FileSystem, int]] = {}
        self.retrying = storage.Retrying()  # this reader's failures in a row decide how hard it retries
        self._archives: dict[str, Callable[[str], bytes]] = {}  # archive key -> read a member by name (read_key)

    @classmethod
    def for_root(cls, root: str, limits: Limits = Limits()) -> Reader:
        """A reader of the keys under `root`, a path or a URI whose query string (an S3 endpoint) they lack."""
        path, query = storage.split_query(root)
        return cls({storage.host(path): query} if query else {}, limits)

    def open(self, key: str) -> BinaryIO:
        """The regular file `key` names, open for reading; a local key may be escaped (unescape)."""
        if key.startswith(FILE_URI):  # local too: checked as a local path is, not opened by pyarrow
            key = key[len(FILE_URI):]
        elif storage.is_uri(key):
            fs, fs_path = self._resolve(key)
            return fs.open_input_file(fs_path)
        path = key if os.path.lexists(key) or ESCAPE not in key else unescape(key)
        mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
        if not stat.S_ISREG(mode):
            raise Unsupported(f"not a regular file but {_file_type(mode)}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # swapped for a FIFO since: still no block
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Unsupported("not a regular file")
        return os.fdopen(fd, "rb")

    def read(self, key: str) -> bytes:
        """The file's bytes, up to the member cap, under the storage's retry policy (storage.Retrying)."""
        def read_all() -> bytes:
            with self.open(key) as f:
                data = f.read(self.limits.member_bytes + 1)  # a size that grew since, or a lying one, is caught too
            if len(data) > self.limits.member_bytes:
                raise TooLarge(archives.over_cap(len(data), self.limits, "file"))
            return data

        return self.retrying(read_all)

    def read_key(self, key: str) -> bytes:
        """The bytes of any key: a file, a URI, or a member of an archive (ARCHIVE!MEMBER), read by itself. A zip or
        an uncompressed tar is opened once and indexed (the first member of a name wins, as in archive_members); a
        compressed tar cannot be read member by member, so it is streamed up to the member, which suits a few reads
        (a grid of val images), not a training set (pipeline.train.shards)."""
        archive, member = self.split(key)
        if archive is None:
            return self.read(key)
        if archive not in self._archives:
            self._archives[archive] = self._member_reader(archive)
        return self._archives[archive](member)

    def split(self, key: str) -> tuple[str | None, str]:
        """split_member, where a local key's archive part must be a file: a folder named `x.zip!old` holds files."""
        if storage.is_uri(key):
            return split_member(key)
        for archive, member in _splits(key):
            if os.path.isfile(archive if os.path.lexists(archive) else unescape(archive)):
                return archive, member
        return None, key

    def _member_reader(self, archive: str) -> Callable[[str], bytes]:
        f = self.retrying(lambda: self.open(archive))  # held open while the archive's members are read
        index = archives.index(f, archive, self.limits)
        if index is None:
            f.close()
            return lambda member: self._streamed(archive, member)
        index = {escape(name): read for name, read in index.items()}

        def read_member(member: str) -> bytes:
            if member not in index:
                raise FileNotFoundError(f"{member} is not in {archive}")
            return index[member]()

        return read_member

    def _streamed(self, archive: str, member: str) -> bytes:
        key = f"{archive}{MEMBER_SEPARATOR}{member}"
        for item in self.archive_members(archive):
            if item.key == key:
                if item.error:
                    raise Refused(item.error)
                return item.data
        raise FileNotFoundError(f"{member} is not in {archive}")

    def _resolve(self, key: str) -> tuple[pafs.FileSystem, str]:
        host = storage.host(key)
        if host not in self._filesystems:
            fs, fs_path = pafs.FileSystem.from_uri(key + self.options.get(host, ""))
            self._filesystems[host] = (fs, len(key) - len(fs_path))
        fs, prefix = self._filesystems[host]
        return fs, key[prefix:]

    def archive_members(self, key: str, done: Set[str] = frozenset()) -> Iterator[Item]:
        """An Item for each image member not in `done`, streamed within the limits. A member that cannot be read
        gets its own error; an archive that breaks, or passes its budgets, ends with an Item of the archive's own
        key. Storage failures are `io` (a rerun retries them); bad bytes are `decode` or `too_large`."""
        try:
            f = self.retrying(lambda: self.open(key))
        except Exception as e:
            if key not in done:
                yield Item(key, None, f"unreadable archive: {reason(e)}", error_kind(e))
            return
        with f:
            try:
                for name, read in archives.members(f, key, self.limits):
                    member_key = f"{key}{MEMBER_SEPARATOR}{escape(name)}"
                    if _image_member(name) and member_key not in done:
                        yield _read_item(member_key, read)
            except Exception as e:
                if key not in done:
                    yield Item(key, None, f"unreadable archive: {reason(e)}", content_kind(e))


def _read_item(key: str, read: Callable[[], bytes]) -> Item:
    try:
        return Item(key, read(), None, None)
    except StorageFailed:
        raise  # the archive's stream is gone: its own row says so, and a rerun retries it
    except Exception as e:  # a bad member (a CRC, encryption, a cap) does not spoil the others
        return Item(key, None, reason(e), content_kind(e))


def content_kind(error: BaseException) -> str:
    """error_kind of a failure while decoding bytes or streaming an opened archive: only StorageFailed is the
    storage's; the decompressors and decoders raise OSError for bad bytes."""
    return "io" if isinstance(error, StorageFailed) else getattr(error, "kind", "decode")


def split_member(key: str) -> tuple[str | None, str]:
    """(archive, member) for an ARCHIVE!MEMBER key, (None, key) for others; either part may contain a '!'. By the
    key's text alone: Reader.split also asks the disk."""
    return next(_splits(key), (None, key))


def reason(error: BaseException) -> str:
    """The one-line error of a row: a refusal says it in its own words."""
    return str(error) if isinstance(error, Refused) else image_error(error)


def error_kind(error: BaseException) -> str:
    """The error's own kind where it has one (archives.Refused, images.ImageTooLarge), else `io` when the storage
    failed (a rerun tries again), `decode` when the bytes themselves are bad."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str):
        return kind
    return "io" if isinstance(error, OSError) else "decode"


def _splits(key: str) -> Iterator[tuple[str, str]]:
    """Each (archive, member) that split_member could make of `key`, shortest archive first."""
    cut = key.find(MEMBER_SEPARATOR)
    while cut >= 0:
        if archive_kind(key[:cut]):
            yield key[:cut], key[cut + 1:]
        cut = key.find(MEMBER_SEPARATOR, cut + 1)


def _file_type(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _image_member(name: str) -> bool:
    return is_image_name(name) and not any(map(is_hidden, name.split("/")))
