"""Training: the loop, checkpoint manager, run store, goodput ledger, metrics and the Ray driver."""
