"""A clock that moves only when a test moves it, for code that reads time (and may sleep)."""

from __future__ import annotations


class FakeClock:
    """Call it for the time; ``sleep`` moves it forward. Starts at ``start`` seconds."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

