"""What `imgjobs label` reads: image files found in directories, archives and manifests, local or by URI, each
named by its key (pipeline.formats.keys)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.keys import ARCHIVE_NAMES, Keys, archive_kind
from pipeline.images import IMAGE_EXTENSIONS, is_image_name

MANIFEST_SUFFIX = ".txt"


@dataclass(frozen=True)
class Listing:
    """What the inputs list, for the units (files, archives), --evaluate (roots) and the readers (options)."""

    files: pa.Array  # keys of image files: sorted, each once (large_string)
    archives: pa.Array  # keys of archives, streamed by the read tasks: sorted, each once
    roots: list[str] = field(default_factory=list)  # directory inputs (class-folder trees for --evaluate): key+query
    # A URI input's query string (its filesystem's options, e.g. an S3 endpoint) by host. Keys carry none, so the
    # output's paths stay clean; readers open a key with the options of its host.
    options: dict[str, str] = field(default_factory=dict)


class Input(NamedTuple):
    """A command-line input, checked: its key and query string, and where it was looked up, its filesystem, path in
    it and file type (the shards of a range and the matches of a glob are files, not looked up one by one)."""

    key: str
    query: str
    fs: pafs.FileSystem | None
    fs_path: str | None
    kind: pafs.FileType


def list_inputs(paths: list[str]) -> Listing:
    """Expand the command's inputs: patterns first, then every path is checked before any listing starts. Inputs
    that together list nothing to label are a mistake; inputs whose images are all labeled already are not."""
    inputs = [checked for pattern in paths for checked in _checked(pattern)]
    options = Options()
    for given in inputs:  # the command line's options first: no manifest line can change them
        options.use(given.key, given.query, f"input {given.key}")
    files, archives = Keys(), Keys()
    for given in inputs:
        for key in _keys(given, options):
            (archives if archive_kind(key) else files).append(key)
    roots = [given.key + given.query for given in inputs if given.kind == pafs.FileType.Directory]
    listing = Listing(files.sorted_unique(), archives.sorted_unique(), roots, options.queries)  # inputs may overlap
    if not len(listing.files) and not len(listing.archives):
        raise UsageError(f"nothing to label in {' '.join(paths)}: no image ({' '.join(sorted(IMAGE_EXTENSIONS))}) "
                         f"or archive {ARCHIVE_NAMES} there")
    return listing


def _checked(pattern: str) -> Iterator[Input]:
    """The inputs a command-line path names (expand), each checked: one that is missing, or a file that is no image,
    archive or manifest, is a UsageError."""
    for path, look_up in expand(pattern):
        name, query = storage.split_query(path)
        if not look_up:  # a pattern's: by its name alone, without a request each
            if not (is_image_name(name) or archive_kind(name)):
                raise UsageError(f"input {pattern} names {name}, which is not an image or an archive {ARCHIVE_NAMES}")
            yield Input(storage.absolute(name), query, None, None, pafs.FileType.File)
            continue
        fs, fs_path = _resolve(path)
        kind = _file_info(fs, fs_path, path).type
        if kind == pafs.FileType.NotFound:
            raise UsageError(f"input {path} not found")
        if kind == pafs.FileType.File and not (
            is_image_name(name) or archive_kind(name) or name.lower().endswith(MANIFEST_SUFFIX)
        ):
            raise UsageError(f"input {path} is not an image, archive {ARCHIVE_NAMES}, manifest (.txt) or directory")
        yield Input(storage.uri_prefix(name, fs_path) + fs_path, query, fs, fs_path, kind)


def _keys(given: Input, options: Options) -> Iterator[str]:
    """The keys an input lists: a folder's images and archives, a manifest's lines (whose hosts' options `options`
    checks), or the input's own."""
    if given.kind == pafs.FileType.Directory:
        prefix = given.key[:len(given.key) - len(given.fs_path)]
        for found in storage.walk(given.fs, given.fs_path, lambda name: is_image_name(name) or archive_kind(name)):
            yield prefix + found
    elif given.key.lower().endswith(MANIFEST_SUFFIX):
        same_host = "\0"  # the prefix of keys on the host of the line before
        for number, line in _manifest_entries(given.fs, given.fs_path, given.key):
            entry, query = storage.split_query(line)
            if query or not entry.startswith(same_host):  # so a line costs no host() on a 10⁸-line manifest
                same_host = options.use(entry, query, f"manifest {given.key} line {number}")
            yield entry
    else:
        yield given.key


