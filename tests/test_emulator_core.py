"""The emulator core: recording, routing, reset, lifecycle, and the CLI entry point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from avatar_core.emulator import Emulator, Fault, JobPlan, tone_video_maker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def emu():
    with Emulator(video_maker=tone_video_maker) as e:
        yield e


def test_url_is_loopback_with_a_real_port(emu):
    assert emu.url.startswith("http://127.0.0.1:") and emu.port > 0
    assert httpx.get(f"{emu.url}/emulator/health").json() == {"ok": True}


def test_every_request_is_recorded(emu):
    httpx.post(
        f"{emu.url}/api/v3/media/upload/binary?x=1&x=2",
        headers={"Authorization": "Bearer secret", "X-Custom": "Yes"},
        files={"file": ("voice.wav", b"RIFF....", "audio/wav")},
        data={"note": "hi"},
    )
    httpx.post(f"{emu.url}/v2/kling-v1-pro-ai-avatar", json={"image_url": "a"}, headers={"x-api-key": "k"})
    first, second = emu.requests
    assert first.method == "POST" and first.path == "/api/v3/media/upload/binary"
    assert first.query == {"x": ["1", "2"]}
    assert first.headers["x-custom"] == "Yes" and first.header("X-CUSTOM") == "Yes"
    assert [(p.name, p.filename, p.content_type) for p in first.form] == [
        ("note", None, None),
        ("file", "voice.wav", "audio/wav"),
    ]
    assert first.form[1].data == b"RIFF...."
    assert second.json == {"image_url": "a"} and second.body == b'{"image_url":"a"}'
    assert second.at >= first.at
    assert emu.requests_to("POST", r"^/v2/") == [second]
    assert emu.requests_to("GET", r".*") == []


def test_unknown_paths_answer_in_the_owning_protocols_shape(emu):
    ws = httpx.get(f"{emu.url}/api/v3/nothing/here/at/all", headers={"Authorization": "Bearer k"})
    assert ws.status_code == 404 and ws.json()["code"] == 404
    seg = httpx.delete(f"{emu.url}/v2/requests/abc", headers={"x-api-key": "k"})
    assert seg.status_code == 405 and "error" in seg.json()
    assert httpx.get(f"{emu.url}/elsewhere").status_code == 404


def test_reset_forgets_everything(emu):
    emu.faults.add(Fault("status", ".*", status=500))
    emu.plan_jobs(JobPlan(fail="x"))
    httpx.get(f"{emu.url}/emulator/health")
    emu.reset()
    assert len(emu.requests) == 0 and emu.faults.pending() == [] and emu.jobs == {}
    assert httpx.get(f"{emu.url}/emulator/health").status_code == 200


def test_fault_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")


def test_stop_frees_the_port():
    emu = Emulator(video_maker=tone_video_maker).start()
    port = emu.port
    emu.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_main_serve_prints_settings_and_stops_on_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from avatar_core.emulator import main_serve; main_serve({port})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("Press Ctrl-C"):
                break
        assert f"WAVESPEED_BASE_URL=http://127.0.0.1:{port}" in lines
        assert f"SEGMIND_UPLOAD_URL=http://127.0.0.1:{port}/upload-asset" in lines
        assert httpx.get(f"http://127.0.0.1:{port}/emulator/health").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
