"""Money on a public deployment: who may use the server's keys, per-visitor limits on
jobs in progress and jobs per day, and the daily spend cap of the server's keys, with
the messages a visitor reads, persistence across restarts and races for the last slot."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import replace
from datetime import datetime, UTC
from pathlib import Path

import pytest

from avatar_core import jobs
from avatar_core.config import Secret, Settings, load_settings, parse_auth
from avatar_core.emulator import Emulator, Fault, tone_video_maker
from avatar_core.errors import ConfigError, InputError
from avatar_core.events import Done, FailedEvent, ProcessingEvent, Submitted, Uploading
from avatar_core.guard import (
    Guard,
    LimitReached,
    auth_credentials,
    is_loopback_host,
    server_keys_allowed,
    utc_day,
)
from avatar_core.store import SCHEMA_VERSION, JobStore
from tests.media_factory import make_image, make_tone

# 2026-11-10 20:48:00 UTC: 3 h 12 min before the daily reset.
EVENING = datetime(2026, 11, 10, 20, 48, tzinfo=UTC).timestamp()
PUBLIC = "0.0.0.0"
LOOPBACK = "127.0.0.1"


class FakeClock:
    def __init__(self, t: float = EVENING) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# The server holds a key for every hosted provider, as on the owner's Space.
SERVER_KEYS = {"WAVESPEED_API_KEY": "srv-ws-000000", "SEGMIND_API_KEY": "srv-sm-000000", "FAL_KEY": "srv-fal-00000",
               "REPLICATE_API_TOKEN": "srv-rep-00000", "KLING_ACCESS_KEY": "srv-ka-000000",
               "KLING_SECRET_KEY": "srv-ks-000000"}  # fmt: skip


def settings(**env: str) -> Settings:
    return load_settings({**SERVER_KEYS, **env}, dotenv_path=None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture(params=["sqlite", "memory"])
def ledger(request, db: Path):
    """The guard's ledger: the store file, or in memory when the history is unavailable."""
    return JobStore(db) if request.param == "sqlite" else None


def admit(guard: Guard, owner: str = "alice", *, provider: str = "wavespeed", server: bool = True,
          cost: float | None = 0.25, logged_in: bool = False):
    return guard.admit(owner, provider=provider, uses_server_key=server, estimated_cost_usd=cost,
                       logged_in=logged_in)  # fmt: skip


def run_job(guard: Guard, owner: str = "alice", request_id: str = "req", **kw) -> None:
    """A job that was submitted and has finished."""
    with admit(guard, owner, **kw) as ticket:
        ticket.submitted(request_id)


