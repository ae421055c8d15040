"""Retention covers every folder the app writes (issue 14.9).

Old files (modification time set back) in outputs/inputs, outputs/work and leftovers in
outputs/videos are removed by the sweep; new ones, files of jobs the history still
shows, running jobs' files and the history file itself stay. Gradio's upload cache gets
the same age through ``gr.Blocks(delete_cache=...)``.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from avatar_core import ui
from avatar_core.config import Settings, load_settings
from avatar_core.store import JobStore

DAY = 86400.0


def _file(path: Path, age_days: float, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def _job(store, rid, *, status, video=None, owner="browser:x", finished_days_ago=None):
    store.record_submitted(provider="wavespeed", request_id=rid, model="m", tier="standard", version="v1",
                           prompt="", image_name="face.png", audio_name="voice.wav", audio_seconds=5.0,
                           estimated_cost_usd=0.25, owner=owner)
    store.update("wavespeed", rid, status=status, output_path=str(video) if video else None)
    if finished_days_ago is not None:
        with store._write() as conn:
            conn.execute("UPDATE jobs SET finished_at = ? WHERE request_id = ?",
                         (time.time() - finished_days_ago * DAY, rid))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "outputs"


def _settings(out, **kw):
    return Settings(output_dir=out, retention_days=30, retention_max_mb=None, **kw)


def test_the_sweep_removes_old_files_in_every_folder_and_keeps_the_rest(out):
    store = JobStore(out / "jobs.sqlite3")
    old = [
        _file(out / "inputs" / "url-0123456789abcdef.jpg", 40, 100_000),   # a link download
        _file(out / "inputs" / "audio-0123456789abcdef.mp3", 31),          # a refused job's input
        _file(out / "inputs" / "wave-0123456789abcdef.png", 45),
        _file(out / "work" / "local-dead.mp4", 40),                        # a render that never arrived
        _file(out / "videos" / "20260101-wavespeed-x.mp4.part", 40),       # a broken download
        _file(out / "videos" / "orphan.mp4", 60),                          # no row names it
    ]
    new = [
        _file(out / "inputs" / "image-fedcba9876543210.png", 1),
        _file(out / "work" / "local-rendering.mp4", 0),
        _file(out / "videos" / "fresh-orphan.mp4", 29),
    ]
    # The history's videos: a job finished 10 days ago whose file is older (a local render
    # moved into place keeps its render time), and a running job's file.
    in_history = _file(out / "videos" / "kept.mp4", 40)
    running = _file(out / "videos" / "running.mp4", 50)
    _job(store, "r-kept", status="completed", video=in_history, finished_days_ago=10)
    _job(store, "r-run", status="downloading", video=running)
    secret = _file(out / ui.VISITOR_SECRET_FILE, 400)
    outside = _file(out / "notes.txt", 400)  # not a folder the app writes: not ours to judge

    removed = ui.apply_retention(store, _settings(out))

    assert removed == len(old)
    assert [p for p in old if p.exists()] == []
    assert all(p.exists() for p in new)
    assert in_history.exists() and running.exists()
    assert secret.exists() and outside.exists() and (out / "jobs.sqlite3").exists()
    # The history still shows the finished job's video.
    assert [path for path, _ in ui.history_gallery(store.list_jobs(owner="browser:x"))] == [str(in_history)]


def test_a_history_video_goes_when_its_own_retention_ends(out):
    store = JobStore(out / "jobs.sqlite3")
    video = _file(out / "videos" / "done.mp4", 1)
    _job(store, "r-old", status="completed", video=video, finished_days_ago=31)
    assert ui.apply_retention(store, _settings(out)) == 1
    assert not video.exists()
    row = store.get("wavespeed", "r-old")
    assert row.output_path is None and row.metadata["deleted"] is True  # the row stays


def test_without_a_history_videos_are_swept_by_age_too(out):
    old, new = _file(out / "videos" / "a.mp4", 40), _file(out / "videos" / "b.mp4", 2)
    stale_input = _file(out / "inputs" / "url-x.wav", 40)
    assert ui.apply_retention(None, _settings(out)) == 2
    assert not old.exists() and not stale_input.exists() and new.exists()


def test_keep_forever_keeps_everything(out):
    files = [_file(out / "inputs" / "url-x.jpg", 900), _file(out / "work" / "w.mp4", 900),
             _file(out / "videos" / "v.mp4", 900)]
    settings = Settings(output_dir=out, retention_days=None, retention_max_mb=None)
    assert ui.apply_retention(JobStore(out / "jobs.sqlite3"), settings) == 0
    assert all(p.exists() for p in files)
    assert ui.cache_retention(settings) is None


def test_startup_sweeps_even_when_the_history_is_unavailable(out):
    stale = _file(out / "inputs" / "url-x.jpg", 40)
    ui.startup_upkeep(None, _settings(out))
    assert not stale.exists()


def test_reusing_a_checked_input_restarts_its_age(out, tmp_path):
    """A content-addressed input checked again is in use: the sweep must not take it from under the job."""
    from avatar_core.media.inputs import check_image
    from tests.media_factory import make_image

    settings = _settings(out)
    source = make_image(tmp_path / "face.png", "PNG", (400, 500))
    first = check_image(str(source), settings=settings)
    when = time.time() - 40 * DAY
    os.utime(first.path, (when, when))
    again = check_image(str(source), settings=settings)
    assert again.path == first.path
    ui.apply_retention(None, settings)
    assert Path(again.path).exists()


def test_gradio_upload_cache_gets_the_same_age(out):
    import app

    settings = replace(load_settings(env={"AVATAR_OUTPUT_DIR": str(out), "AVATAR_RETENTION_DAYS": "7"},
                                     dotenv_path=None))
    assert ui.cache_retention(settings) == (3600, 7 * 86400)
    demo = app.build_demo(settings)
    assert demo.delete_cache == (3600, 7 * 86400)


# ----------------------------------------------------------------------------- size caps (issue 14.9, review)

MB = 1024 * 1024
HOUR = 3600.0


def _aged(path: Path, age_s: float, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_inputs_and_work_are_held_to_the_size_cap_oldest_first(out):
    settings = Settings(output_dir=out, retention_days=30, retention_max_mb=None, inputs_max_mb=5)
    # Ten 1 MB files, 1..10 hours old, across both folders: 10 MB against a 5 MB cap.
    staggered = [_aged(out / ("inputs" if i % 2 else "work") / f"f{i:02d}.wav", (i + 1) * HOUR, MB)
                 for i in range(10)]  # staggered[9] is the oldest
    running = _aged(out / "inputs" / "audio-running.wav", 20 * HOUR, MB)  # oldest of all, but a job reads it
    young = [_aged(out / "inputs" / "audio-checking.wav", 60, MB),        # a check just wrote it
             _aged(out / "work" / "local-rendering.mp4", 5, MB)]          # a render still writing it
    others = [_aged(out / "videos" / "v.mp4", 20 * HOUR, 3 * MB), _aged(out / "notes.txt", 20 * HOUR, MB)]

    removed = ui.sweep_to_size(settings, in_use=[str(running)])

    # 13 MB counted; the oldest unprotected go until 5 MB: 8 of the 10 staggered files.
    assert removed == 8
    assert [p.name for p in staggered if p.exists()] == ["f00.wav", "f01.wav"]
    assert running.exists() and all(p.exists() for p in young) and all(p.exists() for p in others)
    total = sum(p.stat().st_size for f in ("inputs", "work") for p in (out / f).rglob("*") if p.is_file())
    assert total <= 5 * MB
    # Nothing past the cap, nothing to do; unlimited never deletes.
    assert ui.sweep_to_size(settings, in_use=[str(running)]) == 0
    _aged(out / "inputs" / "more.wav", 30 * HOUR, 50 * MB)
    assert ui.sweep_to_size(replace(settings, inputs_max_mb=None)) == 0


def test_the_cap_is_a_documented_setting():
    assert load_settings(env={}, dotenv_path=None).inputs_max_mb == 2000
    assert load_settings(env={"AVATAR_INPUTS_MAX_MB": "300"}, dotenv_path=None).inputs_max_mb == 300
    assert load_settings(env={"AVATAR_INPUTS_MAX_MB": "unlimited"}, dotenv_path=None).inputs_max_mb is None
    root = Path(__file__).resolve().parents[1]
    for doc in ("README.md", ".env.example"):
        assert "AVATAR_INPUTS_MAX_MB" in (root / doc).read_text(), doc


def test_a_check_that_writes_a_file_sweeps_and_spares_a_running_jobs_inputs(out, tmp_path):
    """The page's input check (no job, no gate) is where new files come from: it sweeps too."""
    import asyncio

    from tests.media_factory import make_image

    settings = Settings(output_dir=out, retention_days=30, retention_max_mb=None, inputs_max_mb=2)
    h = ui.Handlers(settings)
    stale = _aged(out / "inputs" / "audio-0000000000000000.wav", 5 * HOUR, 2 * MB)
    used = _aged(out / "inputs" / "audio-1111111111111111.wav", 6 * HOUR, 2 * MB)

    async def scenario():
        gate = asyncio.Event()

        async def job_events():  # a job still running, reading ``used``
            await gate.wait()
            if False:
                yield None

        job = h.running.start(job_events(), owner="browser:x", inputs=(str(used), "https://x.test/a.png"))
        assert h.running.inputs_in_use() == {str(used)}
        preview, words = await asyncio.to_thread(
            h.check_image, str(make_image(tmp_path / "face.png", "PNG", (400, 500))), "")
        assert preview is not None, words
        assert not stale.exists() and used.exists()
        assert list((out / "inputs").glob("image-*"))  # the new check's own file stays
        # A check reading an old file elsewhere (a Generate's upload) keeps it while it reads.
        being_read = _aged(out / "inputs" / "audio-2222222222222222.wav", 7 * HOUR, 2 * MB)
        with h._checking(str(being_read)):
            await asyncio.to_thread(h.sweep_to_size)
            assert being_read.exists() and used.exists()
        assert not being_read.exists()  # its check is over: the end-of-check sweep took it
        gate.set()
        await job.task
        assert h.running.inputs_in_use() == set()
        assert h.sweep_to_size() == 1  # the job is over: its input is old and over the cap
        assert not used.exists()

    asyncio.run(scenario())