class Options:
    """The hosts' options (query strings), one set per host, since keys carry none: the first input to name a host
    sets them, with or without a query string. A later line may repeat them or leave its query out; one that would
    change them is refused, or it would redirect every key of that host (the command line's own images included) to
    another endpoint."""

    def __init__(self):
        self.queries: dict[str, str] = {}  # host -> query string, for the hosts that have one
        self.given_by: dict[str, str] = {}  # host -> the input or manifest line that set its options

    def use(self, key: str, query: str, where: str) -> str:
        """Check `key`'s query string against its host's options; return the prefix that keys on the same host
        start with ("/" for local paths, which have no options)."""
        if not storage.is_uri(key):
            return "/"
        host = storage.host(key)
        if host not in self.given_by:
            self.given_by[host] = where
            if query:
                self.queries[host] = query
        elif query and _pairs(query) != _pairs(self.queries.get(host, "")):
            # Option names only: a value is no business of the console's.
            raise UsageError(f"{where} sets options ({_names(query)}) for {host} that differ from those "
                             f"{self.given_by[host]} set ({_names(self.queries.get(host, '')) or 'none'}): every key "
                             "of one bucket is read with the same options; leave out the query string or repeat "
                             "those")
        return host + "/"


def _pairs(query: str) -> list[tuple[str, str]]:
    return sorted(parse_qsl(query.lstrip("?"), keep_blank_values=True))


def _names(query: str) -> str:
    return ", ".join(name for name, _ in _pairs(query))


def expand(path: str) -> list[tuple[str, bool]]:
    """The inputs a command-line path names, each with whether it is to be looked up: the path itself; the shards
    of a brace range, as webdataset and img2dataset name them (`shards/{000000..009999}.tar`), which are not
    looked up (one that is missing gets an error row, as a manifest's line does); or the images and archives a `*`
    glob matches (`s3://bucket/shards/*.tar`), found by one listing of the folder above the first `*`. imgjobs
    expands them itself, so a quoted pattern works past the shell's argument limit and through `imgjobs submit`.
    A `?` starts a URI's query string, as ever."""
    name, query = storage.split_query(path)
    if RANGE.search(name):
        return [(expanded + query, False) for expanded in _ranges(name)]
    if "*" in name:
        matches = [match for match in _glob(name, query) if is_image_name(match) or archive_kind(match)]
        if not matches:
            raise UsageError(f"input {path} matches no image or archive {ARCHIVE_NAMES}")
        return [(match + query, False) for match in matches]
    return [(path, True)]


RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _ranges(name: str) -> list[str]:
    match = RANGE.search(name)
    if not match:
        return [name]
    low, high = match.group(1), match.group(2)
    if int(high) < int(low):
        raise UsageError(f"input {name}: the range {{{low}..{high}}} counts down; write it low..high")
    width = len(low) if low.startswith("0") else 0  # {000..099}: zero-padded like its bounds
    head, tail = name[:match.start()], name[match.end():]
    return [expanded for i in range(int(low), int(high) + 1) for expanded in _ranges(f"{head}{i:0{width}d}{tail}")]


def _glob(name: str, query: str) -> list[str]:
    """The files a `*` pattern matches (`*` stays within one folder), listing from the folder above its first `*`:
    on object stores, one listing of about a thousand keys per request."""
    head = name[:name.index("*")]
    folder = head.rpartition("/")[0]
    pattern = name[len(folder) + 1:] if "/" in head else name
    base = folder or ("/" if "/" in head else ".")
    regex = re.compile("[^/]*".join(map(re.escape, pattern.split("*"))) + "$")
    fs, fs_base = _resolve(base + query)
    prefix = storage.uri_prefix(base, fs_base)
    try:
        infos = fs.get_file_info(pafs.FileSelector(fs_base, recursive="/" in pattern, allow_not_found=True))
    except OSError as e:
        raise UsageError(f"input {name} cannot be listed: {str(e).splitlines()[0]}") from None
    start = len(fs_base.rstrip("/")) + 1
    return sorted(prefix + info.path for info in infos
                  if info.type == pafs.FileType.File and regex.match(info.path[start:]))


def _manifest_entries(fs: pafs.FileSystem, fs_path: str, key: str) -> Iterator[tuple[int, str]]:
    """(line number, key) of the keys listed in a manifest; relative lines are relative to the manifest's folder.
    Lines are not checked for existence (a million stat calls on object storage would stall): a missing file gets an
    error row. A URI with credentials stops the listing."""
    base = key.rsplit("/", 1)[0]
    with fs.open_input_stream(fs_path) as stream:  # line by line: a manifest may list 10⁸ images
        for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if storage.is_uri(line):
                if "@" in line:  # a URI without one carries no credentials: most lines cost no more
                    storage.refuse_credentials(line, f"manifest {key} line {number}:")
                yield number, line
            elif storage.is_uri(base):
                yield number, f"{base}/{line}"
            else:
                yield number, os.path.normpath(os.path.join(base, os.path.expanduser(line)))


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