# ----------------------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.4.5.6", "localhost", "LocalHost", " 127.0.0.1 ", "::1", "[::1]", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "", "::", "192.168.1.5", "10.0.0.7", "169.254.1.1", "8.8.8.8", "2001:db8::1",
             "example.com", "localhost.example.com", "myspace.hf.space"]
)
def test_every_other_host_is_reachable_from_outside(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_auto_policy_allows_anonymous_server_keys_on_loopback(host: str) -> None:
    s = settings()
    assert s.allow_anonymous_server_keys is None
    assert server_keys_allowed(s, host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", ""])
def test_auto_policy_refuses_anonymous_server_keys_when_reachable(host: str) -> None:
    assert not server_keys_allowed(settings(), host)


@pytest.mark.parametrize("value, expected", [("true", True), ("YES", True), ("1", True), ("on", True),
                                             ("false", False), ("0", False), ("off", False), ("no", False)])  # fmt: skip
def test_owner_setting_overrides_the_auto_policy(value: str, expected: bool) -> None:
    s = settings(AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS=value)
    assert server_keys_allowed(s, PUBLIC) is expected
    assert server_keys_allowed(s, LOOPBACK) is expected


def test_auto_and_empty_mean_automatic() -> None:
    for value in ("", "auto", " AUTO "):
        s = settings(AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS=value)
        assert (server_keys_allowed(s, PUBLIC), server_keys_allowed(s, LOOPBACK)) == (False, True)


# ----------------------------------------------------------------------------- settings


def test_defaults() -> None:
    s = settings()
    assert (s.max_concurrent_per_visitor, s.max_daily_jobs_per_visitor, s.daily_spend_cap_usd) == (2, 20, 20.0)
    assert auth_credentials(s) is None


def test_limits_from_the_environment() -> None:
    s = settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="5", AVATAR_MAX_DAILY_JOBS_PER_VISITOR=" 100 ",
                 AVATAR_DAILY_SPEND_CAP_USD="$7.50")  # fmt: skip
    assert (s.max_concurrent_per_visitor, s.max_daily_jobs_per_visitor, s.daily_spend_cap_usd) == (5, 100, 7.5)
    s = settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="unlimited", AVATAR_MAX_DAILY_JOBS_PER_VISITOR="None",
                 AVATAR_DAILY_SPEND_CAP_USD="unlimited")  # fmt: skip
    assert (s.max_concurrent_per_visitor, s.max_daily_jobs_per_visitor, s.daily_spend_cap_usd) == (None, None, None)
    assert settings(AVATAR_DAILY_SPEND_CAP_USD="0").daily_spend_cap_usd == 0.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS", "maybe"),
        ("AVATAR_MAX_CONCURRENT_PER_VISITOR", "0"),
        ("AVATAR_MAX_CONCURRENT_PER_VISITOR", "-1"),
        ("AVATAR_MAX_CONCURRENT_PER_VISITOR", "two"),
        ("AVATAR_MAX_CONCURRENT_PER_VISITOR", "2.5"),
        ("AVATAR_MAX_DAILY_JOBS_PER_VISITOR", "0"),
        ("AVATAR_MAX_DAILY_JOBS_PER_VISITOR", "lots"),
        ("AVATAR_DAILY_SPEND_CAP_USD", "-1"),
        ("AVATAR_DAILY_SPEND_CAP_USD", "twenty"),
        ("AVATAR_DAILY_SPEND_CAP_USD", "nan"),
        ("AVATAR_DAILY_SPEND_CAP_USD", "inf"),
        ("AVATAR_AUTH", "alice"),
        ("AVATAR_AUTH", "alice:"),
        ("AVATAR_AUTH", ":secret"),
        ("AVATAR_AUTH", "alice:one,alice:two"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**{name: value})
    assert name in info.value.message


def test_auth_pairs_commas_newlines_and_colons() -> None:
    assert parse_auth("alice:pw1, bob:pw:2") == [("alice", "pw1"), ("bob", "pw:2")]
    # One per line: a password may hold a comma.
    assert parse_auth("alice:a,b\nbob:c\r\n\n") == [("alice", "a,b"), ("bob", "c")]
    s = settings(AVATAR_AUTH="alice:a,b\n")
    assert auth_credentials(s) == [("alice", "a,b")]  # survives the round trip through Settings
    assert auth_credentials(settings(AVATAR_AUTH="alice:pw1,bob:pw2")) == [("alice", "pw1"), ("bob", "pw2")]


def test_auth_never_shows_a_password() -> None:
    s = settings(AVATAR_AUTH="alice:hunter2-long-password")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    with pytest.raises(ConfigError) as info:
        settings(AVATAR_AUTH="alice:hunter2-long-password,bob")
    assert "hunter2" not in str(info.value) and "entry 2" in str(info.value)


def test_limit_reached_is_an_input_error() -> None:
    # The app shows InputError messages as they are.
    assert issubclass(LimitReached, InputError)


# ----------------------------------------------------------------------------- server keys


def test_anonymous_visitor_on_a_public_server_must_bring_a_key(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host=PUBLIC, clock=clock)
    with pytest.raises(LimitReached) as info:
        admit(guard, provider="wavespeed")
    assert info.value.message == (
        "This server's keys are not open to visitors here. Enter your own WaveSpeed API key to continue."
    )
    assert guard.running("alice") == 0 and guard.usage_today("alice").jobs == 0  # nothing reserved
    # Their own key, the free local preview, or a signed-in user: all fine.
    admit(guard, server=False).close()
    admit(guard, provider="local", server=True, cost=0.0).close()
    admit(guard, logged_in=True).close()


