"""The CLI and the app offer fal.ai, Replicate and Kling API: real runs against the emulator.

The CLI runs as a user runs it (a subprocess, settings from the environment); the app
is launched on 127.0.0.1 and driven through gradio_client's /generate. Each test asserts
the request that went over the wire (path, auth, tier field) and the MP4 that came back.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from avatar_core.emulator import Emulator, tone_video_maker
from tests.media_factory import make_portrait, make_tone
from tests.helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FAL_KEY = "fal-cli-key-2Wd7"
REPLICATE_TOKEN = "r8_cli_token_Qm4s"
KLING_ACCESS, KLING_SECRET = "ak-cli-8Hn2", "sk-cli-secret-Vb63"
KEYS = {"fal": FAL_KEY, "replicate": REPLICATE_TOKEN, "kling": f"{KLING_ACCESS}:{KLING_SECRET}"}
AUDIO_S = 2.2
JOB_TIMEOUT_S = 60

# provider -> (submit path, extra CLI arguments)
SUBMITS = {
    "fal": ("/fal-ai/kling-video/v1/pro/ai-avatar", []),
    # Replicate hosts v2 only; see test_cli_replicate_without_version for the default.
    "replicate": ("/v1/models/kwaivgi/kling-avatar-v2/predictions", ["--version", "v2"]),
    "kling": ("/v1/videos/avatar/image2video", []),
}


@pytest.fixture(scope="module")
def emu():
    # Only the configured keys pass, so a request without them would be refused.
    with Emulator(queue_s=0.2, processing_s=0.5, video_maker=tone_video_maker, api_keys=KEYS) as e:
        yield e


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-new")
    return make_portrait(d / "face.jpg", "JPEG", size=(480, 600)), make_tone(d / "voice.mp3", "mp3", AUDIO_S)


def emu_env(emu) -> dict[str, str]:
    return {
        "FAL_BASE_URL": emu.url, "FAL_KEY": FAL_KEY,
        "REPLICATE_BASE_URL": emu.url, "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
        "KLING_BASE_URL": emu.url, "KLING_ACCESS_KEY": KLING_ACCESS, "KLING_SECRET_KEY": KLING_SECRET,
    }


def run_cli(args, env_extra, tmp_path, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_POLL_TYPICAL_S": "1", "PYTHONPATH": str(ROOT),
                **env_extra})
    return subprocess.run([sys.executable, "-m", "avatar_core", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def duration(path: Path) -> float:
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        return c.duration / 1e6


def jwt_payload(authorization: str) -> dict:
    payload = authorization.partition(" ")[2].split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def assert_auth_and_tier(provider: str, submit, tier_word: str) -> None:
    auth = submit.header("authorization")
    if provider == "fal":
        assert auth == f"Key {FAL_KEY}"
        assert tier_word in submit.path and submit.json["prompt"] == "nod"
    elif provider == "replicate":
        assert auth == f"Bearer {REPLICATE_TOKEN}"
        assert submit.json["input"]["mode"] == tier_word and submit.json["input"]["prompt"] == "nod"
    else:
        assert jwt_payload(auth)["iss"] == KLING_ACCESS and KLING_SECRET not in auth
        assert submit.json["mode"] == tier_word and submit.json["prompt"] == "nod"


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("provider", ["fal", "replicate", "kling"])
def test_cli_generate_against_the_emulator(emu, inputs, tmp_path, provider):
    emu.reset()
    image, audio = inputs
    path, extra = SUBMITS[provider]
    out = tmp_path / "video.mp4"
    proc = run_cli(["generate", "--provider", provider, "--tier", "pro", *extra, "--image", str(image),
                    "--audio", str(audio), "--prompt", "nod", "--out", str(out)], emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out) and abs(duration(out) - AUDIO_S) <= 0.1
    (submitted,) = [line for line in lines if "submitted to" in line]
    (submit,) = emu.requests_to("POST", f"^{path}$")
    assert f"submitted to {provider}: request id" in submitted
    assert submitted.rsplit(" ", 1)[-1] in emu.jobs
    assert_auth_and_tier(provider, submit, "pro")
    for secret in (FAL_KEY, REPLICATE_TOKEN, KLING_SECRET):
        assert secret not in proc.stdout + proc.stderr


def test_cli_replicate_without_version(emu, inputs, tmp_path):
    emu.reset()
    image, audio = inputs
    proc = run_cli(["generate", "--provider", "replicate", "--image", str(image), "--audio", str(audio)],
                   emu_env(emu), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(emu.requests_to("POST", f"^{SUBMITS['replicate'][0]}$")) == 1


# ------------------------------------------------------------------ the app



@pytest.mark.slow
def test_app_generate_with_replicate(emu, tmp_path):
    from gradio_client import Client, handle_file

    import app
    from avatar_core.config import load_settings

    emu.reset()
    env = {**emu_env(emu), "AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_POLL_TYPICAL_S": "1"}
    settings = load_settings(env=env, dotenv_path=None)
    demo = app.build_demo(settings)
    port = _free_port()
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(image=handle_file(str(EXAMPLES / "portrait.jpg")),
                            audio=handle_file(str(EXAMPLES / "voice.mp3")), provider="replicate", tier="pro",
                            prompt="", api_key="", api_name="/generate")
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not job.done():
            assert time.monotonic() < deadline, "the job did not finish in time"
            time.sleep(0.05)
        statuses = [out[0] for out in job.outputs()]
        status, request_id, video = job.result()
    finally:
        demo.close()
    assert "Done in" in status and "Replicate, pro" in status, status
    assert any("Submitted to Replicate" in s for s in statuses)
    (submit,) = emu.requests_to("POST", f"^{SUBMITS['replicate'][0]}$")
    assert submit.header("authorization") == f"Bearer {REPLICATE_TOKEN}"
    assert submit.json["input"]["mode"] == "pro"
    assert [u.field_names for u in emu.requests_to("POST", r"^/v1/files$")] == [["content"], ["content"]]
    assert request_id in emu.jobs and emu.requests_to("GET", rf"^/v1/predictions/{request_id}$")
    assert not any(REPLICATE_TOKEN in s for s in statuses)
    path = Path(video.get("video") if isinstance(video, dict) else video)
    with av.open(str(EXAMPLES / "voice.mp3")) as c:
        voice_s = c.duration / 1e6
    assert abs(duration(path) - voice_s) <= 0.15