def test_uploads_over_http_are_held_to_the_cap_oldest_first(out, tmp_path, monkeypatch):
    """An upload alone (no check, no job) fills Gradio's cache: each upload is followed by the sweep."""
    import httpx

    import app
    from tests.helpers import free_port

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    settings = replace(load_settings(env={"AVATAR_OUTPUT_DIR": str(out), "AVATAR_INPUTS_MAX_MB": "1"},
                                     dotenv_path=None))
    demo = app.build_demo(settings)
    port = free_port()
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def upload(name: str) -> Path:
            # As a script sends it: distinct 400 KB bodies, straight to the upload route.
            body = name.encode() * (400 * 1024 // len(name))
            r = httpx.post(f"{base}/gradio_api/upload", files={"files": (name, body)}, timeout=30)
            assert r.status_code == 200, r.text
            (path,) = r.json()
            assert Path(path).resolve().is_relative_to(cache.resolve())
            return Path(path)

        first, second = upload("a.bin"), upload("b.bin")
        for path, age in ((first, 2 * HOUR), (second, HOUR)):
            os.utime(path, (time.time() - age,) * 2)
        other_app = _aged(cache / "someone-else" / "big.bin", 5 * HOUR, 2 * MB)  # not this app's file
        third = upload("c.bin")
        # 1.2 MB of this app's uploads against a 1 MB cap: the oldest went, the rest stay.
        assert not first.exists()
        assert second.exists() and third.exists() and other_app.exists()
        fourth = upload("d.bin")  # 1.2 MB again: the hour-old one goes; the others are in their grace period
        assert not second.exists() and third.exists() and fourth.exists()
        fifth = upload("e.bin")   # over the cap, but nothing is old enough: a check may be reading them
        assert third.exists() and fourth.exists() and fifth.exists()
    finally:
        demo.close()
