"""Where an audit writes: its folder as the user names it, and as pyarrow reaches it from this process."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage


@dataclass(frozen=True)
class Place:
    """`path` as the user names it, `fs` and `base` as pyarrow reaches it."""

    path: str
    fs: pafs.FileSystem
    base: str

    @classmethod
    def of(cls, path: str) -> Place:
        return cls(path, *storage.resolve(path))

    def file(self, *parts: str) -> str:
        """A file's path inside `fs`, for this process."""
        return "/".join([self.base, *parts])

    def uri(self, *parts: str) -> str:
        """A file as `path` names it, for a task: on another node, or a URI's filesystem, `fs` is not there."""
        return storage.join(self.path, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.file(*parts)).type == pafs.FileType.File
