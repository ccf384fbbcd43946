"""Models: architectures, their FLOP count, the checkpoint file format, loading and evaluation."""
