"""imgjobs library. train/ and label/ hold the two jobs; the modules here are what both use: storage, keys and
archives (reading any input within limits), images, checkpoint and models, cluster (connecting to Ray), submit (the
Ray Jobs API) and errors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgjobs")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
