"""The driver of the Safe RLHF pipeline: config, stage graph, run directory, resume, CLI."""