def test_a_server_without_that_key_spends_nothing_so_refuses_nothing(ledger, clock) -> None:
    # No FAL_KEY here: the job will stop at "no API key" (jobs.py) before any upload.
    s = load_settings({"WAVESPEED_API_KEY": "srv-ws-000000", "AVATAR_DAILY_SPEND_CAP_USD": "0"}, dotenv_path=None)
    guard = Guard(s, ledger, host=PUBLIC, clock=clock)
    with admit(guard, provider="fal", cost=None):
        assert guard.usage_today("alice") == (1, 0)  # a hosted job of the day, no server spend
    assert guard.usage_today("alice") == (0, 0)  # never submitted: refunded
    with pytest.raises(LimitReached, match="WaveSpeed"):
        admit(guard, provider="wavespeed")


def test_when_login_is_configured_the_message_says_sign_in(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_AUTH="owner:pw"), ledger, host=PUBLIC, clock=clock)
    with pytest.raises(LimitReached) as info:
        admit(guard, provider="fal")
    assert info.value.message == (
        "This server's keys are only for signed-in users here. Sign in, or enter your own fal.ai API key to continue."
    )


def test_loopback_app_lets_anonymous_visitors_use_server_keys(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host="localhost", clock=clock)
    admit(guard).close()
    guard = Guard(settings(AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS="false"), ledger, host="localhost", clock=clock)
    with pytest.raises(LimitReached):
        admit(guard)


def test_owner_may_open_server_keys_to_everyone(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS="true"), ledger, host=PUBLIC, clock=clock)
    admit(guard).close()


def test_spend_cap_zero_means_server_keys_never_pay(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="0"), ledger, host=LOOPBACK, clock=clock)
    with pytest.raises(LimitReached) as info:
        admit(guard, provider="replicate", logged_in=True)
    assert info.value.message == (
        "This server does not pay for videos with its own keys. Enter your own Replicate API key to continue."
    )
    admit(guard, provider="replicate", server=False).close()


def test_unknown_price_cannot_use_server_keys_under_a_cap(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host=LOOPBACK, clock=clock)
    with pytest.raises(LimitReached) as info:
        admit(guard, provider="kling", cost=None)
    assert info.value.message == (
        "The price of this Kling model is not published, so this server cannot keep its own keys within "
        "their daily budget. Enter your own Kling API key to use it, or pick another model."
    )
    assert guard.usage_today("alice") == (0, 0)
    # A visitor's own key: their money, no cap.
    with admit(guard, provider="kling", server=False, cost=None) as ticket:
        ticket.submitted("k-1")
    assert guard.usage_today("alice") == (1, 0)
    # No cap at all: the owner accepted unbounded spend.
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="unlimited"), ledger, host=LOOPBACK, clock=clock)
    admit(guard, provider="kling", cost=None).close()


# ----------------------------------------------------------------------------- in progress


def test_two_videos_in_progress_then_wait(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host=LOOPBACK, clock=clock)
    first, second = admit(guard), admit(guard)
    with pytest.raises(LimitReached) as info:
        admit(guard)
    assert info.value.message == "You already have 2 videos in progress; wait for one to finish."
    assert guard.usage_today("alice").jobs == 2  # the refused one reserved nothing
    first.close()
    third = admit(guard)
    assert guard.running("alice") == 2
    second.close()
    third.close()
    assert guard.running("alice") == 0


def test_one_in_progress_reads_singular(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="1"), ledger, host=LOOPBACK, clock=clock)
    with admit(guard):
        with pytest.raises(LimitReached, match=r"^You already have 1 video in progress; wait for one to finish\.$"):
            admit(guard)


