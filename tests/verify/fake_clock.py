"""A clock for timing tests: seconds that move only when a fake runner works."""

from __future__ import annotations


class FakeClock:
    """Returns ``t`` (seconds); fake runners advance it by their cost."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t
