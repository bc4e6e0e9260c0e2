"""Training: config, data, transforms and models; the per-worker loop (loop, worker, preemption, distributed);
checkpoints (run_state) and reports; job runs it all with Ray Train."""