def test_local_previews_count_in_progress_but_not_per_day(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_DAILY_JOBS_PER_VISITOR="1"), ledger, host=PUBLIC, clock=clock)
    a = admit(guard, provider="local", server=False, cost=0.0)
    b = admit(guard, provider="local", server=False, cost=0.0)
    with pytest.raises(LimitReached, match="2 videos in progress"):
        admit(guard, provider="local", server=False, cost=0.0)
    a.submitted("local-1")
    a.close()
    b.close()
    for n in range(3):  # many local previews in a day: free, not counted
        run_job(guard, provider="local", server=False, cost=0.0, request_id=f"local-{n}")
    assert guard.usage_today("alice").jobs == 0
    run_job(guard, server=False)  # the one hosted job of the day
    with pytest.raises(LimitReached, match="You have made 1 video today"):
        admit(guard, server=False)
    run_job(guard, provider="local", server=False, cost=0.0)  # previews still work


def test_close_is_idempotent_and_a_context_manager(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="1"), ledger, host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    ticket.close()
    ticket.close()
    assert ticket.closed and guard.running("alice") == 0
    with admit(guard) as t2:
        assert guard.running("alice") == 1
    assert t2.closed and guard.running("alice") == 0
    with pytest.raises(RuntimeError):
        t2.submitted("late")
    # An exception inside the block still frees the slot.
    with pytest.raises(ZeroDivisionError):
        with admit(guard):
            raise ZeroDivisionError
    admit(guard).close()


# ----------------------------------------------------------------------------- per day


def test_daily_limit_message_says_when_it_resets(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host=LOOPBACK, clock=clock)
    for n in range(20):
        run_job(guard, request_id=f"r{n}", cost=0.25 if n % 2 else None, server=bool(n % 2))
    with pytest.raises(LimitReached) as info:
        admit(guard, server=False)
    assert info.value.message == (
        "You have made 20 videos today, the daily limit on this server; it resets at 00:00 UTC (in 3 h 12 min)."
    )
    clock.advance(3 * 3600 + 11 * 60 + 30)  # 23:59:30
    with pytest.raises(LimitReached, match=r"\(in 1 min\)"):
        admit(guard)
    clock.advance(31)  # 00:00:01 the next day
    admit(guard).close()


def test_limits_are_per_visitor(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_DAILY_JOBS_PER_VISITOR="3"), ledger, host=LOOPBACK, clock=clock)
    for n in range(3):
        run_job(guard, "alice", f"a{n}")
    with pytest.raises(LimitReached, match="You have made 3 videos today"):
        admit(guard, "alice")
    a1, a2 = admit(guard, "bob"), admit(guard, "bob")
    with pytest.raises(LimitReached, match="2 videos in progress"):
        admit(guard, "bob")
    carol = admit(guard, "carol")  # bob's jobs in progress do not block carol
    assert guard.usage_today("alice").jobs == 3 and guard.usage_today("bob").jobs == 2
    for t in (a1, a2, carol):
        t.close()


def test_a_job_never_submitted_is_refunded(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_DAILY_JOBS_PER_VISITOR="2", AVATAR_DAILY_SPEND_CAP_USD="1"), ledger,
                  host=LOOPBACK, clock=clock)  # fmt: skip
    ticket = admit(guard, cost=0.75)
    assert guard.usage_today("alice") == (1, 750_000)  # reserved while it uploads and submits
    ticket.close()  # the upload failed, the provider refused the submit, or the visitor pressed Stop
    assert guard.usage_today("alice") == (0, 0)
    # Submitted (or maybe submitted: the answer to the submit never came): stays spent.
    with admit(guard, cost=0.75) as ticket:
        ticket.submitted(None)
    assert guard.usage_today("alice") == (1, 750_000)
    with pytest.raises(LimitReached, match="budget"):
        admit(guard, cost=0.75)
    run_job(guard, cost=0.25)
    with pytest.raises(LimitReached, match="You have made 2 videos today"):
        admit(guard, server=False)


# ----------------------------------------------------------------------------- spend


