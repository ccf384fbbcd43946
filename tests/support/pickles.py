"""A pickle that runs code when it is loaded: what a loader of untrusted files must refuse to run."""

from __future__ import annotations

import pickle
from pathlib import Path


class _TouchOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def code_running_pickle(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """Pickled bytes that create the file ``marker`` when they are unpickled: ``marker`` exists
    afterwards exactly when a loader ran them."""
    return pickle.dumps(_TouchOnLoad(marker), protocol=protocol)
