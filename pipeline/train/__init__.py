"""Training: config, data, transforms and models; the per-worker loop (loop, distributed); checkpoints and
reports; job runs it all with Ray Train."""
