"""Job history: what was submitted, under which request id, and what became of it.

One SQLite file (``Settings.store_path``) in WAL mode. A row is written the moment a
submit returns, before any polling, so a paid job is never forgotten: if the app or the
process dies, the request id is on disk and the job can be resumed or at least found.

Concurrency: every operation opens its own short-lived connection, so a :class:`JobStore`
can be shared freely between threads, asyncio tasks (call it through
``asyncio.to_thread``; a call takes a few milliseconds) and processes. Writes use
``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of failing on a
read-to-write lock upgrade; transactions hold the lock only for a few statements.

API keys never reach this module: no method has a parameter that could carry one
(there is no ``**kwargs`` anywhere), :class:`~avatar_core.config.Secret` values are
refused, and JSON fields refuse credential-looking names. URL-valued names lose their
query string and user info, which is where signed URLs keep their tokens.

Schema changes go in :data:`_MIGRATIONS`: append a function, never edit an old one.
``PRAGMA user_version`` records how many have been applied.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date as _date
from datetime import timedelta as _timedelta
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from .config import Secret, Settings
from .errors import AvatarError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- statuses

SUBMITTED = "submitted"
QUEUED = "queued"
PROCESSING = "processing"
DOWNLOADING = "downloading"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
EXPIRED = "expired"
# The provider answered the submit but its answer could not be read: a paid job probably
# exists, under a request id we never learned (errors.SubmitUncertain). The row keeps the
# job (and its cost) in the history; its request_id is a placeholder, see UNKNOWN_ID_PREFIX.
ID_UNKNOWN = "id_unknown"

STATUSES: frozenset[str] = frozenset(
    {SUBMITTED, QUEUED, PROCESSING, DOWNLOADING, COMPLETED, FAILED, CANCELLED, TIMED_OUT, EXPIRED, ID_UNKNOWN}
)
# The request_id column is NOT NULL and unique per provider, so a job whose id we never
# learned gets "?unknown-<random>". The "?" is outside every provider's id alphabet and the
# resume form's, so it can never be taken for (or resumed as) a real id.
UNKNOWN_ID_PREFIX = "?unknown-"
# "timed_out" is deliberately NOT terminal: our deadline passed but the remote job is
# left running (see errors.JobTimedOut), so it stays in unfinished() to be resumed, and
# retention never touches it. Every status here is final: the provider is done with it.
# "id_unknown" counts as terminal for this app: without a request id nothing here can follow
# or resume the job (the user finds it in the provider's dashboard).
TERMINAL_STATUSES: frozenset[str] = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED, ID_UNKNOWN})

# --------------------------------------------------------------------------- tuning

# How long a write waits for another thread or process holding the write lock. Our
# transactions last milliseconds (plus one fsync); 10 s rides out a slow disk or a burst
# of writers, yet a wedged lock still surfaces as an error instead of hanging a job.
BUSY_TIMEOUT_S = 10.0
# Completed jobs feeding typical_duration(): enough for a stable median, recent enough
# to follow a provider whose queue got faster or slower this week.
TYPICAL_DURATION_SAMPLE = 20

# Ledger rows are kept this long (a month of usage for the owner to look at), then
# pruned when new ones are written; limits only ever read today's rows.
USAGE_KEEP_DAYS = 35
MICROUSD_PER_USD = 1_000_000
RESERVED = "reserved"  # admitted, submit not yet sent or not yet answered
COMMITTED = "submitted"  # the provider has (or may have) the job: money is spent

# --------------------------------------------------------------------------- types


class StoreError(AvatarError):
    """The job history file cannot be used (corrupt, locked too long, from a newer version)."""


class _AllOwners:
    """Type of :data:`ALL_OWNERS`."""

    _instance: _AllOwners | None = None

    def __new__(cls) -> _AllOwners:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL_OWNERS"

    def __reduce__(self):  # survives pickling/copying as the same sentinel
        return (_AllOwners, ())


ALL_OWNERS = _AllOwners()
"""Pass as ``owner=`` to see every owner's jobs: for the CLI and admins only.

