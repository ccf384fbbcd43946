"""Training workers run by Ray Train, by role: ``data`` (the streaming loader), ``models`` (networks,
checkpoint files, evaluation), ``training`` (the loop and the Ray driver) and ``tools`` (evaluate,
predict, fine-tune, export). Each sub-package imports only those before it in that list."""

import time as _time

# When this process began importing alexray's workers: a Ray Train worker does so when it unpickles
# the train function, so the start-up table can tell our imports from Ray's own start of the worker.
IMPORT_STARTED = _time.time()