def test_daily_budget_message(ledger, clock) -> None:
    guard = Guard(settings(), ledger, host=LOOPBACK, clock=clock)
    for n, cost in enumerate([4.48] * 4 + [1.88]):  # $19.80 spent by other visitors
        run_job(guard, f"visitor-{n}", f"r{n}", provider="segmind", cost=cost)
    assert guard.usage_today("alice").server_spend_usd == pytest.approx(19.80)
    with pytest.raises(LimitReached) as info:
        admit(guard, "alice", cost=0.75)
    assert info.value.message == (
        "This server's daily budget for its own keys ($20.00) is nearly used up ($19.80 spent, this job would "
        "cost $0.75). Use your own API key, or come back after 00:00 UTC (in 3 h 12 min)."
    )
    run_job(guard, "alice", "fits", cost=0.20)  # exactly reaches the cap: allowed
    with pytest.raises(LimitReached) as info:
        admit(guard, "alice", cost=0.0562)
    assert info.value.message.startswith(
        "This server's daily budget for its own keys ($20.00) is used up ($20.00 spent, this job would cost $0.06)."
    )
    # The visitor's own key still works, and does not touch the budget.
    run_job(guard, "alice", "own", server=False, cost=3.0)
    assert guard.usage_today("alice").server_spend_usd == pytest.approx(20.0)
    # Tomorrow the budget is back.
    clock.advance(4 * 3600)
    assert guard.usage_today("alice") == (0, 0)
    admit(guard, "alice", cost=0.75).close()


def test_per_second_prices_add_up_without_drift(ledger, clock) -> None:
    # 0.1 + 0.2 != 0.3 in floats; the ledger counts micro-dollars.
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="0.3", AVATAR_MAX_DAILY_JOBS_PER_VISITOR="unlimited"),
                  ledger, host=LOOPBACK, clock=clock)  # fmt: skip
    run_job(guard, cost=0.1)
    run_job(guard, cost=0.2)
    with pytest.raises(LimitReached, match="used up"):
        admit(guard, cost=0.0001)
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="1", AVATAR_MAX_DAILY_JOBS_PER_VISITOR="unlimited"),
                  ledger, host=LOOPBACK, clock=clock.__class__(clock.t + 86400))  # fmt: skip
    for n in range(10):
        run_job(guard, request_id=f"r{n}", cost=0.1)
    assert guard.usage_today("alice").server_spend_microusd == 1_000_000
    with pytest.raises(LimitReached):
        admit(guard, cost=0.01)


# ----------------------------------------------------------------------------- persistence


def test_a_restart_keeps_todays_counts_and_spend(db: Path, clock) -> None:
    s = settings(AVATAR_MAX_DAILY_JOBS_PER_VISITOR="3", AVATAR_DAILY_SPEND_CAP_USD="2")
    before = Guard(s, JobStore(db), host=LOOPBACK, clock=clock)
    for n in range(3):
        run_job(before, "alice", f"a{n}", cost=0.5)
    abandoned = admit(before, "bob", cost=0.5)  # the process dies while bob's job is being sent
    del before, abandoned

    after = Guard(s, JobStore(db), host=LOOPBACK, clock=clock)  # a new process on the same file
    assert after.usage_today("alice") == (3, 2_000_000)
    with pytest.raises(LimitReached, match="You have made 3 videos today"):
        admit(after, "alice", server=False)
    with pytest.raises(LimitReached, match=r"\(\$2\.00\) is used up \(\$2\.00 spent"):
        admit(after, "carol", cost=0.01)
    # bob's unfinished reservation may have been paid for: it still counts.
    assert after.usage_today("bob").jobs == 1
    # "In progress" does not survive the restart: the old process's jobs ended with it.
    assert after.running("bob") == 0
    with sqlite3.connect(db) as conn:
        states = conn.execute("SELECT owner, state, request_id FROM usage_ledger ORDER BY id").fetchall()
    assert states == [("alice", "submitted", "a0"), ("alice", "submitted", "a1"), ("alice", "submitted", "a2"),
                      ("bob", "reserved", None)]  # fmt: skip


