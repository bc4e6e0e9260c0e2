"""Archive members, streamed within limits: whatever a header declares, a member costs a read task at most
`Limits.member_bytes` plus a constant, and an archive at most `Limits.archive_bytes` inflated and
`Limits.archive_members` members. An archive is opened by its magic bytes, not its name, everywhere (labeling,
`Reader.read_key`, training), so a `.tar` that is really bzip2 streams like any other.

No member is ever extracted to disk: names are only labels, so `../` or absolute names write nowhere.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

MiB = 2**20
CHUNK = 64 * 1024  # compressed bytes fed to an inflater at a time: its output is capped anyway
RATIO_AFTER = MiB  # a zip member's compression ratio is judged once this much of it is inflated


@dataclass(frozen=True)
class Limits:
    """What one input may cost a read task, in labeling and training alike."""

    member_bytes: int = 256 * MiB  # a file or an archive member: no photo comes near
    archive_bytes: int = 64 * 2**30  # inflated per archive
    archive_members: int = 10**6
    max_ratio: float = 100.0  # a zip member inflating past this ratio is a bomb, not a photo


class Refused(Exception):
    """An input the job will not read: it gets an error row of this kind, which no rerun retries."""

    kind = "decode"


class TooLarge(Refused):
    kind = "too_large"


class Unsupported(Refused):
    kind = "unsupported"


class StorageFailed(OSError):
    """The storage failed while an archive streamed (a rerun retries it), as opposed to bytes that are bad."""


Member = tuple[str, Callable[[], bytes]]  # (name as stored, normalised; read its bytes within the limits)


def members(f: BinaryIO, name: str, limits: Limits) -> Iterator[Member]:
    """The regular-file members of the archive open as `f` (seekable), each name once: the first of a name wins,
    as tar and unzip extract it. Raises Refused (bad or over-budget bytes) or StorageFailed (the storage)."""
    f = _Tagged(f)
    kind = sniff(f, name)
    stream = _zip_members(f, limits) if kind == "zip" else _tar_members(f, kind, limits)
    seen = set()  # a digest per name, not the name: at most limits.archive_members of them
    for member_name, read in stream:
        digest = hashlib.blake2b(member_name.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            yield member_name, read


def index(f: BinaryIO, name: str, limits: Limits) -> dict[str, Callable[[], bytes]] | None:
    """Each member's reader by its name (the first of a name wins), for reading members one by one from a seekable
    `f`; None for a compressed tar, which can only be streamed."""
    f = _Tagged(f)
    kind = sniff(f, name)
    if kind == "zip":
        return dict(members(f, name, limits))
    if kind != "tar":
        return None
    tar = tarfile.open(fileobj=f, mode="r:")  # random access: each read seeks to its member
    found = {}
    for count, member in enumerate(tar, 1):
        if count > limits.archive_members:
            raise TooLarge(f"archive holds over {limits.archive_members} members (--max-archive-members)")
        if member.isfile():
            found.setdefault(normalise(member.name), functools.partial(_read_tar_member, tar, member, limits))
    return found


COMPRESSION = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "zstd", b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!\x1a\x07": "rar"}


def sniff(f: BinaryIO, name: str) -> str:
    """'zip', 'tar', or 'tar.gz', 'tar.bz2', 'tar.xz' from the first bytes of `f`, which is left at its start. Only
    an old tar without the ustar magic is taken by its name."""
    head = f.read(512)
    f.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "zip"
    for magic, compression in COMPRESSION.items():
        if head.startswith(magic):
            return f"tar.{compression}"
    for magic, format_name in UNSUPPORTED.items():
        if head.startswith(magic):
            raise Unsupported(f"a {format_name} archive: only tar (plain, gzip, bzip2, xz) and zip are read")
    if head[257:262] == b"ustar" or name.lower().endswith(".tar"):
        return "tar"
    raise Refused("not a tar or zip archive, whatever its name says")


def normalise(name: str) -> str:
    """`./ants/x.jpg`, as `tar -C DIR .` stores it, is `ants/x.jpg`."""
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    return name


def _tar_members(f: BinaryIO, kind: str, limits: Limits) -> Iterator[Member]:
    inflated = _Budget(_DECOMPRESSORS[kind](f) if kind != "tar" else f, limits)
    # Stream mode ("r|"): one pass, no seeking. The decompressors above read their input in small blocks, so that
    # skipping a member takes time linear in its size (tarfile's own compressed stream copies its buffer at every
    # step of a skip).
    with tarfile.open(fileobj=inflated, mode="r|") as tar:
        for count, member in enumerate(tar, 1):
            tar.members = []  # tarfile keeps every header it reads: memory would grow with the members
            if count > limits.archive_members:
                raise TooLarge(f"archive holds over {limits.archive_members} members (--max-archive-members); "
                               "the rest is not read")
            if member.isfile():
                yield normalise(member.name), functools.partial(_read_tar_member, tar, member, limits)


_DECOMPRESSORS = {"tar.gz": lambda f: gzip.GzipFile(fileobj=f), "tar.bz2": bz2.BZ2File, "tar.xz": lzma.LZMAFile}


def _read_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limits: Limits) -> bytes:
    # A tar member's size is its true size in the stream: a header that lies breaks the stream, not the cap.
    if member.size > limits.member_bytes:
        raise TooLarge(over_cap(member.size, limits))
    return tar.extractfile(member).read()


def _zip_members(f: BinaryIO, limits: Limits) -> Iterator[Member]:
    # zipfile holds the central directory, about 500 bytes a member, at most limits.archive_members of them.
    with zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
        if len(infos) > limits.archive_members:
            raise TooLarge(f"archive holds {len(infos)} members, over {limits.archive_members} "
                           "(--max-archive-members)")
        budget = [limits.archive_bytes]
        for info in infos:
            if not info.is_dir():
                yield normalise(info.filename), functools.partial(_inflate_zip_member, f, info, limits, budget)


def _inflate_zip_member(f: BinaryIO, info: zipfile.ZipInfo, limits: Limits, budget: list[int]) -> bytes:
    """The member's bytes, inflated in chunks up to the cap plus one byte, whatever its header declares (zipfile's
    own bzip2 and lzma readers inflate a whole compressed block at once), CRC checked."""
    cap = min(limits.member_bytes, budget[0])
    if info.flag_bits & 0x1:
        raise Refused("an encrypted archive member")
    if info.file_size > cap:
        raise TooLarge(over_cap(info.file_size, limits) if cap == limits.member_bytes else over_budget(limits))
    f.seek(info.header_offset)
    header = f.read(zipfile.sizeFileHeader)
    if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
        raise Refused("a bad local header in the archive")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + zipfile.sizeFileHeader + name_length + extra_length)
    left = info.compress_size
    inflate, left = _inflater(info.compress_type, f, left)
    out, crc = bytearray(), 0
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise Refused("the archive ends inside a member")
        left -= len(chunk)
        data = inflate(chunk, cap + 1 - len(out))
        out += data
        crc = zlib.crc32(data, crc)
        if len(out) > cap:
            budget[0] -= len(out)
            raise TooLarge(f"archive member inflates past the {limits.member_bytes / MiB:g} MiB cap (--max-member-mb)"
                           if cap == limits.member_bytes else over_budget(limits))
        consumed = info.compress_size - left
        if len(out) > RATIO_AFTER and len(out) > limits.max_ratio * consumed:
            raise TooLarge(f"archive member inflates over {limits.max_ratio:g} times its compressed size")
    budget[0] -= len(out)
    if len(out) != info.file_size or crc != info.CRC:
        raise Refused(f"archive member inflates to {len(out)} bytes (CRC {crc:08x}) where its header says "
                      f"{info.file_size} (CRC {info.CRC:08x})")
    return bytes(out)


def _inflater(method: int, f: BinaryIO, left: int) -> tuple[Callable[[bytes, int], bytes], int]:
    """inflate(compressed chunk, at most this many bytes out) for a zip compression method, and the compressed
    bytes left once its own header (lzma's) is read. Called with the room left, an inflater that returns less
    has taken its whole chunk: the loop never needs to drain it."""
    if method == zipfile.ZIP_STORED:
        return (lambda chunk, room: chunk[:room]), left
    if method == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-15).decompress, left
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor().decompress, left
    if method == zipfile.ZIP_LZMA:  # a 4-byte header (version, properties' size), then the properties
        _, size = struct.unpack("<2sH", f.read(4))
        properties = f.read(size)
        decoder = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
            lzma._decode_filter_properties(lzma.FILTER_LZMA1, properties)])  # as zipfile does
        return decoder.decompress, left - 4 - size
    raise Unsupported(f"zip compression method {method} (stored, deflate, bzip2 and lzma are read)")


def over_cap(size: int, limits: Limits, what: str = "archive member") -> str:
    return f"{what} of {size / MiB:.0f} MiB is over the {limits.member_bytes / MiB:g} MiB cap (--max-member-mb)"


def over_budget(limits: Limits) -> str:
    return f"archive inflates past {limits.archive_bytes / 2**30:g} GiB (--max-archive-gb); the rest is not read"


class _Budget:
    """The inflated stream of a tar, which stops once it has given limits.archive_bytes."""

    def __init__(self, f: BinaryIO, limits: Limits):
        self.f, self.limits, self.left = f, limits, limits.archive_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size if size >= 0 else CHUNK)
        self.left -= len(data)
        if self.left < 0:
            raise TooLarge(over_budget(self.limits))
        return data


class _Tagged:
    """A raw archive file whose storage errors are StorageFailed, so that they are told from bad bytes (the
    decompressors raise OSError too)."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self.f.read(None if size is None or size < 0 else size)  # pyarrow's files take None for "all"
        except OSError as e:
            raise StorageFailed(str(e)) from e

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self.f.seek(offset, whence)
        except OSError as e:
            raise StorageFailed(str(e)) from e

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True
