"""Money on a shared deployment: who may use the server's keys, and how much.

When the app runs on a public Space with the owner's API keys, every visitor's job is
paid by the owner. :class:`Guard` decides, before anything is uploaded or submitted,
whether a job may start:

1. **Server keys for anonymous visitors** only when the owner allows it
   (``AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS``). Left unset, it is allowed only when the app
   is bound to a loopback address, i.e. nobody else can reach it
   (:func:`server_keys_allowed`). Signed-in users (``AVATAR_AUTH``) always may.
2. **Jobs in progress per visitor** (``AVATAR_MAX_CONCURRENT_PER_VISITOR``), every
   provider, the local one included: its renders share this machine's CPU.
3. **Hosted jobs per visitor per UTC day** (``AVATAR_MAX_DAILY_JOBS_PER_VISITOR``),
   whoever's key pays. Local previews are free and do not count.
4. **Daily spend of the server's keys** (``AVATAR_DAILY_SPEND_CAP_USD``), all visitors
   together, from the price table's estimate; when the video comes back, the job's entry
   is corrected to the price of its real length (:meth:`Ticket.settle`, done by
   :meth:`Ticket.watch`), and a correction that passes the cap is said plainly. A job whose price is unknown cannot be
   bounded, so it may not use the server's keys while a cap is set. Jobs on a
   visitor's own key never count toward it.

A visitor's place is taken **before** their files are decoded or checked:
:meth:`Guard.enter` refuses at once what needs no price (server keys not open to them,
the jobs-in-progress limit, a daily job count or budget already used up) and holds an
in-progress slot while the inputs are checked, so three uploads at once from one visitor
with a limit of one cost one check, not three. :meth:`Place.admit` then applies the price
rules and turns the place into the job's ticket; :meth:`Guard.admit` does both at once.

A refused job raises :class:`LimitReached`, an :class:`~avatar_core.errors.InputError`
whose message says what to do. An admitted job holds a :class:`Ticket`: call
:meth:`Ticket.submitted` once the provider has (or may have) the job, and
:meth:`Ticket.close` when the app stops driving it, or let :meth:`Ticket.watch` do both
from the job's events. Closing frees the in-progress slot; a job that was never
submitted also gets its daily count and spend back.

Daily counts and spend live in the store's SQLite file (the ``usage_ledger`` table), so
they survive a restart, and each admission is checked and recorded in one transaction.
"In progress" is counted in this process only: a restart ends every job it was
following. A reservation whose process died before it was submitted or closed stays
counted for its day: the job may have been paid for.

Owners are strings: the signed-in user name, or an id the app makes per browser. Keys
never reach this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, UTC
from collections.abc import AsyncIterator, Callable

from .config import Settings, parse_auth
from .errors import InputError
from .events import Done, FailedEvent, JobEvent, Submitted
from .store import MICROUSD_PER_USD, Usage

log = logging.getLogger(__name__)

LOCAL = "local"  # the offline provider: free, runs on this machine's CPU


class LimitReached(InputError):
    """A job was refused by a limit of this deployment; the message says what to do."""


# ----------------------------------------------------------------------------- policy


def is_loopback_host(host: str) -> bool:
    """True when a server bound to ``host`` is reachable from this machine only.

    127.0.0.0/8, ::1 (also as ::ffff:127.x.x.x) and "localhost" are loopback.
    "0.0.0.0", "::" and "" mean every interface, so they are not; nor is any other
    address or name.
    """
    text = (host or "").strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text == "localhost":
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def server_keys_allowed(settings: Settings, host: str) -> bool:
    """Whether visitors who are not signed in may run jobs on the server's keys.

    ``AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS`` decides when set; otherwise only an app bound
    to a loopback address allows it (``GRADIO_SERVER_NAME=0.0.0.0`` on a Space does not).
    """
    if settings.allow_anonymous_server_keys is not None:
        return settings.allow_anonymous_server_keys
    return is_loopback_host(host)


def auth_credentials(settings: Settings) -> list[tuple[str, str]] | None:
    """``AVATAR_AUTH`` as ``Blocks.launch(auth=...)`` takes it; None when no login is set."""
    pairs = parse_auth(settings.auth.get())
    return pairs or None


# ----------------------------------------------------------------------------- words


def _provider_label(provider: str) -> str:
    """The provider's name as in "your own WaveSpeed API key" ("Kling API" -> "Kling")."""
    from .providers import LABELS

    return LABELS.get(provider, provider).removesuffix(" API")


