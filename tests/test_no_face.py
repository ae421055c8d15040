"""A portrait with no face in it (issue 13, item 5).

Hosted providers: refused before anything is uploaded or submitted, with words saying why
and what to do; the emulator must see no request at all. The Local preview: it animates
the picture anyway, and the finished status (the CLI's done line, the jobs layer's Done
event, the app's status panel) says plainly that no face was found and what that means.
The launched-app versions of both are in tests/test_app.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatar_core import ui
from avatar_core.config import Settings
from avatar_core.emulator import Emulator, tone_video_maker
from avatar_core.events import Done
from avatar_core.jobs import run_job
from avatar_core.providers import LABELS
from avatar_core.render import NO_FACE_NOTE
from avatar_core.store import JobStore
from tests.helpers import collect
from tests.media_factory import make_portrait, make_tone
from tests.mp4check import check_mp4

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"wavespeed": "ws-noface-key-1", "segmind": "sg-noface-key-2", "fal": "fal-noface-key-3",
        "replicate": "r8_noface_token_4", "kling": "ak-noface-5:sk-noface-6"}
AUDIO_S = 2.0


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.2, processing_s=0.3, video_maker=tone_video_maker, api_keys=KEYS) as e:
        yield e


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    return make_tone(tmp_path_factory.mktemp("noface") / "voice.mp3", "mp3", AUDIO_S)


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    return make_portrait(tmp_path_factory.mktemp("face") / "face.jpg", "JPEG", size=(480, 600))


def emu_env(emu) -> dict[str, str]:
    access, secret = KEYS["kling"].split(":")
    return {
        "WAVESPEED_BASE_URL": emu.url, "WAVESPEED_API_KEY": KEYS["wavespeed"],
        "SEGMIND_BASE_URL": emu.url, "SEGMIND_UPLOAD_URL": emu.url + "/upload-asset",
        "SEGMIND_API_KEY": KEYS["segmind"],
        "FAL_BASE_URL": emu.url, "FAL_KEY": KEYS["fal"],
        "REPLICATE_BASE_URL": emu.url, "REPLICATE_API_TOKEN": KEYS["replicate"],
        "KLING_BASE_URL": emu.url, "KLING_ACCESS_KEY": access, "KLING_SECRET_KEY": secret,
    }


def run_cli(args, env_extra, tmp_path, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_DB_PATH": str(tmp_path / "jobs.sqlite3"),
                "AVATAR_POLL_TYPICAL_S": "1", "PYTHONPATH": str(ROOT), **env_extra})
    return subprocess.run([sys.executable, "-m", "avatar_core", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- hosted: refused


@pytest.mark.parametrize("provider", ["wavespeed", "segmind", "fal", "replicate", "kling"])
def test_cli_refuses_a_cat_for_a_hosted_provider_before_any_request(emu, corpus, voice, tmp_path, provider):
    emu.reset()
    extra = ["--version", "v2"] if provider == "replicate" else []  # Replicate hosts v2 only
    proc = run_cli(["generate", "--provider", provider, "--image", str(corpus.image("cat")), "--audio", str(voice),
                    *extra], emu_env(emu), tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: No face was found in the portrait"), proc.stderr
    assert f"nothing was sent to {LABELS[provider]} and nothing was paid" in error
    assert "one face looks at the camera" in error and "Local preview" in error
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout
    assert list(emu.requests) == []  # no upload, no submit, not even a status read


def test_cli_control_a_portrait_reaches_the_same_emulator(emu, portrait, voice, tmp_path):
    """Without this, "no request" above could mean the CLI was never pointed at the emulator."""
    emu.reset()
    proc = run_cli(["generate", "--provider", "wavespeed", "--image", str(portrait), "--audio", str(voice)],
                   emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1
    assert "No face" not in proc.stdout + proc.stderr


async def test_app_handlers_refuse_a_cat_for_a_hosted_provider(emu, corpus, voice, tmp_path):
    emu.reset()
    settings = Settings(output_dir=tmp_path / "out", wavespeed_base_url=emu.url)
    h = ui.Handlers(settings)
    frames = [f async for f in h.generate(str(corpus.image("cat")), str(voice), "wavespeed",
                                          api_key=KEYS["wavespeed"])]
    status, rid, video, job = frames[-1]
    assert "### The video could not be made" in status
    assert "No face was found in the portrait" in status and "nothing was sent to WaveSpeed" in status
    assert video is None and job is None and rid == ""
    assert list(emu.requests) == []


# ----------------------------------------------------------------------------- local: animated, and said so


def test_cli_local_preview_animates_a_cat_and_its_done_line_says_no_face(corpus, voice, tmp_path):
    out = tmp_path / "cat.mp4"
    proc = run_cli(["generate", "--provider", "local", "--image", str(corpus.image("cat")), "--audio", str(voice),
                    "--out", str(out)], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    done = lines[-2]
    assert f"done: {AUDIO_S:.1f} s. {NO_FACE_NOTE}" in done, done
    assert "No face was found in the portrait, so the mouth does not move" in done
    report = check_mp4(out, AUDIO_S)  # a real, playable video all the same
    assert report.fps == 25


def test_cli_local_preview_with_a_face_says_nothing_extra(portrait, voice, tmp_path):
    proc = run_cli(["generate", "--provider", "local", "--image", str(portrait), "--audio", str(voice)], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2].endswith(f"done: {AUDIO_S:.1f} s")


async def test_jobs_done_event_carries_the_note_and_the_history_keeps_it(corpus, voice, portrait, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    settings = Settings(output_dir=tmp_path / "out")
    cat_done = (await collect(run_job("local", corpus.image("cat"), voice, settings=settings, store=store)))[-1]
    face_done = (await collect(run_job("local", portrait, voice, settings=settings, store=store)))[-1]
    assert isinstance(cat_done, Done) and isinstance(face_done, Done)
    assert cat_done.note == NO_FACE_NOTE and cat_done.metadata["face_found"] is False
    assert face_done.note == "" and face_done.metadata["face_found"] is True
    record = store.get("local", cat_done.request_id)
    assert record.status == "completed" and tuple(record.status_history[-1][1:]) == ("completed", NO_FACE_NOTE)
    assert store.get("local", face_done.request_id).status_history[-1][2] is None


async def test_app_status_panel_says_no_face_when_the_local_preview_is_done(corpus, voice, portrait, tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path / "out"))
    frames = [f async for f in h.generate(str(corpus.image("cat")), str(voice), "local")]
    status, _rid, video, job = frames[-1]
    headline = status.splitlines()[0]
    assert headline.startswith("### Done in") and headline.endswith(", but no face was found in the portrait")
    assert "the mouth does not move" in status and "choose a photo where one face looks at the camera" in status
    assert video and Path(video).is_file() and job
    frames = [f async for f in h.generate(str(portrait), str(voice), "local")]
    status = frames[-1][0]
    assert status.startswith("### Done in") and "face" not in status.lower()
