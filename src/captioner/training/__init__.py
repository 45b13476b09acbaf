"""Training: the config, the loop, checkpoints, stages, SCST and scheduled sampling."""
