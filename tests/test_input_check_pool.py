"""Slow input checks must not starve the event loop's thread pool (issue 14 review).

``/generate`` checks a visitor's files in a worker thread, at most
INPUT_CHECK_CONCURRENCY at once. If the waiting for a check slot happened inside
``asyncio.to_thread`` workers, a handful of slow /generate calls (the default executor
has cpu + 4 workers: 6 on this 2-core machine) would fill that pool, and Guard.enter,
check_resume and the download address check (all ``asyncio.to_thread``) would stall
for every visitor. Here the checks are held (the visitor's files are "still decoding")
while more calls arrive than the default pool has workers; a call that needs the
default pool must still run at once, and each visitor still gets past Guard.enter.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import media_factory as mf

import avatar_core.media.inputs as inputs_module
from avatar_core import ui
from avatar_core.config import load_settings
from avatar_core.errors import InputError

DEFAULT_WORKERS = 6  # what asyncio gives a 2-core machine: min(32, cpu + 4)
RELEASED = "The check was let go by the test."


def test_held_input_checks_leave_the_default_thread_pool_free(tmp_path, monkeypatch):
    face, voice = mf.make_portrait(tmp_path / "face.jpg"), mf.make_tone(tmp_path / "voice.mp3", "mp3", 3.0)
    settings = load_settings(env={"AVATAR_OUTPUT_DIR": str(tmp_path / "out")}, dotenv_path=None)
    h = ui.Handlers(settings, store=None, host="127.0.0.1")
    release, inside, lock = threading.Event(), [], threading.Lock()
    most_at_once = [0]

    def held_check(image_src, audio_src, **kw):
        with lock:
            inside.append(1)
            most_at_once[0] = max(most_at_once[0], len(inside))
        try:
            assert release.wait(30), "never released"
            raise InputError(RELEASED)
        finally:
            with lock:
                inside.pop()

    monkeypatch.setattr(inputs_module, "prepare_inputs", held_check)
    callers = DEFAULT_WORKERS + 2
    checking: list[int] = []

    async def visitor(i: int) -> str:
        last = ""
        async for status, _rid, _video, _job in h.generate(image=str(face), audio=str(voice), provider="local",
                                                           request=SimpleNamespace(username=f"visitor-{i}")):
            if "Checking your files" in status:
                checking.append(i)
            last = status
        return last

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=DEFAULT_WORKERS))
        tasks = [asyncio.create_task(visitor(i)) for i in range(callers)]
        try:
            for _ in range(200):  # until every visitor is in (or waiting for) the check
                if len(checking) == callers and len(inside) == ui.INPUT_CHECK_CONCURRENCY:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # any queued thread work has had its chance to pile up
            assert len(inside) == ui.INPUT_CHECK_CONCURRENCY, "the check slots are not all held"
            # What Guard.enter, check_resume and check_host need: the default pool, now.
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 3) == "free"
            assert sorted(checking) == list(range(callers)), "a visitor was stuck before the check"
        finally:
            release.set()
        finals = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert all(RELEASED in f for f in finals), finals

    asyncio.run(main())
    assert most_at_once[0] == ui.INPUT_CHECK_CONCURRENCY  # still at most that many at once
