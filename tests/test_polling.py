"""The polling plan: slow while a finish is unlikely, fast where jobs end, bounded always."""

import math
import random

from avatar_core.polling import MAX_INTERVAL_S, PollSchedule, backoff


def test_interval_is_bounded_everywhere():
    plan = PollSchedule.for_job("wavespeed", "pro")
    for t in range(0, 5000, 7):
        assert 0.2 <= plan.interval(float(t)) <= MAX_INTERVAL_S


def test_fast_where_jobs_usually_end_and_slow_early():
    plan = PollSchedule.for_job("segmind", "standard")  # typical 460 s
    assert plan.interval(10.0) >= 10.0  # far from any likely finish
    for t in (0.6 * 460, 460, 1.5 * 460):
        assert plan.interval(t) <= 2.0


def test_schedule_sums_to_far_fewer_polls_than_one_per_second():
    plan = PollSchedule.for_job("wavespeed", "standard")
    t, polls = 0.0, 0
    while t < 460:
        t += plan.interval(t)
        polls += 1
    assert polls < 0.4 * 460


def test_short_typical_scales_down_for_emulators():
    plan = PollSchedule.for_job("wavespeed", "standard", typical_s=2.0)
    assert plan.interval(0.0) <= 0.2
    assert plan.interval(1.9) <= 0.2


def test_backoff_grows_caps_and_honours_retry_after():
    rng = random.Random(1)
    delays = [backoff(n, rng=rng) for n in range(1, 10)]
    assert delays[0] < delays[3]
    assert max(delays) <= 30.0
    assert backoff(1, retry_after=7.0, rng=rng) >= 7.0
    assert math.isclose(backoff(1, retry_after=45.0, rng=rng), 45.0)
