"""Helpers for driving an :class:`~avatar_core.emulator.Emulator` from tests."""

from __future__ import annotations

import threading


class FakeClock:
    """A clock that moves only when told: ``Emulator(clock=clock)`` then ``clock.advance(2)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self._now = start

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move forward and return the new time."""
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when
