"""The emulator speaks WaveSpeed's protocol as PROVIDERS.md describes it (raw httpx)."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
import pytest

import media_factory as mf
from avatar_core.emulator import Emulator, FakeClock, Fault, JobPlan, tone_video_maker

MODEL = "kwaivgi/kling-v1-ai-avatar-standard"
AUTH = {"Authorization": "Bearer test-key"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws-media")
    return {
        "image": mf.make_image(d / "face.png", "PNG", (400, 500)),
        "audio": mf.make_tone(d / "voice.wav", "wav", 2.5),
    }


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def emu(clock):
    with Emulator(queue_s=1.0, processing_s=2.0, retention_s=100.0, clock=clock, video_maker=tone_video_maker) as e:
        yield e


@pytest.fixture
def client(emu):
    with httpx.Client(base_url=emu.url, headers=AUTH, timeout=10) as c:
        yield c


def upload(client, path, content_type):
    with open(path, "rb") as fh:
        r = client.post("/api/v3/media/upload/binary", files={"file": (path.name, fh, content_type)})
    assert r.status_code == 200, r.text
    return r.json()["data"]["download_url"]


def submit(client, media, model=MODEL, **extra):
    image = upload(client, media["image"], "image/png")
    audio = upload(client, media["audio"], "audio/wav")
    return client.post(f"/api/v3/{model}", json={"image": image, "audio": audio, "prompt": "smile", **extra})


# ---------------------------------------------------------------- auth and validation


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Key k"}])
def test_missing_or_malformed_bearer_is_401_with_envelope_body(emu, headers):
    r = httpx.post(f"{emu.url}/api/v3/{MODEL}", json={"image": "x", "audio": "y"}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"code": 401, "message": "Unauthorized"}
    assert emu.jobs == {}


def test_configured_keys_reject_others():
    with Emulator(api_keys={"wavespeed": "good"}, video_maker=tone_video_maker) as emu:
        bad = httpx.get(f"{emu.url}/api/v3/predictions/x/result", headers={"Authorization": "Bearer bad"})
        good = httpx.get(f"{emu.url}/api/v3/predictions/x/result", headers={"Authorization": "Bearer good"})
    assert bad.status_code == 401
    assert good.status_code == 404  # authorised, but no such prediction


def test_unknown_model_and_missing_fields(client):
    r = client.post("/api/v3/kwaivgi/kling-v9-ai-avatar-ultra", json={"image": "a", "audio": "b"})
    assert r.status_code == 404 and "kling-v9" in r.json()["message"]
    r = client.post(f"/api/v3/{MODEL}", json={"image": "a"})
    assert r.status_code == 400 and "audio" in r.json()["message"]


# ---------------------------------------------------------------- the job life cycle


def test_submit_envelope_and_status_progression(emu, client, clock, media):
    r = submit(client, media)
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    job_id = data["id"]
    assert set(data) == {
        "id", "model", "outputs", "urls", "has_nsfw_contents", "status", "created_at", "error", "timings"
    }
    assert data["model"] == MODEL
    assert data["status"] == "created"
    assert data["outputs"] == []
    assert data["error"] == ""
    assert data["urls"]["get"] == f"{emu.url}/api/v3/predictions/{job_id}/result"
    datetime.fromisoformat(data["created_at"].replace("Z", "+00:00"))

    def poll():
        r = client.get(f"/api/v3/predictions/{job_id}/result")
        assert r.status_code == 200
        return r.json()["data"]

    assert poll()["status"] == "created"
    clock.advance(1.0)
    polled = poll()
    assert polled["status"] == "processing" and polled["outputs"] == []
    clock.advance(1.99)
    assert poll()["status"] == "processing"
    clock.advance(0.01)
    done = poll()
    assert done["status"] == "completed"
    assert done["outputs"] == [f"{emu.url}/emulator/outputs/{job_id}/output.mp4"]
    assert done["has_nsfw_contents"] == [False]
    assert done["timings"]["inference"] == 2000
    video = httpx.get(done["outputs"][0], timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"


def test_the_submit_is_recorded_on_the_wire(emu, client, media):
    submit(client, media)
    uploads = emu.requests_to("POST", r"^/api/v3/media/upload/binary$")
    assert [(u.form[0].name, u.form[0].filename) for u in uploads] == [("file", "face.png"), ("file", "voice.wav")]
    (sent,) = emu.requests_to("POST", re.escape(MODEL))
    assert sent.headers["authorization"] == "Bearer test-key"
    assert sent.json["prompt"] == "smile"
    assert sent.json["image"].startswith(emu.url + "/emulator/files/")


def test_webhook_query_is_recorded_on_the_job(emu, client, media):
    image = upload(client, media["image"], "image/png")
    audio = upload(client, media["audio"], "audio/wav")
    r = client.post(f"/api/v3/{MODEL}", params={"webhook": "http://127.0.0.1:9/hook"}, json={"image": image, "audio": audio})
    assert emu.job(r.json()["data"]["id"]).webhook == "http://127.0.0.1:9/hook"


def test_failed_job_reports_its_message(emu, client, clock, media):
    emu.plan_jobs(JobPlan(fail="Content moderation: the image was blocked"))
    job_id = submit(client, media).json()["data"]["id"]
    clock.advance(3.0)
    data = client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]
    assert data["status"] == "failed"
    assert data["error"] == "Content moderation: the image was blocked"
    assert data["outputs"] == []


def test_unreachable_inputs_fail_the_job(client, clock):
    r = client.post(f"/api/v3/{MODEL}", json={"image": "https://example.com/a.png", "audio": "https://example.com/a.wav"})
    job_id = r.json()["data"]["id"]
    clock.advance(3.0)
    data = client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]
    assert data["status"] == "failed" and "loopback" in data["error"]


def test_retention_expires_status_and_video(emu, client, clock, media):
    job_id = submit(client, media).json()["data"]["id"]
    clock.advance(3.0)
    url = client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]["outputs"][0]
    assert httpx.get(url, timeout=60).status_code == 200
    clock.advance(96.99)  # 99.99 s after submission
    assert client.get(f"/api/v3/predictions/{job_id}/result").status_code == 200
    clock.advance(0.01)
    gone = client.get(f"/api/v3/predictions/{job_id}/result")
    assert gone.status_code == 404 and gone.json()["code"] == 404
    assert httpx.get(url).status_code == 404


def test_unknown_prediction_is_404(client):
    r = client.get("/api/v3/predictions/doesnotexist/result")
    assert r.status_code == 404


def test_per_job_completion_time(emu, client, clock, media):
    emu.plan_jobs(JobPlan(complete_at=clock() + 10.0))
    job_id = submit(client, media).json()["data"]["id"]
    clock.advance(9.0)
    assert client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]["status"] == "processing"
    emu.complete_job_at(job_id, clock() + 0.5)
    clock.advance(0.5)
    assert client.get(f"/api/v3/predictions/{job_id}/result").json()["data"]["status"] == "completed"


# ---------------------------------------------------------------- sync mode


def test_sync_mode_waits_for_the_result(media):
    with Emulator(queue_s=0.05, processing_s=0.1, video_maker=tone_video_maker) as emu:
        with httpx.Client(base_url=emu.url, headers=AUTH, timeout=10) as client:
            r = submit(client, media, enable_sync_mode=True)
    data = r.json()["data"]
    assert r.json()["code"] == 200
    assert data["status"] == "completed" and data["outputs"]


def test_sync_mode_timeout_answers_processing_with_code_5004(media):
    with Emulator(queue_s=0.1, processing_s=60, sync_timeout_s=0.3, video_maker=tone_video_maker) as emu:
        with httpx.Client(base_url=emu.url, headers=AUTH, timeout=10) as client:
            r = submit(client, media, enable_sync_mode=True)
            assert r.status_code == 200
            body = r.json()
            assert body["code"] == 5004
            assert body["data"]["status"] == "processing"
            poll = client.get(body["data"]["urls"]["get"])
            assert poll.json()["data"]["status"] == "processing"


# ---------------------------------------------------------------- uploads


def test_binary_upload_serves_the_same_bytes(emu, client, media):
    raw = media["image"].read_bytes()
    with open(media["image"], "rb") as fh:
        r = client.post("/api/v3/media/upload/binary", files={"file": ("face.png", fh, "image/png")})
    data = r.json()["data"]
    assert r.json()["code"] == 200
    assert data["filename"] == "face.png" and data["size"] == len(raw) and data["type"] == "image"
    got = httpx.get(data["download_url"])
    assert got.content == raw and got.headers["content-type"] == "image/png"


def test_presigned_upload_then_put(emu, client, media):
    raw = media["audio"].read_bytes()
    r = client.post("/api/v3/media/uploads", json={"filename": "voice.wav", "size": len(raw), "content_type": "audio/wav"})
    data = r.json()["data"]
    upload = data["upload"]
    assert upload["method"] == "PUT"
    assert httpx.get(data["download_url"]).status_code == 404  # nothing until the PUT
    put = httpx.put(upload["url"], content=raw, headers=upload["headers"])
    assert put.status_code == 200
    (recorded,) = emu.requests_to("PUT", r"^/emulator/uploads/")
    assert "authorization" not in recorded.headers
    assert recorded.headers["content-type"] == "audio/wav"
    assert httpx.get(data["download_url"]).content == raw


def test_presigned_put_needs_its_token(client):
    data = client.post("/api/v3/media/uploads", json={"filename": "a.wav", "size": 3, "content_type": "audio/wav"}).json()["data"]
    forged = data["upload"]["url"].split("?")[0] + "?token=nope"
    assert httpx.put(forged, content=b"abc").status_code == 403


def test_upload_limits(client):
    too_big_image = b"\x89PNG" + b"\0" * (20 * 1024 * 1024)
    r = client.post("/api/v3/media/upload/binary", files={"file": ("big.png", too_big_image, "image/png")})
    assert r.status_code == 400 and "20 MB" in r.json()["message"]
    r = client.post(
        "/api/v3/media/uploads", json={"filename": "a.wav", "size": 50 * 1024 * 1024 + 1, "content_type": "audio/wav"}
    )
    assert r.status_code == 400 and "50 MB" in r.json()["message"]
    ok = client.post("/api/v3/media/uploads", json={"filename": "a.wav", "size": 50 * 1024 * 1024, "content_type": "audio/wav"})
    assert ok.status_code == 200


def test_application_error_inside_http_200(emu, client, media):
    emu.faults.add(Fault("app_error", re.escape(MODEL), message="Internal error, please retry"))
    r = submit(client, media)
    assert r.status_code == 200
    assert r.json() == {"code": 500, "message": "Internal error, please retry"}
    assert emu.jobs == {}
