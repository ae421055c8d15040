"""When to ask a provider for news: an interval that follows how long jobs usually take.

Job durations are roughly log-normal around a typical value (published averages: about
460 s standard, 730 s pro). Polling every second for twelve minutes wastes requests and
rate-limit budget; polling every 15 s notices a finished job late. So we poll slowly
while a finish is unlikely and quickly where most jobs end, and we never wait longer
than :data:`MAX_INTERVAL_S`, so a job that ends far earlier than usual is still
noticed within that bound.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from collections.abc import Mapping

# Published averages (Segmind's avatar pages, November 2026); the other hosts run the same
# model and publish nothing better. Used until the store has seen jobs of our own.
TYPICAL_SECONDS: Mapping[tuple[str, str], float] = {
    ("wavespeed", "standard"): 460.0,
    ("wavespeed", "pro"): 730.0,
    ("segmind", "standard"): 460.0,
    ("segmind", "pro"): 730.0,
    ("fal", "standard"): 460.0,
    ("fal", "pro"): 730.0,
    ("replicate", "standard"): 460.0,
    ("replicate", "pro"): 730.0,
    ("kling", "standard"): 460.0,
    ("kling", "pro"): 730.0,
}
DEFAULT_TYPICAL_S = 600.0

# Spread of job durations around the typical value (log-normal sigma). 0.25 matches the
# spread seen in published timings; the fast zone starts 2.5 sigma before the typical value,
# where about 0.6% of jobs have already finished.
SIGMA = 0.25
FAST_ZONE_SIGMAS = 2.5
# In the fast zone the delay to notice is uniform on [0, interval]: 1.8 s gives a median
# of 0.9 s and a 95th percentile of 1.7 s, inside the 1 s / 2 s targets.
FAST_INTERVAL_S = 1.8
# The longest we ever wait between polls: an unusually quick job is noticed within this.
MAX_INTERVAL_S = 12.0
# The first poll comes quickly so the user sees the queue position early.
FIRST_POLL_S = 1.0
# Read retries back off exponentially from this, up to the cap.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0


@dataclass(frozen=True)
class PollSchedule:
    """The polling plan for one job.

    ``typical_s``: how long such jobs usually take. ``floor_s``/``ceiling_s`` bound the interval.
    """

    typical_s: float
    sigma: float = SIGMA
    fast_interval_s: float = FAST_INTERVAL_S
    floor_s: float = 0.2
    ceiling_s: float = MAX_INTERVAL_S
    first_poll_s: float = FIRST_POLL_S

    @property
    def fast_zone_start(self) -> float:
        return self.typical_s * math.exp(-FAST_ZONE_SIGMAS * self.sigma)

    def interval(self, elapsed: float) -> float:
        """Seconds to wait before the next status read, ``elapsed`` seconds into the job."""
        if elapsed <= 0:
            return self._clamp(self.first_poll_s)
        start = self.fast_zone_start
        if elapsed >= start:
            # Beyond three times the typical duration the job is an outlier; relax gently.
            late = self.typical_s * 3.0
            extra = max(0.0, (elapsed - late) / 60.0)
            return self._clamp(self.fast_interval_s + extra)
        # Approach the fast zone geometrically: never sleep past its start by much.
        return self._clamp(max(self.fast_interval_s, (start - elapsed) / 3.0))

    def _clamp(self, value: float) -> float:
        return max(self.floor_s, min(self.ceiling_s, value))

    @classmethod
    def for_job(cls, provider: str, tier: str, *, typical_s: float | None = None) -> PollSchedule:
        if provider == "local":
            # An in-process render: reading its progress costs nothing.
            return cls(typical_s=typical_s or 10.0, fast_interval_s=0.25, floor_s=0.1, ceiling_s=0.5, first_poll_s=0.1)
        typical = typical_s or TYPICAL_SECONDS.get((provider, tier), DEFAULT_TYPICAL_S)
        if typical < 30:
            # Very short typical jobs (emulators, tests): scale the whole plan down.
            return cls(typical_s=typical, fast_interval_s=max(0.1, typical / 20), floor_s=0.05,
                       ceiling_s=max(0.5, typical / 4), first_poll_s=min(FIRST_POLL_S, typical / 10))
        return cls(typical_s=typical)


def backoff(
    attempt: int, retry_after: float | None = None, *, base: float = BACKOFF_BASE_S, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (1-based) of a read; Retry-After wins when longer.

    ``base`` is the first delay; the job loop passes its polling cadence, so an emulator job
    that polls every 0.1 s also retries on that scale.
    """
    rng = rng or random
    delay = min(BACKOFF_CAP_S, base * 2 ** (attempt - 1))
    delay = delay * (0.75 + rng.random() * 0.5)  # jitter so many clients do not retry in step
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, max(BACKOFF_CAP_S, retry_after or 0.0))
