"""Training workers run by Ray Train, by role: ``data`` (the streaming loader), ``models`` (networks,
checkpoint files, evaluation), ``training`` (the loop and the Ray driver) and ``tools`` (evaluate,
predict, fine-tune, export). Each sub-package imports only those before it in that list."""