def _usd(amount: float) -> str:
    """$20.00, $0.75; amounts under a cent keep their digits ($0.0056)."""
    if 0 < amount < 0.01:
        return f"${amount:.4f}".rstrip("0")
    return f"${amount:,.2f}"


def _next_utc_midnight(now: float) -> datetime:
    today = datetime.fromtimestamp(now, tz=UTC).date()
    return datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def _until(seconds: float) -> str:
    """'in 3 h 12 min', 'in 7 min', 'in less than a minute'."""
    minutes = math.ceil(max(0.0, seconds) / 60)
    if minutes < 1:
        return "in less than a minute"
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"in {minutes} min"
    return f"in {hours} h {minutes} min" if minutes else f"in {hours} h"


def utc_day(now: float) -> str:
    """The UTC date of an epoch time as YYYY-MM-DD: the day the daily limits count in."""
    return datetime.fromtimestamp(now, tz=UTC).date().isoformat()


# ----------------------------------------------------------------------------- the guard


class Ticket:
    """One admitted job. Use as a context manager, or call :meth:`close` exactly when done.

    Not created directly: :meth:`Guard.admit` returns it.
    """

    def __init__(self, guard: Guard, owner: str, provider: str, usage_id: int | None, *,
                 paid_by_server: bool = False, cost_microusd: int | None = None) -> None:
        self._guard = guard
        self.owner = owner
        self.provider = provider
        self._usage_id = usage_id
        self.paid_by_server = paid_by_server
        self.cost_microusd = cost_microusd  # what the ledger holds for this job (estimate, then real)
        self._submitted = False
        self._closed = False
        self.request_id: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("submitted" if self._submitted else "admitted")
        return f"Ticket({self.provider!r}, {state})"

    @property
    def is_submitted(self) -> bool:
        return self._submitted

    @property
    def closed(self) -> bool:
        return self._closed

    def submitted(self, request_id: str | None = None) -> None:
        """The provider has the job, or may have it (a submit that got no answer).

        From now on the job counts for the day and its estimated cost stays spent,
        whatever happens to it. Call it again to add the request id; harmless.
        """
        if self._closed:
            raise RuntimeError("submitted() called on a closed ticket")
        self._guard._commit(self, request_id)

    def settle(self, cost_usd: float | None, video_s: float | None = None) -> str:
        """Correct the ledger to what the finished job really cost (its video's length,
        priced); returns what the user must be told about it, or "".

        The estimate came from the checked audio; providers bill what they rendered. When
        the real price is higher and that takes the server's keys over the daily cap, the
        message says so plainly (the job is done and paid; new ones are refused)."""
        return self._guard._settle(self, cost_usd, video_s)

    def close(self) -> None:
        """Free the in-progress slot; refund the day's count and spend if never submitted.

        Idempotent: later calls do nothing.
        """
        self._guard._close(self)

    def watch(self, events: AsyncIterator[JobEvent]) -> AsyncIterator[JobEvent]:
        """``events`` (from ``jobs.run_job``) passed through, keeping this ticket up to date.

        A :class:`~avatar_core.events.Submitted` event marks the job submitted; so does a
        failure before it that may have reached the provider (``SubmitUncertain``, or a
        bug of ours, ``InternalError``). The ticket closes when the events end, raise, or
        are closed with ``aclose()`` (even before the first one), so the in-progress slot
        lasts exactly as long as the job is driven, watched or not.
        """
        return _WatchedEvents(self, events)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Place:
    """A visitor's in-progress slot, held while their inputs are checked; see :meth:`Guard.enter`.

    :meth:`admit` turns it into the job's :class:`Ticket` (the slot passes to the ticket);
    :meth:`close`, or leaving the ``with`` block, frees it if that never happened.
    """

    def __init__(self, guard: Guard, owner: str, provider: str, uses_server_key: bool, logged_in: bool) -> None:
        self._guard = guard
        self.owner = owner
        self.provider = provider
        self._uses_server_key = uses_server_key
        self._logged_in = logged_in
        self._open = True

    def admit(self, estimated_cost_usd: float | None) -> Ticket:
        """The price rules for this job, then its ticket; LimitReached says why not (the place stays held)."""
        if not self._open:
            raise RuntimeError("admit() called on a place that was closed or already admitted")
        return self._guard._admit(self.owner, provider=self.provider, uses_server_key=self._uses_server_key,
                                  estimated_cost_usd=estimated_cost_usd, logged_in=self._logged_in, place=self)

    def close(self) -> None:
        """Free the slot unless it became a ticket. Idempotent."""
        self._guard._leave(self)

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Guard:
    """Admits or refuses jobs by the limits in ``settings`` (see the module docstring).

    ``store`` is the :class:`~avatar_core.store.JobStore` whose file keeps the usage
    ledger; with None the ledger lives in memory and is lost on restart. ``host`` is the
    address the app is bound to (``launch_options()["server_name"]``). ``clock`` returns
    epoch seconds; tests pass a fake one. Make one per process and share it between
    threads and sessions: "in progress" is counted per Guard. ``admit`` and
    ``Ticket.submitted`` commit one SQLite write (about 10 ms, more on a slow disk), so
    async code calls them through ``asyncio.to_thread``; ``Ticket.watch`` already does.
    """

    def __init__(
        self, settings: Settings, store: object | None, *, host: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self._ledger = store if store is not None else _MemoryLedger()
        self._clock = clock
        self.anonymous_may_use_server_keys = server_keys_allowed(settings, host)
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    def admit(
        self,
        owner: str,
        *,
        provider: str,
        uses_server_key: bool,
        estimated_cost_usd: float | None,
        logged_in: bool,
    ) -> Ticket:
        """Reserve a place for one job, or raise :class:`LimitReached` saying why and what to do.

        ``uses_server_key``: the visitor gave no key of their own, so the job would run on
        the server's. Ignored for the local provider, and when the server has no key for
        ``provider`` either (the job then fails with "no API key", spending nothing).
        ``estimated_cost_usd``: from the price table; None when the price is unknown.
        ``logged_in``: the visitor signed in through the app's login (``AVATAR_AUTH``).
        """
        return self._admit(owner, provider=provider, uses_server_key=uses_server_key,
                           estimated_cost_usd=estimated_cost_usd, logged_in=logged_in, place=None)

    def enter(self, owner: str, *, provider: str, uses_server_key: bool, logged_in: bool) -> Place:
        """Take a job slot for ``owner`` before their inputs are checked, or raise :class:`LimitReached`.

        Refuses what needs no price: server keys not open to this visitor, their
        jobs-in-progress limit (the place counts as one), a daily job limit or server
        budget already used up. Nothing is reserved for the day yet; :meth:`Place.admit`
        does that once the price is known. Costs no database write (one read).
        """
        if not isinstance(owner, str) or not owner.strip():
            raise ValueError("owner must be a non-empty string (a user name or a per-browser id)")
        hosted = provider != LOCAL
        paid_by_server = hosted and bool(uses_server_key) and self.settings.has_key(provider)
        if paid_by_server:
            self._check_server_key_use(_provider_label(provider), 0.0, logged_in)
        with self._lock:
            self._check_concurrent(owner)
            if hosted:
                now = self._clock()
                self._check_day(self._ledger.usage(day=utc_day(now), owner=owner), now, paid_by_server, 0)
            self._running[owner] += 1
        return Place(self, owner, provider, bool(uses_server_key), logged_in)

    def _admit(self, owner: str, *, provider: str, uses_server_key: bool, estimated_cost_usd: float | None,
               logged_in: bool, place: Place | None) -> Ticket:
        if not isinstance(owner, str) or not owner.strip():
            raise ValueError("owner must be a non-empty string (a user name or a per-browser id)")
        hosted = provider != LOCAL
        # Without a server key for this provider nothing of the owner's can be spent; the
        # job will stop at "no API key" before any upload, and its reservation is refunded.
        paid_by_server = hosted and bool(uses_server_key) and self.settings.has_key(provider)
        label = _provider_label(provider)
        if paid_by_server:
            self._check_server_key_use(label, estimated_cost_usd, logged_in)
        cost_microusd = None
        if estimated_cost_usd is not None and hosted:
            if not (estimated_cost_usd >= 0 and math.isfinite(estimated_cost_usd)):
                raise ValueError(f"estimated_cost_usd must be a finite amount >= 0, not {estimated_cost_usd!r}")
            cost_microusd = round(estimated_cost_usd * MICROUSD_PER_USD)

        with self._lock:
            if place is None:
                self._check_concurrent(owner)
            elif not place._open:
                raise RuntimeError("admit() called on a place that was closed or already admitted")
            usage_id = None
            if hosted:
                now = self._clock()
                usage_id = self._ledger.reserve_usage(
                    day=utc_day(now),
                    owner=owner,
                    provider=provider,
                    paid_by_server=paid_by_server,
                    cost_microusd=cost_microusd,
                    now=now,
                    check=lambda usage: self._check_day(usage, now, paid_by_server, cost_microusd or 0),
                )
            if place is None:
                self._running[owner] += 1
            else:
                place._open = False  # its slot is the ticket's now
        return Ticket(self, owner, provider, usage_id, paid_by_server=paid_by_server, cost_microusd=cost_microusd)

    def running(self, owner: str) -> int:
        """How many admitted jobs (and places held by :meth:`enter`) of this owner are not closed yet (this process)."""
        with self._lock:
            return self._running[owner]

    def usage_today(self, owner: str) -> Usage:
        """The owner's hosted jobs today and the server keys' estimated spend today."""
        with self._lock:
            return self._ledger.usage(day=utc_day(self._clock()), owner=owner)

    # -- the rules, in the order a visitor is told about them

    def check_resume(self, provider: str, *, uses_server_key: bool, logged_in: bool) -> None:
        """May this visitor resume a job on the server's key? Raise :class:`LimitReached` if not.

        The same rule as a new job's first one (rule 1: signed in, or anonymous use allowed).
        A resume submits nothing, so it neither counts toward the daily limits nor spends.
        Which jobs may be resumed on the server's key (only the visitor's own) is the
        caller's check: this module never sees the job history.
        """
        if uses_server_key and provider != LOCAL and self.settings.has_key(provider):
            self._check_anonymous(_provider_label(provider), logged_in)

    def _check_anonymous(self, label: str, logged_in: bool) -> None:
        if not logged_in and not self.anonymous_may_use_server_keys:
            if auth_credentials(self.settings):
                raise LimitReached(
                    f"This server's keys are only for signed-in users here. Sign in, or enter your own "
                    f"{label} API key to continue."
                )
            raise LimitReached(
                f"This server's keys are not open to visitors here. Enter your own {label} API key to continue."
            )

    def _check_server_key_use(self, label: str, cost_usd: float | None, logged_in: bool) -> None:
        self._check_anonymous(label, logged_in)
        cap = self.settings.daily_spend_cap_usd
        if cap is not None and cap <= 0:
            raise LimitReached(
                f"This server does not pay for videos with its own keys. Enter your own {label} API key to continue."
            )
        if cap is not None and cost_usd is None:
            raise LimitReached(
                f"The price of this {label} model is not published, so this server cannot keep its own keys "
                f"within their daily budget. Enter your own {label} API key to use it, or pick another model."
            )

    def _check_concurrent(self, owner: str) -> None:
        limit = self.settings.max_concurrent_per_visitor
        running = self._running[owner]
        if limit is not None and running >= limit:
            videos = "video" if running == 1 else "videos"
            raise LimitReached(f"You already have {running} {videos} in progress; wait for one to finish.")

    def _check_day(self, usage: Usage, now: float, paid_by_server: bool, cost_microusd: int) -> None:
        midnight = _next_utc_midnight(now)
        resets = f"it resets at 00:00 UTC ({_until(midnight.timestamp() - now)})"
        limit = self.settings.max_daily_jobs_per_visitor
        if limit is not None and usage.jobs >= limit:
            videos = "video" if usage.jobs == 1 else "videos"
            raise LimitReached(
                f"You have made {usage.jobs} {videos} today, the daily limit on this server; {resets}."
            )
        cap = self.settings.daily_spend_cap_usd
        if paid_by_server and cap is not None:
            cap_micro = round(cap * MICROUSD_PER_USD)
            if usage.server_spend_microusd + cost_microusd > cap_micro:
                spent = usage.server_spend_microusd / MICROUSD_PER_USD
                cost = cost_microusd / MICROUSD_PER_USD
                left = "is used up" if usage.server_spend_microusd >= cap_micro else "is nearly used up"
                raise LimitReached(
                    f"This server's daily budget for its own keys ({_usd(cap)}) {left} ({_usd(spent)} spent, "
                    f"this job would cost {_usd(cost)}). Use your own API key, or come back after 00:00 UTC "
                    f"({_until(midnight.timestamp() - now)})."
                )

    # -- ticket callbacks

    def _commit(self, ticket: Ticket, request_id: str | None) -> None:
        with self._lock:
            ticket._submitted = True
            if request_id:
                ticket.request_id = request_id
            if ticket._usage_id is None:
                return
            try:
                self._ledger.commit_usage(ticket._usage_id, request_id=request_id, now=self._clock())
            except Exception:
                # The row stays "reserved" and counted (close() will not release a
                # submitted ticket), so the error can only overcount, never lose money.
                log.exception("usage ledger: could not mark a job as submitted; it stays counted")

    def _settle(self, ticket: Ticket, cost_usd: float | None, video_s: float | None) -> str:
        if ticket._usage_id is None or cost_usd is None or not (cost_usd >= 0 and math.isfinite(cost_usd)):
            return ""
        real = round(cost_usd * MICROUSD_PER_USD)
        before = ticket.cost_microusd
        if real == before:
            return ""
        now = self._clock()
        with self._lock:
            try:
                usage = self._ledger.correct_usage(ticket._usage_id, cost_microusd=real, now=now)
            except Exception:
                log.exception("usage ledger: could not correct a finished job's cost")
                return ""
            ticket.cost_microusd = real
        log.info("usage ledger: job cost corrected from %s to %s micro-USD", before, real)
        cap = self.settings.daily_spend_cap_usd
        if usage is None or not ticket.paid_by_server or cap is None or before is None or real <= before:
            return ""
        cap_micro = round(cap * MICROUSD_PER_USD)
        if usage.server_spend_microusd <= cap_micro:
            return ""
        length = f" is {video_s:.1f} s long, so it" if video_s else ""
        midnight = _next_utc_midnight(now)
        return (
            f"This video{length} cost {_usd(real / MICROUSD_PER_USD)}, more than the "
            f"{_usd(before / MICROUSD_PER_USD)} estimated when it started. That takes this server's daily budget "
            f"for its own keys ({_usd(cap)}) over its limit: {_usd(usage.server_spend_usd)} spent today. New videos "
            f"on the server's keys are refused until 00:00 UTC ({_until(midnight.timestamp() - now)}); use your own "
            "API key to continue."
        )

    def _leave(self, place: Place) -> None:
        with self._lock:
            if not place._open:
                return
            place._open = False
            self._release_slot(place.owner)

    def _release_slot(self, owner: str) -> None:
        self._running[owner] -= 1
        if self._running[owner] <= 0:
            del self._running[owner]

    def _close(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._closed:
                return
            ticket._closed = True
            self._release_slot(ticket.owner)
            if ticket._usage_id is not None and not ticket._submitted:
                try:
                    self._ledger.release_usage(ticket._usage_id)
                except Exception:
                    log.exception("usage ledger: could not refund a job that was never submitted; it stays counted")


# Failures before Submitted after which the provider may still have the job (and bill it).
_MAYBE_SUBMITTED = frozenset({"SubmitUncertain", "InternalError"})


class _WatchedEvents:
    """See :meth:`Ticket.watch`. A class, not an async generator, so that ``aclose()``
    closes the ticket even when iteration never started."""

    def __init__(self, ticket: Ticket, events: AsyncIterator[JobEvent]) -> None:
        self._ticket = ticket
        self._events = events

    def __aiter__(self) -> _WatchedEvents:
        return self

    async def __anext__(self) -> JobEvent:
        try:
            event = await self._events.__anext__()
        except BaseException:  # the end, a cancel (Stop) or a bug: the job is no longer driven
            await self._close()
            raise
        ticket = self._ticket
        if isinstance(event, Done) and ticket.is_submitted and event.cost_usd is not None:
            # The real price, from the video that came back: a committed write, off the loop.
            notice = await asyncio.to_thread(ticket.settle, event.cost_usd, event.duration_s)
            if notice:
                event = replace(event, notice=notice)
        if not ticket.closed:
            maybe = isinstance(event, FailedEvent) and not ticket.is_submitted and event.kind in _MAYBE_SUBMITTED
            if isinstance(event, Submitted) or maybe:
                # A committed SQLite write (an fsync): off the event loop.
                await asyncio.to_thread(ticket.submitted, event.request_id)
        return event

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._ticket.closed:
            return
        try:
            await asyncio.to_thread(self._ticket.close)  # a refund is a committed write: off the loop
        finally:
            if not self._ticket.closed:  # cancelled before the thread ran: close here (idempotent)
                self._ticket.close()


class _MemoryLedger:
    """The usage ledger without a store file (the history could not be opened)."""

    def __init__(self) -> None:
        self._rows: dict[int, dict] = {}
        self._next = 1

    def usage(self, *, day: str, owner: str) -> Usage:
        rows = [r for r in self._rows.values() if r["day"] == day]
        jobs = sum(1 for r in rows if r["owner"] == owner)
        spend = sum(r["cost"] or 0 for r in rows if r["server"])
        return Usage(jobs, spend)

    def reserve_usage(self, *, day, owner, provider, paid_by_server, cost_microusd, now, check) -> int:
        check(self.usage(day=day, owner=owner))
        row_id, self._next = self._next, self._next + 1
        self._rows = {k: r for k, r in self._rows.items() if r["day"] == day}  # keep today only
        self._rows[row_id] = {"day": day, "owner": owner, "server": paid_by_server, "cost": cost_microusd,
                              "submitted": False}
        return row_id

    def commit_usage(self, usage_id: int, *, request_id: str | None, now: float) -> None:
        if usage_id in self._rows:
            self._rows[usage_id]["submitted"] = True

    def correct_usage(self, usage_id: int, *, cost_microusd: int, now: float) -> Usage | None:
        row = self._rows.get(usage_id)
        if row is None:
            return None
        row["cost"] = cost_microusd
        return self.usage(day=row["day"], owner=row["owner"])

    def release_usage(self, usage_id: int) -> bool:
        row = self._rows.get(usage_id)
        if row is None or row["submitted"]:
            return False
        del self._rows[usage_id]
        return True


__all__ = [
    "Guard",
    "LimitReached",
    "Place",
    "Ticket",
    "auth_credentials",
    "is_loopback_host",
    "server_keys_allowed",
    "utc_day",
]