``owner=None`` means "jobs with no owner" (the CLI's own), never "everyone"."""


class Usage(NamedTuple):
    """What the usage ledger holds for one UTC day (see :meth:`JobStore.reserve_usage`).

    ``jobs`` counts the owner's hosted jobs (reserved or submitted); ``server_spend_microusd``
    is the estimated spend of the server's keys that day, all owners together.
    """

    jobs: int
    server_spend_microusd: int

    @property
    def server_spend_usd(self) -> float:
        return self.server_spend_microusd / MICROUSD_PER_USD


class StatusChange(NamedTuple):
    """One line of a job's story: when, which status, and an optional detail."""

    at: float
    status: str
    detail: str | None


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. ``status_history`` is the whole story, oldest first."""

    id: int
    provider: str
    request_id: str
    model: str | None
    tier: str
    version: str
    prompt: str
    image_name: str | None
    audio_name: str | None
    audio_seconds: float | None
    estimated_cost_usd: float | None
    owner: str | None
    created_at: float
    updated_at: float
    status: str
    status_history: tuple[StatusChange, ...]
    provider_timings: dict[str, Any]
    metadata: dict[str, Any]
    output_path: str | None
    error: str | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        """True when the provider is done with the job (see :data:`TERMINAL_STATUSES`)."""
        return self.status in TERMINAL_STATUSES

    @property
    def request_id_known(self) -> bool:
        """False for a job sent to the provider whose request id never reached us (:data:`ID_UNKNOWN`)."""
        return not self.request_id.startswith(UNKNOWN_ID_PREFIX)

    @property
    def duration_s(self) -> float | None:
        """Seconds from submit to the final status, for finished jobs."""
        return None if self.finished_at is None else self.finished_at - self.created_at


# --------------------------------------------------------------------------- schema


def _m1_jobs_table(conn: sqlite3.Connection) -> None:
    # Status is validated in Python, not by CHECK: adding a status later would otherwise
    # need a table rebuild (SQLite cannot alter a CHECK constraint).
    conn.execute(
        """
        CREATE TABLE jobs (
            id                 INTEGER PRIMARY KEY AUTOINCREMENT,
            provider           TEXT NOT NULL,
            request_id         TEXT NOT NULL,
            model              TEXT,
            tier               TEXT NOT NULL,
            version            TEXT NOT NULL,
            prompt             TEXT NOT NULL DEFAULT '',
            image_name         TEXT,
            audio_name         TEXT,
            audio_seconds      REAL,
            estimated_cost_usd REAL,
            owner              TEXT,
            created_at         REAL NOT NULL,
            updated_at         REAL NOT NULL,
            status             TEXT NOT NULL,
            status_history     TEXT NOT NULL DEFAULT '[]',
            provider_timings   TEXT NOT NULL DEFAULT '{}',
            metadata           TEXT NOT NULL DEFAULT '{}',
            output_path        TEXT,
            error              TEXT,
            finished_at        REAL,
            UNIQUE (provider, request_id)
        )
        """
    )


def _m2_indexes(conn: sqlite3.Connection) -> None:
    # list_jobs(owner=...) newest first, unfinished(), typical_duration() and cleanup().
    conn.execute("CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC)")
    conn.execute("CREATE INDEX jobs_status ON jobs (status)")
    conn.execute("CREATE INDEX jobs_duration ON jobs (provider, tier, status, finished_at DESC)")


def _m3_usage_ledger(conn: sqlite3.Connection) -> None:
    # One row per hosted job admitted by guard.Guard: the per-visitor daily count and the
    # daily spend of the server's keys are sums over it, so they survive a restart. Money
    # is whole micro-dollars (per-second prices have four decimals; floats would drift).
    # cost_microusd is NULL when the price is unknown (only allowed on a visitor's own key).
    conn.execute(
        """
        CREATE TABLE usage_ledger (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            day             TEXT NOT NULL,
            owner           TEXT NOT NULL,
            provider        TEXT NOT NULL,
            paid_by_server  INTEGER NOT NULL,
            cost_microusd   INTEGER,
            state           TEXT NOT NULL,
            request_id      TEXT,
            created_at      REAL NOT NULL,
            updated_at      REAL NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX usage_ledger_day_owner ON usage_ledger (day, owner)")
    conn.execute("CREATE INDEX usage_ledger_day_server ON usage_ledger (day, paid_by_server)")


# Applied in order; schema version N means the first N have run. Append only. A
# migration runs inside the caller's transaction: use conn.execute, never
# executescript (it commits on its own) and never commit.
_MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_m1_jobs_table, _m2_indexes, _m3_usage_ledger)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "id, provider, request_id, model, tier, version, prompt, image_name, audio_name, "
    "audio_seconds, estimated_cost_usd, owner, created_at, updated_at, status, status_history, "
    "provider_timings, metadata, output_path, error, finished_at"
)

