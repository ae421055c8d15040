"""Job history store: schema and migration, the story of a job, owners, retention,
concurrent writers (threads, asyncio, processes) and the absence of API keys."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from avatar_core import store as store_mod
from avatar_core.config import Secret, load_settings
from avatar_core.store import (
    ALL_OWNERS,
    SCHEMA_VERSION,
    JobRecord,
    JobStore,
    StatusChange,
    StoreError,
    open_store,
)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def submit(js: JobStore, request_id: str, **over) -> JobRecord:
    fields = dict(
        provider="wavespeed",
        request_id=request_id,
        model="kwaivgi/kling-v1-ai-avatar-standard",
        tier="standard",
        version="v1",
        prompt=f"prompt for {request_id}",
        image_name="portrait.png",
        audio_name="voice.wav",
        audio_seconds=7.5,
        estimated_cost_usd=0.42,
    )
    fields.update(over)
    return js.record_submitted(**fields)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def js(tmp_path: Path, clock: FakeClock) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3", clock=clock)


# --------------------------------------------------------------------------- schema


def test_new_file_is_wal_current_schema_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "jobs.sqlite3"
    js = JobStore(path)
    assert js.schema_version() == SCHEMA_VERSION >= 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Opening again is a no-op, not a second migration.
    JobStore(path)
    assert js.schema_version() == SCHEMA_VERSION


def test_old_version_file_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:  # a file as written by schema version 1
        store_mod._MIGRATIONS[0](conn)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO jobs (provider, request_id, model, tier, version, prompt, created_at, updated_at, "
            "status, status_history) VALUES ('segmind', 'old-1', 'm', 'pro', 'v1', 'hi', 10.0, 10.0, "
            "'completed', '[[10.0, \"submitted\", null]]')"
        )
    conn.close()

    js = JobStore(path)

    assert js.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert {"jobs_owner_created", "jobs_status", "jobs_duration"} <= indexes
    old = js.get("segmind", "old-1")
    assert old is not None and old.prompt == "hi" and old.status == "completed"
    assert old.status_history == (StatusChange(10.0, "submitted", None),)


def test_each_migration_runs_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    path = tmp_path / "jobs.sqlite3"
    JobStore(path)  # at the current version
    extra = lambda conn: (calls.append("v3"), conn.execute("ALTER TABLE jobs ADD COLUMN note TEXT"))  # noqa: E731
    monkeypatch.setattr(store_mod, "_MIGRATIONS", (*store_mod._MIGRATIONS, extra))
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    js = JobStore(path)
    JobStore(path)
    assert calls == ["v3"]
    assert js.schema_version() == SCHEMA_VERSION + 1


def test_failed_migration_leaves_file_at_old_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("THIS IS NOT SQL")

    monkeypatch.setattr(store_mod, "_MIGRATIONS", (*store_mod._MIGRATIONS, broken))
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError):
        JobStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    conn.close()


def test_newer_or_corrupt_file_gives_a_clear_error(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer version"):
        JobStore(newer)

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="AVATAR_DB_PATH"):
        JobStore(garbage)


def test_open_store_uses_settings_path(tmp_path: Path) -> None:
    s = load_settings({"AVATAR_OUTPUT_DIR": str(tmp_path / "out")}, dotenv_path=None)
    assert open_store(s).path == tmp_path / "out" / "jobs.sqlite3"
    assert (tmp_path / "out" / "jobs.sqlite3").is_file()
    s = load_settings(
        {"AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_DB_PATH": str(tmp_path / "db" / "h.db")},
        dotenv_path=None,
    )
    assert open_store(s).path == tmp_path / "db" / "h.db"


# --------------------------------------------------------------------------- a job's story


def test_record_and_update_tell_the_whole_story(js: JobStore, clock: FakeClock) -> None:
    t0 = clock.t
    rec = submit(js, "req-1", owner="alice")
    assert rec.status == "submitted" and rec.created_at == t0 and rec.finished_at is None
    assert rec.status_history == (StatusChange(t0, "submitted", None),)
    assert (rec.audio_seconds, rec.estimated_cost_usd, rec.owner) == (7.5, 0.42, "alice")

    clock.advance(5)
    js.update("wavespeed", "req-1", status="queued", detail="position 3")
    clock.advance(5)
    js.update("wavespeed", "req-1", status="queued")  # no change, no detail: nothing to add
    js.update("wavespeed", "req-1", status="processing")
    clock.advance(30)
    js.update("wavespeed", "req-1", detail="50%")  # same status, a detail: a line
    clock.advance(30)
    js.update("wavespeed", "req-1", status="downloading", provider_timings={"inference_s": 55.0})
    clock.advance(2)
    js.update(
        "wavespeed",
        "req-1",
        status="completed",
        output_path="/out/req-1.mp4",
        provider_timings={"queue_s": 10.0},
        metadata={"duration_s": 7.5},
    )

    done = js.get("wavespeed", "req-1")
    assert done is not None
    assert [(h.at - t0, h.status, h.detail) for h in done.status_history] == [
        (0, "submitted", None),
        (5, "queued", "position 3"),
        (10, "processing", None),
        (40, "processing", "50%"),
        (70, "downloading", None),
        (72, "completed", None),
    ]
    assert done.status == "completed" and done.finished and done.finished_at == t0 + 72
    assert done.duration_s == 72
    assert done.output_path == "/out/req-1.mp4"
    assert done.provider_timings == {"inference_s": 55.0, "queue_s": 10.0}  # merged, not replaced
    assert done.metadata == {"duration_s": 7.5}
    assert done.updated_at == t0 + 72
    # Untouched fields survive updates.
    assert (done.prompt, done.image_name, done.owner) == ("prompt for req-1", "portrait.png", "alice")


def test_failure_keeps_error_and_resume_after_timeout_clears_nothing_wrong(js: JobStore, clock: FakeClock) -> None:
    submit(js, "a")
    js.update("wavespeed", "a", status="failed", error="Content blocked by the provider.")
    a = js.get("wavespeed", "a")
    assert a.finished and a.error == "Content blocked by the provider." and a.finished_at == clock.t

    submit(js, "b")
    clock.advance(3600)
    js.update("wavespeed", "b", status="timed_out", detail="deadline 3600 s")
    b = js.get("wavespeed", "b")
    assert not b.finished and b.finished_at is None  # remote job may still finish
    clock.advance(60)
    js.update("wavespeed", "b", status="processing", detail="resumed")
    js.update("wavespeed", "b", status="completed", output_path="/o/b.mp4")
    b = js.get("wavespeed", "b")
    assert b.finished_at == clock.t and [h.status for h in b.status_history] == [
        "submitted",
        "timed_out",
        "processing",
        "completed",
    ]


def test_update_rejects_unknown_status_and_unknown_job(js: JobStore) -> None:
    submit(js, "x")
    with pytest.raises(ValueError, match="unknown job status"):
        js.update("wavespeed", "x", status="IN_PROGRESS")
    with pytest.raises(KeyError):
        js.update("wavespeed", "never-recorded", status="queued")
    assert js.get("wavespeed", "x").status == "submitted"


def test_duplicate_record_submitted_returns_existing_row_unchanged(js: JobStore, clock: FakeClock) -> None:
    first = submit(js, "dup", owner="alice")
    js.update("wavespeed", "dup", status="processing")
    clock.advance(100)
    again = submit(js, "dup", owner="bob", prompt="something else")
    assert again == js.get("wavespeed", "dup")
    assert again.id == first.id and again.owner == "alice" and again.prompt == first.prompt
    assert again.status == "processing" and again.created_at == first.created_at
    assert len(js.list_jobs(owner=ALL_OWNERS)) == 1
    # Same request id at another provider is another job.
    other = submit(js, "dup", provider="segmind")
    assert other.id != first.id


def test_get_missing_is_none(js: JobStore) -> None:
    assert js.get("wavespeed", "nope") is None


# --------------------------------------------------------------------------- owners


def test_owner_isolation(js: JobStore, clock: FakeClock) -> None:
    for i, owner in enumerate(["alice", "bob", None, "alice", "browser-7f3a"]):
        clock.advance(1)
        submit(js, f"r{i}", owner=owner)

    assert [j.request_id for j in js.list_jobs(owner="alice")] == ["r3", "r0"]  # newest first
    assert [j.request_id for j in js.list_jobs(owner="bob")] == ["r1"]
    assert [j.request_id for j in js.list_jobs(owner=None)] == ["r2"]  # None = CLI jobs, not everyone
    assert [j.request_id for j in js.list_jobs(owner="mallory")] == []
    assert [j.request_id for j in js.list_jobs(owner=ALL_OWNERS)] == ["r4", "r3", "r2", "r1", "r0"]
    assert [j.request_id for j in js.list_jobs(owner=ALL_OWNERS, limit=2)] == ["r4", "r3"]
    # SQL-looking owner ids are just strings.
    assert js.list_jobs(owner="alice' OR '1'='1") == []
    assert js.unfinished(owner="bob")[0].request_id == "r1"
    assert len(js.unfinished(owner=ALL_OWNERS)) == 5


def test_owner_must_be_chosen_explicitly(js: JobStore) -> None:
    with pytest.raises(TypeError):
        js.list_jobs()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        js.unfinished()  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        js.list_jobs(owner="  ")
    with pytest.raises(ValueError):
        submit(js, "e", owner="")
    with pytest.raises(TypeError):
        js.list_jobs(owner=42)  # type: ignore[arg-type]
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(ALL_OWNERS)) is ALL_OWNERS
    assert copy.deepcopy(ALL_OWNERS) is ALL_OWNERS


# --------------------------------------------------------------------------- unfinished, durations


def test_unfinished_lists_jobs_the_provider_may_still_run(js: JobStore, clock: FakeClock) -> None:
    statuses = ["submitted", "queued", "processing", "downloading", "timed_out", "completed", "failed",
                "cancelled", "expired"]  # fmt: skip
    for s in statuses:
        clock.advance(1)
        submit(js, s)
        if s != "submitted":
            js.update("wavespeed", s, status=s)
    assert [j.request_id for j in js.unfinished(owner=None)] == [
        "timed_out",
        "downloading",
        "processing",
        "queued",
        "submitted",
    ]


def test_typical_duration_is_the_median_of_recent_completions(js: JobStore, clock: FakeClock) -> None:
    assert js.typical_duration("wavespeed", "standard") is None
    for i, secs in enumerate([100, 300, 200, 10_000]):
        rid = f"ok{i}"
        submit(js, rid)
        clock.advance(secs)
        js.update("wavespeed", rid, status="completed")
    # Failures, other tiers and other providers do not count.
    submit(js, "bad")
    clock.advance(5)
    js.update("wavespeed", "bad", status="failed")
    submit(js, "pro", tier="pro")
    clock.advance(900)
    js.update("wavespeed", "pro", status="completed")
    submit(js, "seg", provider="segmind")
    clock.advance(1)
    js.update("segmind", "seg", status="completed")

    assert js.typical_duration("wavespeed", "standard") == 250.0  # median(100, 300, 200, 10000)
    assert js.typical_duration("wavespeed", "standard", limit=3) == 300.0  # newest three: 300, 200, 10000
    assert js.typical_duration("wavespeed", "pro") == 900.0
    assert js.typical_duration("segmind", "pro") is None


# --------------------------------------------------------------------------- retention


def _finished_with_file(js: JobStore, clock: FakeClock, dir_: Path, rid: str, size: int, status="completed") -> Path:
    path = dir_ / f"{rid}.mp4"
    path.write_bytes(b"\0" * size)
    submit(js, rid)
    clock.advance(1)
    js.update("wavespeed", rid, status=status, output_path=str(path))
    return path


def test_cleanup_by_age_deletes_old_files_and_keeps_rows(js: JobStore, clock: FakeClock, tmp_path: Path) -> None:
    old = _finished_with_file(js, clock, tmp_path, "old", 1000)
    clock.advance(10 * 86400)
    new = _finished_with_file(js, clock, tmp_path, "new", 1000)

    cleaned = js.cleanup(max_age_s=7 * 86400, max_total_bytes=None)

    assert [r.request_id for r in cleaned] == ["old"]
    assert not old.exists() and new.exists()
    row = js.get("wavespeed", "old")
    assert row.output_path is None and row.metadata["deleted"] is True and row.metadata["deleted_reason"] == "age"
    assert row.status == "completed"
    assert row.status_history[-1].detail == "video deleted: older than 7 days"
    assert js.get("wavespeed", "new").output_path == str(new)
    assert js.cleanup(max_age_s=7 * 86400, max_total_bytes=None) == []  # nothing left to do


def test_cleanup_by_size_removes_oldest_first_until_under_limit(js: JobStore, clock: FakeClock, tmp_path: Path) -> None:
    paths = [_finished_with_file(js, clock, tmp_path, f"j{i}", 1000) for i in range(5)]
    cleaned = js.cleanup(max_age_s=None, max_total_bytes=2500)
    assert [r.request_id for r in cleaned] == ["j0", "j1", "j2"]
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert all(r.metadata["deleted_reason"] == "size" for r in cleaned)
    assert js.cleanup(max_age_s=None, max_total_bytes=2000) == []  # exactly at the limit is fine


def test_cleanup_never_touches_unfinished_jobs(js: JobStore, clock: FakeClock, tmp_path: Path) -> None:
    running_files = {}
    for status in ["submitted", "queued", "processing", "downloading", "timed_out"]:
        p = tmp_path / f"{status}.mp4.part"
        p.write_bytes(b"\1" * 5000)
        submit(js, status)
        js.update("wavespeed", status, status=status, output_path=str(p))
        running_files[status] = p
    clock.advance(365 * 86400)
    old_done = _finished_with_file(js, clock, tmp_path, "done", 10)
    # A finished job whose output path is a file a running job still writes to.
    submit(js, "shares")
    js.update("wavespeed", "shares", status="failed", output_path=str(running_files["downloading"]))
    clock.advance(365 * 86400)

    cleaned = js.cleanup(max_age_s=0, max_total_bytes=0)

    assert [r.request_id for r in cleaned] == ["done"]
    assert not old_done.exists()
    assert all(p.exists() and p.stat().st_size == 5000 for p in running_files.values())
    for status, p in running_files.items():
        row = js.get("wavespeed", status)
        assert row.output_path == str(p) and "deleted" not in row.metadata
        assert row.status == status
    assert js.get("wavespeed", "shares").output_path == str(running_files["downloading"])


def test_cleanup_marks_finished_rows_whose_file_is_already_gone(js: JobStore, clock: FakeClock, tmp_path: Path) -> None:
    p = _finished_with_file(js, clock, tmp_path, "gone", 10, status="expired")
    p.unlink()
    clock.advance(100)
    assert [r.request_id for r in js.cleanup(max_age_s=50, max_total_bytes=None)] == ["gone"]
    assert js.get("wavespeed", "gone").output_path is None


# --------------------------------------------------------------------------- concurrency


STORY = ["queued", "processing", "downloading", "completed"]


def _write_story(js: JobStore, tag: str, i: int) -> None:
    rid = f"{tag}-{i}"
    js.record_submitted(
        provider="wavespeed",
        request_id=rid,
        model="m",
        tier="standard",
        version="v1",
        prompt=f"prompt {rid}",
        image_name=f"{rid}.png",
        audio_name=None,
        audio_seconds=float(i),
        estimated_cost_usd=None,
        owner=tag,
    )
    for s in STORY:
        js.update("wavespeed", rid, status=s, detail=rid, metadata={s: rid})
    js.update("wavespeed", rid, output_path=f"/out/{rid}.mp4")


def _process_writer(path: str, tag: str, n: int, start) -> None:  # runs in a spawned process
    js = JobStore(Path(path))
    start.wait(60)  # begin together with the parent's threads, so the writers really overlap
    for i in range(n):
        _write_story(js, tag, i)


def _assert_all_landed(js: JobStore, expected: dict[str, int]) -> None:
    rows = js.list_jobs(owner=ALL_OWNERS, limit=10_000)
    assert len(rows) == sum(expected.values())
    assert len({r.id for r in rows}) == len(rows)
    for tag, n in expected.items():
        mine = js.list_jobs(owner=tag, limit=10_000)
        assert sorted(r.request_id for r in mine) == sorted(f"{tag}-{i}" for i in range(n))
        for r in mine:
            rid = r.request_id
            assert r.prompt == f"prompt {rid}" and r.image_name == f"{rid}.png"
            assert [h.status for h in r.status_history] == ["submitted", *STORY]
            assert [h.detail for h in r.status_history[1:]] == [rid] * len(STORY)
            assert r.metadata == {s: rid for s in STORY}
            assert r.output_path == f"/out/{rid}.mp4" and r.finished_at is not None


async def test_many_threads_tasks_and_processes_write_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    js = JobStore(path)
    ctx = multiprocessing.get_context("spawn")  # a truly separate interpreter and SQLite
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_process_writer, args=(str(path), f"proc{k}", 12, start)) for k in range(2)]
    for p in procs:
        p.start()
    await asyncio.to_thread(start.wait, 60)

    threads = [threading.Thread(target=_write_story, args=(js, "thread", i)) for i in range(24)]
    for t in threads:
        t.start()
    await asyncio.gather(*(asyncio.to_thread(_write_story, js, "task", i) for i in range(24)))
    for t in threads:
        t.join(60)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0

    _assert_all_landed(js, {"thread": 24, "task": 24, "proc0": 12, "proc1": 12})


def test_duplicate_submits_racing_make_one_row(js: JobStore) -> None:
    barrier = threading.Barrier(16)
    ids: list[int] = []

    def go() -> None:
        barrier.wait()
        ids.append(submit(js, "same").id)

    threads = [threading.Thread(target=go) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == 16 and len(set(ids)) == 1
    assert len(js.list_jobs(owner=ALL_OWNERS)) == 1


# --------------------------------------------------------------------------- no keys, ever


def test_record_and_update_have_no_parameter_that_could_carry_a_key() -> None:
    sig = inspect.signature(JobStore.record_submitted)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    assert {p.name for p in params} == {
        "provider", "request_id", "model", "tier", "version", "prompt", "image_name", "audio_name",
        "audio_seconds", "estimated_cost_usd", "owner", "created_at",
    }  # fmt: skip
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    for method in (JobStore.record_submitted, JobStore.update, JobStore.__init__):
        kinds = {p.kind for p in inspect.signature(method).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
        names = " ".join(inspect.signature(method).parameters)
        assert not any(w in names for w in ("key", "token", "secret", "auth"))
    with pytest.raises(TypeError):
        submit(JobStore.__new__(JobStore), "x", api_key="sk-live")  # type: ignore[call-arg]


def test_the_database_never_contains_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    key = "wsk_TEST_7c1e5b0d9a4f4e2a8b3c6d1e0f9a8b7c"
    monkeypatch.setenv("WAVESPEED_API_KEY", key)
    settings = load_settings(dotenv_path=None)
    assert settings.wavespeed_api_key.get() == key  # the key is live in this process

    js = JobStore(tmp_path / "jobs.sqlite3", clock=clock)
    submit(js, "k1", owner="alice", image_name="https://user:pw@cdn.example/p.png?X-Amz-Signature=abc#frag")
    js.update("wavespeed", "k1", status="processing", detail="running")
    js.update("wavespeed", "k1", status="completed", output_path=str(tmp_path / "k1.mp4"),
              provider_timings={"inference": 1.0}, metadata={"video_url": "https://cdn.example/v.mp4"})  # fmt: skip
    assert js.get("wavespeed", "k1").image_name == "https://cdn.example/p.png"  # no user info, no signature

    # Secrets and credential-named fields are refused outright.
    with pytest.raises(TypeError, match="secret"):
        submit(js, "k2", prompt=settings.wavespeed_api_key)
    with pytest.raises(ValueError, match="credentials"):
        js.update("wavespeed", "k1", metadata={"headers": {"Authorization": f"Bearer {key}"}})
    with pytest.raises(TypeError, match="secret"):
        js.update("wavespeed", "k1", provider_timings={"x": [Secret(key)]})
    assert js.get("wavespeed", "k2") is None

    blob = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite3*"))
    assert b"k1" in blob and b"prompt for k1" in blob  # we are reading the right bytes
    assert key.encode() not in blob
    assert b"X-Amz-Signature" not in blob and b"pw@" not in blob
