"""Training workers run by Ray Train: data loading, the models, the training loop."""