def test_old_rows_are_pruned_but_not_todays(db: Path, clock) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    run_job(guard, request_id="old")
    clock.advance(36 * 86400)
    run_job(guard, request_id="new")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT day, request_id FROM usage_ledger").fetchall()
    assert rows == [(utc_day(clock.t), "new")]


def test_store_schema_has_the_ledger(db: Path) -> None:
    js = JobStore(db)
    assert js.schema_version() == SCHEMA_VERSION >= 3
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'usage_ledger'").fetchone()


def test_the_ledger_never_holds_a_key(db: Path, clock, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "wsk_GUARD_5e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b"
    s = settings(WAVESPEED_API_KEY=key, AVATAR_AUTH="owner:pw_GUARD_secret_value")
    guard = Guard(s, JobStore(db), host=PUBLIC, clock=clock)
    run_job(guard, "owner", "req-1", logged_in=True)
    admit(guard, "visitor", server=False).close()
    blob = b"".join(p.read_bytes() for p in db.parent.glob("jobs.sqlite3*"))
    assert b"req-1" in blob  # reading the right bytes
    assert key.encode() not in blob and b"pw_GUARD_secret_value" not in blob


# ----------------------------------------------------------------------------- races


def _race(admitters, owners, cost: float):
    """Every thread admits at the same moment; returns (tickets, refusals)."""
    barrier = threading.Barrier(len(owners))
    tickets, refusals, lock = [], [], threading.Lock()

    def go(guard: Guard, owner: str) -> None:
        barrier.wait()
        try:
            t = admit(guard, owner, cost=cost)
        except LimitReached as exc:
            with lock:
                refusals.append(exc.message)
        else:
            t.submitted(f"req-{owner}")
            with lock:
                tickets.append(t)

    threads = [threading.Thread(target=go, args=(admitters[i % len(admitters)], o)) for i, o in enumerate(owners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tickets, refusals


@pytest.mark.parametrize("guards", [1, 2], ids=["one-guard", "two-processes-one-file"])
def test_twenty_visitors_race_for_the_last_slot_of_budget(db: Path, clock, guards: int) -> None:
    s = settings(AVATAR_DAILY_SPEND_CAP_USD="1")
    # Two guards over two JobStore objects share nothing but the file, like two processes.
    admitters = [Guard(s, JobStore(db), host=LOOPBACK, clock=clock) for _ in range(guards)]
    for n in range(3):
        run_job(admitters[0], f"early-{n}", f"e{n}", cost=0.25)  # $0.75 of $1.00 spent
    tickets, refusals = _race(admitters, [f"visitor-{n}" for n in range(20)], cost=0.25)
    assert len(tickets) == 1 and len(refusals) == 19
    assert all("($1.00) is nearly used up ($0.75 spent" in m or "is used up ($1.00 spent" in m for m in refusals)
    assert admitters[0].usage_today("anyone").server_spend_microusd == 1_000_000


def test_race_in_memory_ledger(clock) -> None:
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="1"), None, host=LOOPBACK, clock=clock)
    tickets, refusals = _race([guard], [f"visitor-{n}" for n in range(20)], cost=0.25)
    assert len(tickets) == 4 and len(refusals) == 16


def test_one_visitor_racing_many_tabs_gets_two_slots(db: Path, clock) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    tickets, refusals = _race([guard], ["alice"] * 20, cost=0.25)
    assert len(tickets) == 2 and len(refusals) == 18
    assert set(refusals) == {"You already have 2 videos in progress; wait for one to finish."}
    assert guard.usage_today("alice").jobs == 2


# ----------------------------------------------------------------------------- following a job's events


async def _events(*items, then=None):
    for item in items:
        yield item
    if then is not None:
        await then


async def test_watch_marks_submitted_and_closes_at_the_end(db: Path, clock) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    seen = []
    async for event in ticket.watch(_events(Uploading("image", 1, 1), Submitted("wavespeed", "ws-1"),
                                            ProcessingEvent("wavespeed", "ws-1"))):  # fmt: skip
        seen.append((type(event).__name__, ticket.is_submitted, guard.running("alice")))
    assert seen == [("Uploading", False, 1), ("Submitted", True, 1), ("ProcessingEvent", True, 1)]
    assert ticket.closed and guard.running("alice") == 0
    assert guard.usage_today("alice") == (1, 250_000)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT state, request_id FROM usage_ledger").fetchall() == [("submitted", "ws-1")]


@pytest.mark.parametrize(
    "kind, counted",
    [("AuthError", False), ("CreditsError", False), ("InputError", False), ("NotSubmitted", False),
     ("RateLimited", False), ("SubmitUncertain", True), ("InternalError", True)],
)
async def test_watch_refunds_only_failures_that_cannot_have_reached_the_provider(db, clock, kind, counted) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    events = [e async for e in ticket.watch(_events(Uploading("audio", 1, 1), FailedEvent("no", "wavespeed",
                                                                                          None, kind)))]  # fmt: skip
    assert isinstance(events[-1], FailedEvent) and ticket.closed
    assert guard.usage_today("alice") == ((1, 250_000) if counted else (0, 0))


async def test_a_failure_after_submit_stays_counted(db: Path, clock) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    async for _ in ticket.watch(_events(Submitted("wavespeed", "ws-2"), FailedEvent("blocked", "wavespeed", "ws-2",
                                                                                    "JobFailed"))):  # fmt: skip
        pass
    assert ticket.closed and guard.usage_today("alice") == (1, 250_000)


async def test_watch_closed_before_it_started_frees_everything(db: Path, clock) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    watched = ticket.watch(_events(Submitted("wavespeed", "never")))
    await watched.aclose()
    assert ticket.closed and guard.running("alice") == 0 and guard.usage_today("alice") == (0, 0)


@pytest.mark.parametrize("after_submit", [False, True])
async def test_stop_pressed_while_the_job_runs(db: Path, clock, after_submit: bool) -> None:
    guard = Guard(settings(), JobStore(db), host=LOOPBACK, clock=clock)
    ticket = admit(guard)
    forever = asyncio.get_running_loop().create_future()
    first = Submitted("wavespeed", "ws-3") if after_submit else Uploading("image", 10, 100)
    watched = ticket.watch(_events(first, then=forever))
    reached = asyncio.Event()

    async def drive() -> None:
        async for _ in watched:
            reached.set()

    task = asyncio.create_task(drive())
    await reached.wait()
    assert guard.running("alice") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticket.closed and guard.running("alice") == 0
    # Stopped during the upload: nothing was sent, nothing counts. After submit: paid.
    assert guard.usage_today("alice") == ((1, 250_000) if after_submit else (0, 0))


# ----------------------------------------------------------------------------- against the emulator

WS_KEY = "ws-guard-test-key-0123456789"


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.1, processing_s=0.2, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture
def emu_settings(emu, tmp_path: Path) -> Settings:
    emu.reset()
    return replace(settings(), wavespeed_api_key=Secret(WS_KEY), wavespeed_base_url=emu.url,
                   output_dir=tmp_path / "out", poll_typical_s=0.5, deadline_s=60)  # fmt: skip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard-inputs")
    return make_image(d / "face.png", "PNG", (480, 600)), make_tone(d / "voice.wav", "wav", 2.5)


async def test_real_jobs_against_the_emulator(emu, emu_settings, media, tmp_path: Path, clock) -> None:
    image, audio = media
    store = JobStore(tmp_path / "jobs.sqlite3")
    guard = Guard(emu_settings, store, host=LOOPBACK, clock=clock)
    submit_path = r"^/api/v3/kwaivgi/kling-v1-ai-avatar-standard$"

    # 1. A finished job: counted under the request id the provider gave.
    ticket = admit(guard, cost=0.25)
    events = [e async for e in ticket.watch(jobs.run_job("wavespeed", image, audio, settings=emu_settings,
                                                         store=store, owner="alice"))]  # fmt: skip
    assert isinstance(events[-1], Done), events[-1]
    [submit] = emu.requests_to("POST", submit_path)
    assert submit.headers["authorization"] == f"Bearer {WS_KEY}"
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT state, request_id FROM usage_ledger").fetchall() == [
            ("submitted", events[-1].request_id)
        ]

    # 2. The provider refuses the key on submit: nothing was billed, the count is refunded.
    emu.faults.add(Fault("status", submit_path, method="POST", status=401))
    ticket = admit(guard, cost=0.25)
    events = [e async for e in ticket.watch(jobs.run_job("wavespeed", image, audio, settings=emu_settings))]
    assert isinstance(events[-1], FailedEvent) and events[-1].kind == "AuthError"
    assert len(emu.requests_to("POST", submit_path)) == 2

    # 3. The submit was sent but the answer was lost: the job exists, so it counts.
    emu.faults.add(Fault("drop", submit_path, method="POST"))
    ticket = admit(guard, cost=0.25)
    events = [e async for e in ticket.watch(jobs.run_job("wavespeed", image, audio, settings=emu_settings))]
    assert events[-1].kind == "SubmitUncertain"
    assert len(emu.requests_to("POST", submit_path)) == 3 and len(emu.jobs) == 2

    assert guard.usage_today("alice") == (2, 500_000)
    assert guard.running("alice") == 0


