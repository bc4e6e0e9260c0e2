"""imgjobs library. train/ and label/ hold the two jobs; formats/ what they read and write (keys, archives, the
labels file, the checkpoint); the modules here are what both use: storage, images, models, cluster (connecting to
Ray), submit (the Ray Jobs API), console and errors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgjobs")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
