"""Training data: the streaming shard loader, its sampling plan, image transforms and GPU decode."""