# ----------------------------------------------------------------------------- a place before the input checks


def enter(guard: Guard, owner: str = "alice", *, provider: str = "wavespeed", server: bool = True,
          logged_in: bool = False):
    return guard.enter(owner, provider=provider, uses_server_key=server, logged_in=logged_in)


def test_a_place_holds_the_visitors_slot_while_inputs_are_checked(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="1"), ledger, host=LOOPBACK, clock=clock)
    place = enter(guard)
    assert guard.running("alice") == 1 and guard.usage_today("alice").jobs == 0  # nothing reserved for the day
    with pytest.raises(LimitReached, match=r"^You already have 1 video in progress; wait for one to finish\.$"):
        enter(guard)
    with pytest.raises(LimitReached, match="1 video in progress"):
        admit(guard)
    enter(guard, "bob").close()  # another visitor is not affected
    ticket = place.admit(0.25)
    assert guard.running("alice") == 1 and guard.usage_today("alice").jobs == 1  # the slot passed to the ticket
    place.close()  # after admit: nothing to free
    assert guard.running("alice") == 1
    with pytest.raises(RuntimeError):
        place.admit(0.25)
    ticket.close()
    assert guard.running("alice") == 0 and guard.usage_today("alice").jobs == 0  # never submitted: refunded


def test_a_place_left_without_a_job_frees_the_slot(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_CONCURRENT_PER_VISITOR="1"), ledger, host=LOOPBACK, clock=clock)
    with enter(guard) as place:
        assert guard.running("alice") == 1
    place.close()  # idempotent
    assert guard.running("alice") == 0
    run_job(guard)


def test_a_place_refuses_before_the_price_what_needs_no_price(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_MAX_DAILY_JOBS_PER_VISITOR="1"), ledger, host=PUBLIC, clock=clock)
    with pytest.raises(LimitReached, match="This server's keys are not open to visitors here"):
        enter(guard)
    run_job(guard, server=False)
    with pytest.raises(LimitReached, match="You have made 1 video today"):
        enter(guard, server=False)
    enter(guard, provider="local", server=False).close()  # local previews do not count per day
    assert guard.running("alice") == 0


def test_the_price_rules_apply_when_the_place_is_admitted(ledger, clock) -> None:
    guard = Guard(settings(AVATAR_DAILY_SPEND_CAP_USD="1"), ledger, host=LOOPBACK, clock=clock)
    with enter(guard, provider="kling") as place:  # unknown price: only known once the audio is checked
        with pytest.raises(LimitReached, match="price of this Kling model is not published"):
            place.admit(None)
        assert guard.running("alice") == 1  # still held until the place is closed
    with enter(guard) as place:
        with pytest.raises(LimitReached, match=r"daily budget for its own keys \(\$1.00\) is nearly used up"):
            place.admit(1.5)
    assert guard.running("alice") == 0 and guard.usage_today("alice").jobs == 0