# --------------------------------------------------------------------------- the store


class JobStore:
    """The job history in one SQLite file. Safe to share across threads and processes.

    ``clock`` returns epoch seconds; tests pass a fake one.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._init_file()

    def __repr__(self) -> str:
        return f"JobStore({str(self.path)!r})"

    # ------------------------------------------------------------------ public API

    def record_submitted(
        self,
        *,
        provider: str,
        request_id: str,
        model: str | None,
        tier: str,
        version: str,
        prompt: str,
        image_name: str | None,
        audio_name: str | None,
        audio_seconds: float | None,
        estimated_cost_usd: float | None,
        owner: str | None = None,
        created_at: float | None = None,
    ) -> JobRecord:
        """Write the row for a job the provider just accepted; durable when this returns.

        Call it the moment submit returns, before polling. If the job is already known
        (resuming it), the existing row is returned unchanged.
        """
        return self._insert(
            provider=provider, request_id=request_id, model=model, tier=tier, version=version, prompt=prompt,
            image_name=image_name, audio_name=audio_name, audio_seconds=audio_seconds,
            estimated_cost_usd=estimated_cost_usd, owner=owner, created_at=created_at,
            status=SUBMITTED, error=None, detail=None,
        )

    def _insert(self, *, provider, request_id, model, tier, version, prompt, image_name, audio_name,
                audio_seconds, estimated_cost_usd, owner, created_at, status, error, detail) -> JobRecord:
        _require_text(provider=provider, request_id=request_id, tier=tier, version=version)
        _require_optional_text(model=model, prompt=prompt, image_name=image_name, audio_name=audio_name)
        _check_owner(owner)
        for name, value in (("audio_seconds", audio_seconds), ("estimated_cost_usd", estimated_cost_usd)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
        now = self._clock()
        created = now if created_at is None else float(created_at)
        history = json.dumps([[created, status, detail]])
        finished_at = created if status in TERMINAL_STATUSES else None
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO jobs (provider, request_id, model, tier, version, prompt, image_name,
                    audio_name, audio_seconds, estimated_cost_usd, owner, created_at, updated_at,
                    status, status_history, error, finished_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (provider, request_id) DO NOTHING
                """,
                (
                    provider,
                    request_id,
                    model,
                    tier,
                    version,
                    prompt or "",
                    _display_name(image_name),
                    _display_name(audio_name),
                    None if audio_seconds is None else float(audio_seconds),
                    None if estimated_cost_usd is None else float(estimated_cost_usd),
                    owner,
                    created,
                    now,
                    status,
                    history,
                    error,
                    finished_at,
                ),
            )
            row = _select_one(conn, provider, request_id)
        assert row is not None
        return row

    def record_id_unknown(
        self,
        *,
        provider: str,
        model: str | None,
        tier: str,
        version: str,
        prompt: str,
        image_name: str | None,
        audio_name: str | None,
        audio_seconds: float | None,
        estimated_cost_usd: float | None,
        error: str,
        owner: str | None = None,
    ) -> JobRecord:
        """Write the row for a submit the provider answered unreadably: a paid job probably
        exists, but its request id is unknown. Status :data:`ID_UNKNOWN`, ``error`` says where
        to find the job; ``request_id`` is a placeholder (:attr:`JobRecord.request_id_known`)."""
        _require_text(error=error)
        return self._insert(
            provider=provider, request_id=UNKNOWN_ID_PREFIX + secrets.token_hex(8), model=model, tier=tier,
            version=version, prompt=prompt, image_name=image_name, audio_name=audio_name,
            audio_seconds=audio_seconds, estimated_cost_usd=estimated_cost_usd, owner=owner, created_at=None,
            status=ID_UNKNOWN, error=error, detail="sent to the provider; its answer could not be read",
        )

    def update(
        self,
        provider: str,
        request_id: str,
        *,
        status: str | None = None,
        detail: str | None = None,
        output_path: str | None = None,
        error: str | None = None,
        provider_timings: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record what happened to a job. ``None`` arguments leave that field as it is.

        The status history gains a line when ``status`` changes or a ``detail`` is given.
        Entering a terminal status sets ``finished_at``; leaving one (a resumed job)
        clears it. ``provider_timings`` and ``metadata`` are merged key by key into what
        is stored. Raises ``KeyError`` for a job that was never recorded and
        ``ValueError`` for an unknown status.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}; expected one of {sorted(STATUSES)}")
        _require_optional_text(detail=detail, output_path=output_path, error=error)
        timings_patch = _json_patch("provider_timings", provider_timings)
        metadata_patch = _json_patch("metadata", metadata)
        now = self._clock()
        with self._write() as conn:
            current = _select_one(conn, provider, request_id)
            if current is None:
                raise KeyError(f"no job recorded for {provider} request {request_id}")
            new_status = current.status if status is None else status
            history = [list(h) for h in current.status_history]
            if new_status != current.status or detail is not None:
                history.append([now, new_status, detail])
            finished_at = current.finished_at
            if new_status in TERMINAL_STATUSES:
                if finished_at is None or current.status not in TERMINAL_STATUSES:
                    finished_at = now
            else:
                finished_at = None
            conn.execute(
                """
                UPDATE jobs SET status = ?, status_history = ?, updated_at = ?, finished_at = ?,
                    output_path = ?, error = ?, provider_timings = ?, metadata = ?
                WHERE id = ?
                """,
                (
                    new_status,
                    json.dumps(history),
                    now,
                    finished_at,
                    current.output_path if output_path is None else output_path,
                    current.error if error is None else error,
                    json.dumps({**current.provider_timings, **timings_patch}),
                    json.dumps({**current.metadata, **metadata_patch}),
                    current.id,
                ),
            )

    def get(self, provider: str, request_id: str) -> JobRecord | None:
        """The job with this provider and request id, or ``None``."""
        with self._read() as conn:
            return _select_one(conn, provider, request_id)

    def list_jobs(self, *, owner: str | _AllOwners | None, limit: int = 100) -> list[JobRecord]:
        """Jobs newest first. ``owner`` is required and is a security boundary.

        A string returns only that owner's jobs, ``None`` only jobs without an owner
        (the CLI's), :data:`ALL_OWNERS` everyone's (CLI/admin use only).
        """
        where, args = _owner_clause(owner)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*args, int(limit)),
            ).fetchall()
        return [_record(r) for r in rows]

    def unfinished(self, *, owner: str | _AllOwners | None) -> list[JobRecord]:
        """Jobs the provider may still be working on (not terminal), newest first.

        Includes ``timed_out`` jobs: our wait ended but the remote job may finish.
        """
        where, args = _owner_clause(owner)
        marks = ", ".join("?" * len(TERMINAL_STATUSES))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE {where} AND status NOT IN ({marks}) "
                "ORDER BY created_at DESC, id DESC",
                (*args, *sorted(TERMINAL_STATUSES)),
            ).fetchall()
        return [_record(r) for r in rows]

    def output_paths(self) -> set[str]:
        """Every output file the history refers to (every owner's, running jobs' included)."""
        with self._read() as conn:
            rows = conn.execute("SELECT output_path FROM jobs WHERE output_path IS NOT NULL").fetchall()
        return {r[0] for r in rows}

    def typical_duration(self, provider: str, tier: str, *, limit: int = TYPICAL_DURATION_SAMPLE) -> float | None:
        """Median seconds from submit to completion over the last ``limit`` completed jobs.

        ``None`` when this provider and tier have never completed a job here.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT finished_at - created_at FROM jobs WHERE provider = ? AND tier = ? AND status = ? "
                "AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
                (provider, tier, COMPLETED, int(limit)),
            ).fetchall()
        durations = [r[0] for r in rows if r[0] is not None and r[0] >= 0]
        return float(statistics.median(durations)) if durations else None

    def cleanup(
        self,
        *,
        max_age_s: float | None,
        max_total_bytes: int | None,
        now: float | None = None,
    ) -> list[JobRecord]:
        """Delete output videos of finished jobs to keep the output folder bounded.

        First every finished job whose ``finished_at`` is more than ``max_age_s`` ago,
        then finished jobs oldest first until all output files referenced by the history
        (running jobs' included) add up to at most ``max_total_bytes``. Rows are kept:
        ``output_path`` is cleared, ``metadata["deleted"]`` is set and the history says
        why. A job that is not finished is never touched, nor a file one of them uses.
        Returns the updated records of the jobs whose output was removed.
        """
        now = self._clock() if now is None else float(now)
        cleaned: list[JobRecord] = []
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE output_path IS NOT NULL ORDER BY finished_at ASC, id ASC"
            ).fetchall()
        records = [_record(r) for r in rows]
        finished = [r for r in records if r.finished and r.finished_at is not None]
        done_ids: set[int] = set()

        if max_age_s is not None:
            detail = f"video deleted: older than {_span(max_age_s)}"
            for rec in finished:
                if now - rec.finished_at > max_age_s:  # type: ignore[operator]
                    out = self._delete_output(rec, now, "age", detail)
                    if out is not None:
                        cleaned.append(out)
                        done_ids.add(rec.id)

        if max_total_bytes is not None:
            sizes = {r.output_path: _file_size(r.output_path) for r in records if r.id not in done_ids}
            total = sum(sizes.values())
            for rec in finished:
                if total <= max_total_bytes:
                    break
                if rec.id in done_ids:
                    continue
                out = self._delete_output(rec, now, "size", "video deleted: output folder over its size limit")
                if out is not None:  # the file is gone now
                    cleaned.append(out)
                    done_ids.add(rec.id)
                    total -= sizes.pop(rec.output_path, 0)
        return cleaned

    # ------------------------------------------------------------------ usage ledger
    # Used by guard.Guard for per-visitor daily limits and the server-key spend cap.

    def usage(self, *, day: str, owner: str) -> Usage:
        """The owner's job count and everyone's server-key spend on ``day`` (YYYY-MM-DD, UTC)."""
        _check_day(day)
        _check_owner(owner)
        with self._read() as conn:
            return _usage(conn, day, owner)

    def reserve_usage(
        self,
        *,
        day: str,
        owner: str,
        provider: str,
        paid_by_server: bool,
        cost_microusd: int | None,
        now: float,
        check: Callable[[Usage], None],
    ) -> int:
        """Atomically check the day's usage and add one reserved job; returns its id.

        ``check`` sees the usage before this job and raises to refuse it: nothing is
        written then, and the exception propagates. The check and the insert run in one
        write transaction, so concurrent reservations (threads or processes) are
        decided one after the other and the last dollar goes to exactly one of them.
        """
        _check_day(day)
        _require_text(owner=owner, provider=provider)
        _check_owner(owner)
        if cost_microusd is not None and (isinstance(cost_microusd, bool) or not isinstance(cost_microusd, int)):
            raise TypeError("cost_microusd must be an int or None")
        cutoff = (_date.fromisoformat(day) - _timedelta(days=USAGE_KEEP_DAYS)).isoformat()
        with self._write() as conn:
            check(_usage(conn, day, owner))
            cur = conn.execute(
                "INSERT INTO usage_ledger (day, owner, provider, paid_by_server, cost_microusd, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (day, owner, provider, int(bool(paid_by_server)), cost_microusd, RESERVED, float(now), float(now)),
            )
            conn.execute("DELETE FROM usage_ledger WHERE day < ?", (cutoff,))
            return int(cur.lastrowid)

    def commit_usage(self, usage_id: int, *, request_id: str | None, now: float) -> None:
        """Mark a reservation as really submitted: it stays counted whatever happens next."""
        _require_optional_text(request_id=request_id)
        with self._write() as conn:
            conn.execute(
                "UPDATE usage_ledger SET state = ?, request_id = COALESCE(?, request_id), updated_at = ? WHERE id = ?",
                (COMMITTED, request_id, float(now), int(usage_id)),
            )

    def correct_usage(self, usage_id: int, *, cost_microusd: int, now: float) -> Usage | None:
        """Set a job's cost to what it really cost (its finished video's length, priced).

        Returns the usage of the row's day and owner afterwards, so a caller can tell
        whether the correction took the day over a cap; None if the row is gone (pruned)."""
        if isinstance(cost_microusd, bool) or not isinstance(cost_microusd, int) or cost_microusd < 0:
            raise TypeError("cost_microusd must be an int >= 0")
        with self._write() as conn:
            row = conn.execute("SELECT day, owner FROM usage_ledger WHERE id = ?", (int(usage_id),)).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE usage_ledger SET cost_microusd = ?, updated_at = ? WHERE id = ?",
                (cost_microusd, float(now), int(usage_id)),
            )
            return _usage(conn, row[0], row[1])

    def correct_job_usage(self, provider: str, request_id: str, *, cost_microusd: int, now: float) -> Usage | None:
        """:meth:`correct_usage` for the ledger row of a job known by its provider and request id.

        For a job finished by ``resume`` (after a restart or a timeout), whose ticket is long
        gone: the row :meth:`commit_usage` linked to the request id gets the real cost. None
        when no row names the job (started elsewhere or from the CLI, never submitted here,
        or pruned after :data:`USAGE_KEEP_DAYS`); nothing is written then.
        """
        _require_text(provider=provider, request_id=request_id)
        with self._read() as conn:
            row = conn.execute(
                "SELECT id FROM usage_ledger WHERE provider = ? AND request_id = ? AND state = ? "
                "ORDER BY id DESC LIMIT 1",
                (provider, request_id, COMMITTED),
            ).fetchone()
        if row is None:
            return None
        return self.correct_usage(int(row[0]), cost_microusd=cost_microusd, now=now)

    def release_usage(self, usage_id: int) -> bool:
        """Drop a reservation that was never submitted (it no longer counts). False if committed."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM usage_ledger WHERE id = ? AND state = ?", (int(usage_id), RESERVED))
            return cur.rowcount > 0

    def schema_version(self) -> int:
        """The ``PRAGMA user_version`` of the file (equals :data:`SCHEMA_VERSION` once opened)."""
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ internals

    def _delete_output(self, rec: JobRecord, now: float, reason: str, detail: str) -> JobRecord | None:
        """Remove one finished job's file and mark its row, re-checked under the write lock."""
        path = rec.output_path
        with self._write() as conn:
            current = _select_one(conn, rec.provider, rec.request_id)
            if current is None or not current.finished or current.output_path != path:
                return None  # changed since we looked (resumed, re-downloaded): leave it
            marks = ", ".join("?" * len(TERMINAL_STATUSES))
            shared = conn.execute(
                f"SELECT 1 FROM jobs WHERE output_path = ? AND id != ? AND status NOT IN ({marks}) LIMIT 1",
                (path, current.id, *sorted(TERMINAL_STATUSES)),
            ).fetchone()
            if shared:
                return None  # a job still in flight uses this file
            try:
                Path(path).unlink(missing_ok=True)  # type: ignore[arg-type]
            except OSError as exc:
                log.warning("could not delete old output %s: %s", path, exc)
                return None
            history = [list(h) for h in current.status_history] + [[now, current.status, detail]]
            meta = {**current.metadata, "deleted": True, "deleted_at": now, "deleted_reason": reason}
            conn.execute(
                "UPDATE jobs SET output_path = NULL, metadata = ?, status_history = ?, updated_at = ? WHERE id = ?",
                (json.dumps(meta), json.dumps(history), now, current.id),
            )
            return _select_one(conn, rec.provider, rec.request_id)

    def _init_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Prompts and owner ids are private: create the file 0600. SQLite gives the
            # -wal and -shm files the same permissions as the database.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the job history file {self.path} ({exc.strerror}). "
                "Set AVATAR_DB_PATH or AVATAR_OUTPUT_DIR to a writable place."
            ) from exc
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"The job history file {self.path} cannot use write-ahead logging (journal mode "
                    f"{mode}); put it on a local disk with AVATAR_DB_PATH."
                )
        with self._write() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The job history file {self.path} was written by a newer version of this app "
                    f"(schema {version}, this one knows {SCHEMA_VERSION}). Update the app or set "
                    "AVATAR_DB_PATH to another file."
                )
            for number in range(version, SCHEMA_VERSION):
                _MIGRATIONS[number](conn)
                log.info("job history %s migrated to schema %d", self.path, number + 1)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _broken(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return StoreError(
                f"The job history file {self.path} stayed locked by another process for more than "
                f"{BUSY_TIMEOUT_S:g} s. Try again; if it persists, close other copies of the app."
            )
        return StoreError(
            f"The job history file {self.path} cannot be used ({exc}). Move it aside or set "
            "AVATAR_DB_PATH to a new file; your videos in the output folder are not affected."
        )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection, closed afterwards; any SQLite error becomes a StoreError."""
        conn = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so transactions are
            # exactly as long as the code below makes them.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            # FULL: a recorded submit must survive a power cut, since it may be a paid
            # job; writes are a handful per job, so the extra fsync costs nothing visible.
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        except sqlite3.Error as exc:
            raise self._broken(exc) from exc
        finally:
            if conn is not None:
                conn.close()

    _read = _connect

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            # IMMEDIATE takes the write lock up front: a deferred transaction that
            # reads then writes can fail with SQLITE_BUSY without waiting at all.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


# --------------------------------------------------------------------------- helpers


def _owner_clause(owner: object) -> tuple[str, tuple]:
    if owner is ALL_OWNERS:
        return "1", ()
    if owner is None:
        return "owner IS NULL", ()
    _check_owner(owner)
    return "owner = ?", (owner,)


def _check_owner(owner: object) -> None:
    if owner is None:
        return
    if not isinstance(owner, str):
        raise TypeError(f"owner must be a string, None or ALL_OWNERS, not {type(owner).__name__}")
    if not owner.strip():
        # An empty id would pool every anonymous browser into one shared history.
        raise ValueError("owner must be a non-empty string (or None for CLI jobs)")


def _require_text(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, Secret):
            raise TypeError(f"{name}: refusing to store a secret")
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string")


def _require_optional_text(**values: object) -> None:
    for name, value in values.items():
        if isinstance(value, Secret):
            raise TypeError(f"{name}: refusing to store a secret")
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, not {type(value).__name__}")


# Names that carry credentials in the JSON we are handed; such a field is a bug upstream.
_CREDENTIAL_NAME = re.compile(r"(api[_-]?key|token|secret|password|authorization|credential)", re.I)


def _json_patch(field: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a mapping")
    _reject_credentials(field, value)
    patch = dict(value)
    try:
        json.dumps(patch)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{field} must be JSON-serialisable: {exc}") from exc
    return patch


def _reject_credentials(where: str, obj: object) -> None:
    if isinstance(obj, Secret):
        raise TypeError(f"{where}: refusing to store a secret")
    if isinstance(obj, Mapping):
        for key, val in obj.items():
            if isinstance(key, str) and _CREDENTIAL_NAME.search(key):
                raise ValueError(f"{where}.{key}: credentials are never stored in the job history")
            _reject_credentials(f"{where}.{key}", val)
    elif isinstance(obj, (list, tuple)):
        for i, val in enumerate(obj):
            _reject_credentials(f"{where}[{i}]", val)


def _display_name(name: str | None) -> str | None:
    """A file name as shown to the user; URLs lose user info, query and fragment (signatures)."""
    if not name or "://" not in name:
        return name
    parts = urlsplit(name)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} seconds"


def _file_size(path: str | None) -> int:
    if not path:
        return 0
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _check_day(day: object) -> None:
    if not isinstance(day, str) or not _DAY.fullmatch(day):
        raise ValueError(f"day must be a UTC date as YYYY-MM-DD, not {day!r}")


def _usage(conn: sqlite3.Connection, day: str, owner: str) -> Usage:
    jobs = conn.execute("SELECT COUNT(*) FROM usage_ledger WHERE day = ? AND owner = ?", (day, owner)).fetchone()[0]
    spend = conn.execute(
        "SELECT COALESCE(SUM(cost_microusd), 0) FROM usage_ledger WHERE day = ? AND paid_by_server = 1", (day,)
    ).fetchone()[0]
    return Usage(int(jobs), int(spend))


def _select_one(conn: sqlite3.Connection, provider: str, request_id: str) -> JobRecord | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE provider = ? AND request_id = ?", (provider, request_id)
    ).fetchone()
    return None if row is None else _record(row)


def _record(row: tuple) -> JobRecord:
    (id_, provider, request_id, model, tier, version, prompt, image_name, audio_name, audio_seconds,
     cost, owner, created_at, updated_at, status, history, timings, metadata, output_path, error,
     finished_at) = row  # fmt: skip
    return JobRecord(
        id=id_,
        provider=provider,
        request_id=request_id,
        model=model,
        tier=tier,
        version=version,
        prompt=prompt,
        image_name=image_name,
        audio_name=audio_name,
        audio_seconds=audio_seconds,
        estimated_cost_usd=cost,
        owner=owner,
        created_at=created_at,
        updated_at=updated_at,
        status=status,
        status_history=tuple(StatusChange(float(t), s, d) for t, s, d in json.loads(history or "[]")),
        provider_timings=json.loads(timings or "{}"),
        metadata=json.loads(metadata or "{}"),
        output_path=output_path,
        error=error,
        finished_at=finished_at,
    )


def open_store(settings: Settings) -> JobStore:
    """The store at ``settings.store_path`` (``output_dir/jobs.sqlite3`` or ``AVATAR_DB_PATH``)."""
    return JobStore(settings.store_path)


__all__ = [
    "ALL_OWNERS",
    "CANCELLED",
    "COMPLETED",
    "DOWNLOADING",
    "EXPIRED",
    "FAILED",
    "ID_UNKNOWN",
    "PROCESSING",
    "QUEUED",
    "SCHEMA_VERSION",
    "STATUSES",
    "SUBMITTED",
    "TERMINAL_STATUSES",
    "TIMED_OUT",
    "UNKNOWN_ID_PREFIX",
    "JobRecord",
    "JobStore",
    "StatusChange",
    "StoreError",
    "Usage",
    "open_store",
]
