"""imgjobs library. train/ and label/ hold the two jobs; the modules here are what both use: storage, images,
metrics, cluster (connecting to Ray), submit (the Ray Jobs API) and errors."""
