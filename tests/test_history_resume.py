"""Nothing paid for is lost: a killed process, many jobs at once, an expired result."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import pytest

from tests.helpers import until
from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, JobPlan, tone_video_maker
from avatar_core.events import Done, Submitted
from avatar_core.store import ALL_OWNERS, JobStore
from tests.media_factory import make_portrait, make_tone

ROOT = Path(__file__).resolve().parents[1]
KEY = "history-key-321"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hist")
    return make_portrait(d / "face.png", "PNG", size=(400, 500)), make_tone(d / "voice.wav", "wav", 2.0)


def settings_for(emu, tmp_path, **kw):
    return replace(load_settings(env={}, dotenv_path=None), wavespeed_api_key=Secret(KEY),
                   segmind_api_key=Secret(KEY), wavespeed_base_url=emu.url, segmind_base_url=emu.url,
                   segmind_upload_url=emu.url + "/upload-asset", output_dir=tmp_path / "out",
                   poll_typical_s=1.0, deadline_s=120, **kw)


def test_killed_mid_job_then_resumed_from_the_store(inputs, tmp_path):
    image, audio = inputs
    with Emulator(video_maker=tone_video_maker) as emu:
        emu.plan_jobs(JobPlan(queue_s=0.2, processing_s=600))  # would run for ten minutes
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
        env.update(PYTHONPATH=str(ROOT), AVATAR_OUTPUT_DIR=str(tmp_path / "out"), AVATAR_POLL_TYPICAL_S="1",
                   WAVESPEED_BASE_URL=emu.url, WAVESPEED_API_KEY=KEY)
        cmd = [sys.executable, "-m", "avatar_core", "generate", "--provider", "wavespeed", "--image", str(image),
               "--audio", str(audio)]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        store = JobStore(tmp_path / "out" / "jobs.sqlite3")
        try:
            deadline = time.monotonic() + 60
            rows = []
            while time.monotonic() < deadline:
                rows = store.list_jobs(owner=ALL_OWNERS) if (tmp_path / "out" / "jobs.sqlite3").exists() else []
                if rows and rows[0].status == "processing":
                    break
                time.sleep(0.1)
            assert rows and rows[0].status == "processing", "the job never showed up as processing"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        request_id = rows[0].request_id
        assert store.unfinished(owner=None)[0].request_id == request_id

        emu.complete_job_at(request_id, emu.now())  # the provider finishes while we are down
        events = asyncio.run(_collect(jobs.resume("wavespeed", request_id, settings=settings_for(emu, tmp_path),
                                                  store=store)))
        assert isinstance(events[-1], Done), events[-1]
        with av.open(str(events[-1].path)) as c:
            assert abs(c.duration / 1e6 - 2.0) <= 0.1
        row = store.get("wavespeed", request_id)
        story = [c.status for c in row.status_history]
        assert story[0] == "submitted" and "processing" in story and story[-1] == "completed"
        assert row.output_path == str(events[-1].path) and row.audio_name == "voice.wav"
        assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1
        assert store.unfinished(owner=None) == []


async def _collect(gen):
    return [e async for e in gen]


async def test_many_concurrent_jobs_all_land_in_the_store(inputs, tmp_path):
    image, audio = inputs
    with Emulator(queue_s=0.3, processing_s=1.0, video_maker=tone_video_maker) as emu:
        settings = settings_for(emu, tmp_path)
        store = JobStore(tmp_path / "jobs.sqlite3")
        n = 24

        async def one(i):
            provider = "wavespeed" if i % 2 else "segmind"
            return await _collect(jobs.run_job(provider, image, audio, settings=settings, store=store,
                                               owner=f"visitor-{i}", prompt=f"job {i}"))

        results = await asyncio.gather(*(one(i) for i in range(n)))
        assert all(isinstance(r[-1], Done) for r in results), [r[-1] for r in results if not isinstance(r[-1], Done)]
        assert len(store.list_jobs(owner=ALL_OWNERS, limit=100)) == n
        paths = set()
        for i, events in enumerate(results):
            rid = next(e.request_id for e in events if isinstance(e, Submitted))
            row = store.get("wavespeed" if i % 2 else "segmind", rid)
            assert row.owner == f"visitor-{i}" and row.prompt == f"job {i}" and row.status == "completed"
            assert row.output_path == str(events[-1].path)
            paths.add(row.output_path)
        assert len(paths) == n
        assert len(emu.requests_to("POST", r"^/(api/v3/kwaivgi|v2/kling)")) == n


async def test_resumed_job_whose_result_expired_keeps_its_row(inputs, tmp_path):
    image, audio = inputs
    with Emulator(queue_s=0.1, processing_s=0.2, retention_s=1.0, video_maker=tone_video_maker) as emu:
        settings = settings_for(emu, tmp_path)
        store = JobStore(tmp_path / "jobs.sqlite3")
        gen = jobs.run_job("segmind", image, audio, settings=settings, store=store)
        rid = (await until(gen, Submitted)).request_id
        await gen.aclose()
        await asyncio.sleep(1.3)  # Segmind keeps results for an hour; this emulator for a second
        events = await _collect(jobs.resume("segmind", rid, settings=settings, store=store))
        last = events[-1]
        assert last.kind == "ResultExpired" and rid in last.message
        row = store.get("segmind", rid)
        assert row is not None and row.status == "expired" and row.error
