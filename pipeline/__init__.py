"""imgjobs library: config, data, models, checkpoints and the Ray jobs built from them."""
