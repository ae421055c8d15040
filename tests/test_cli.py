"""The command line as a user runs it: a subprocess, settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from avatar_core.emulator import Emulator, Fault, tone_video_maker
from tests.media_factory import make_portrait, make_tone

ROOT = Path(__file__).resolve().parents[1]
KEY = "cli-secret-key-789"


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.2, processing_s=0.5, video_maker=tone_video_maker) as e:
        yield e


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return make_portrait(d / "face.jpg", "JPEG", size=(480, 600)), make_tone(d / "voice.mp3", "mp3", 2.2)


def run_cli(args, env_extra, tmp_path, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_POLL_TYPICAL_S": "1", "PYTHONPATH": str(ROOT),
                **env_extra})
    return subprocess.run([sys.executable, "-m", "avatar_core", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def emu_env(emu, key=KEY):
    return {"WAVESPEED_BASE_URL": emu.url, "WAVESPEED_API_KEY": key, "SEGMIND_BASE_URL": emu.url,
            "SEGMIND_UPLOAD_URL": emu.url + "/upload-asset", "SEGMIND_API_KEY": key}


def duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return c.duration / 1e6


@pytest.mark.parametrize("provider", ["wavespeed", "segmind"])
def test_generate_against_the_emulator(emu, inputs, tmp_path, provider):
    emu.reset()
    image, audio = inputs
    out = tmp_path / "video.mp4"
    proc = run_cli(["generate", "--provider", provider, "--tier", "pro", "--image", str(image), "--audio", str(audio),
                    "--prompt", "nod", "--out", str(out)], emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out) and out.is_file()
    assert abs(duration(out) - 2.2) <= 0.1
    assert any("submitted to" in line and "request id" in line for line in lines)
    assert any("done" in line for line in lines)
    assert KEY not in proc.stdout + proc.stderr
    submits = emu.requests_to("POST", r"^/(api/v3/kwaivgi|v2/kling)")
    assert len(submits) == 1
    assert "pro" in submits[0].path
    assert (submits[0].json.get("prompt")) == "nod"


def test_generate_local_works_offline(inputs, tmp_path):
    image, audio = inputs
    proc = run_cli(["generate", "--provider", "local", "--image", str(image), "--audio", str(audio)], {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and abs(duration(path) - 2.2) <= 0.1


def test_failure_is_one_line_on_stderr_and_nonzero(emu, inputs, tmp_path):
    emu.reset()
    image, audio = inputs
    emu.faults.add(Fault("status", r"^/v2/kling", method="POST", status=406, message="Insufficient credits"))
    proc = run_cli(["generate", "--provider", "segmind", "--image", str(image), "--audio", str(audio)],
                   emu_env(emu), tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "credits" in errors[0].lower()
    assert "Traceback" not in proc.stderr


def test_missing_key_and_bad_input_say_what_to_do(inputs, tmp_path):
    image, audio = inputs
    proc = run_cli(["generate", "--provider", "wavespeed", "--image", str(image), "--audio", str(audio)], {}, tmp_path)
    assert proc.returncode == 1 and "WAVESPEED_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    proc = run_cli(["generate", "--provider", "local", "--image", str(text), "--audio", str(audio)], {}, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "notes.png" in proc.stderr


def test_resume_finishes_a_job_started_elsewhere(emu, inputs, tmp_path):
    emu.reset()
    image, audio = inputs
    # Submit straight to the emulator, as another machine would have.
    import httpx

    with httpx.Client(base_url=emu.url, headers={"x-api-key": KEY}) as client:
        url = lambda p: client.post("/upload-asset", json={"data_urls": [  # noqa: E731
            "data:application/octet-stream;base64," + __import__("base64").b64encode(p.read_bytes()).decode()]}
        ).json()["file_urls"][0]
        rid = client.post("/v2/kling-v1-standard-ai-avatar", json={"image_url": url(image), "audio_url": url(audio)}
                          ).json()["request_id"]
    proc = run_cli(["resume", "--provider", "segmind", "--request-id", rid], emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert abs(duration(path) - 2.2) <= 0.1
    assert len(emu.requests_to("POST", r"^/v2/kling")) == 1


def test_history_lists_jobs_and_what_can_be_resumed(emu, inputs, tmp_path):
    emu.reset()
    image, audio = inputs
    proc = run_cli(["history"], {}, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "no jobs yet"
    proc = run_cli(["generate", "--provider", "wavespeed", "--image", str(image), "--audio", str(audio)],
                   emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1
    from avatar_core.store import JobStore

    (row,) = JobStore(tmp_path / "out" / "jobs.sqlite3").list_jobs(owner=None)
    proc = run_cli(["history"], {}, tmp_path)
    line = proc.stdout.strip().splitlines()[0]
    assert "wavespeed" in line and "completed" in line and row.request_id in line and "2.2s" in line
    assert row.output_path in line
    # A job still running when the CLI was killed shows up as resumable.
    JobStore(tmp_path / "out" / "jobs.sqlite3").update("wavespeed", row.request_id, status="processing")
    proc = run_cli(["history", "--unfinished"], {}, tmp_path)
    assert row.request_id in proc.stdout and "python -m avatar_core resume" in proc.stdout


def test_an_unwritable_out_path_is_a_clear_message_not_a_traceback(emu, inputs, tmp_path):
    emu.reset()
    base = ["generate", "--provider", "wavespeed", "--image", str(inputs[0]), "--audio", str(inputs[1])]
    proc = run_cli([*base, "--out", "/proc/version"], emu_env(emu), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: cannot write the video to /proc/version" in proc.stderr
    assert not emu.requests_to("POST", r"^/api/v3/kwaivgi/"), "refused before anything was paid for"
    # A folder that cannot be made is only found at the end: the video is kept and its place named.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli([*base, "--out", str(blocker / "video.mp4")], emu_env(emu), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"cannot write the video to {blocker / 'video.mp4'}" in line and "it is kept at " in line
    with av.open(line.rsplit("it is kept at ", 1)[1].strip()) as c:
        assert c.streams.video
