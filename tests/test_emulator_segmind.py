"""The emulator speaks Segmind's protocol as PROVIDERS.md describes it (raw httpx)."""

from __future__ import annotations

import base64
import io

import av
import httpx
import pytest

import media_factory as mf
from avatar_core.emulator import Emulator, FakeClock, JobPlan, tone_video_maker

SLUG = "kling-v1-standard-ai-avatar"
KEY = {"x-api-key": "seg-key"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg-media")
    return {
        "image": mf.make_image(d / "face.jpg", "JPEG", (400, 500)),
        "audio": mf.make_tone(d / "voice.wav", "wav", 2.0),
    }


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def emu(clock):
    with Emulator(queue_s=1.0, processing_s=2.0, retention_s=3600.0, clock=clock, video_maker=tone_video_maker) as e:
        yield e


@pytest.fixture
def client(emu):
    with httpx.Client(base_url=emu.url, headers=KEY, timeout=10) as c:
        yield c


def data_url(path, mime):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def upload_both(client, media):
    r = client.post(
        "/upload-asset",
        json={"data_urls": [data_url(media["image"], "image/jpeg"), data_url(media["audio"], "audio/wav")]},
    )
    assert r.status_code == 200, r.text
    return r.json()["file_urls"]


def submit(client, media, slug=SLUG):
    image, audio = upload_both(client, media)
    return client.post(f"/v2/{slug}", json={"image_url": image, "audio_url": audio, "prompt": "talk"})


def test_missing_key_is_401_error_body(emu):
    for path in (f"/v2/{SLUG}", "/upload-asset"):
        r = httpx.post(emu.url + path, json={})
        assert r.status_code == 401
        assert set(r.json()) == {"error"}
    assert httpx.get(f"{emu.url}/v2/requests/abc/status").status_code == 401


def test_upload_asset_round_trip(emu, client, media):
    image_url, audio_url = upload_both(client, media)
    assert httpx.get(image_url).content == media["image"].read_bytes()
    got = httpx.get(audio_url)
    assert got.content == media["audio"].read_bytes() and got.headers["content-type"] == "audio/wav"
    (sent,) = emu.requests_to("POST", r"^/upload-asset$")
    assert sent.headers["x-api-key"] == "seg-key"
    assert sent.json["data_urls"][0].startswith("data:image/jpeg;base64,")


def test_upload_asset_rejects_bad_data_url(client):
    r = client.post("/upload-asset", json={"data_urls": ["data:image/png;base64,@@@"]})
    assert r.status_code == 400 and "data_urls[0]" in r.json()["error"]


def test_submit_and_status_progression(emu, client, clock, media):
    r = submit(client, media)
    assert r.status_code == 200
    body = r.json()
    rid = body["request_id"]
    assert body == {
        "request_id": rid,
        "status": "QUEUED",
        "poll_url": f"{emu.url}/v2/requests/{rid}/status",
        "status_url": f"{emu.url}/v2/requests/{rid}/status",
        "response_url": f"{emu.url}/v2/requests/{rid}",
    }
    assert float(r.headers["x-remaining-credits"]) < 1000

    status = client.get(body["status_url"]).json()
    assert status == {
        "status": "QUEUED",
        "request_id": rid,
        "status_url": body["status_url"],
        "response_url": body["response_url"],
        "metrics": {},
    }
    early = client.get(body["response_url"])
    assert early.status_code == 200 and early.json()["status"] == "QUEUED" and "output" not in early.json()

    clock.advance(1.5)
    assert client.get(body["status_url"]).json()["status"] == "PROCESSING"
    clock.advance(1.5)
    done = client.get(body["status_url"]).json()
    assert done["status"] == "COMPLETED" and done["metrics"]["inference_time"] == pytest.approx(2.0)
    final = client.get(body["response_url"])
    assert final.headers["x-remaining-credits"]
    result = final.json()
    assert result["status"] == "COMPLETED"
    video = httpx.get(result["output"], timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"


def test_failed_job_is_422_on_both_gets(emu, client, clock, media):
    emu.plan_jobs(JobPlan(fail="Content blocked by the RAI filter"))
    rid = submit(client, media).json()["request_id"]
    assert client.get(f"/v2/requests/{rid}/status").status_code == 200  # still queued
    clock.advance(3.0)
    for path in (f"/v2/requests/{rid}/status", f"/v2/requests/{rid}"):
        r = client.get(path)
        assert r.status_code == 422
        assert r.json() == {"status": "FAILED", "error": "Content blocked by the RAI filter"}


def test_unknown_and_expired_ids_are_404(emu, client, clock, media):
    assert client.get("/v2/requests/nope/status").status_code == 404
    assert client.get("/v2/requests/nope").status_code == 404
    rid = submit(client, media).json()["request_id"]
    clock.advance(3.0)
    output = client.get(f"/v2/requests/{rid}").json()["output"]
    clock.advance(3600.0 - 3.0)  # exactly the retention after submission
    for path in (f"/v2/requests/{rid}/status", f"/v2/requests/{rid}"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(output).status_code == 404


def test_unknown_slug_and_missing_input(client):
    r = client.post("/v2/kling-v9-avatar", json={"image_url": "a", "audio_url": "b"})
    assert r.status_code == 404 and "kling-v9-avatar" in r.json()["error"]
    r = client.post(f"/v2/{SLUG}", json={"image_url": "a"})
    assert r.status_code == 400 and "audio_url" in r.json()["error"]


def test_v1_sync_returns_the_mp4_itself(media):
    with Emulator(queue_s=0.05, processing_s=0.1, video_maker=tone_video_maker) as emu:
        with httpx.Client(base_url=emu.url, headers=KEY, timeout=30) as client:
            image, audio = upload_both(client, media)
            r = client.post("/v1/kling-v1-pro-ai-avatar", json={"image_url": image, "audio_url": audio})
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(r.content)) as f:
        assert {s.type for s in f.streams} == {"video", "audio"}


def test_v1_sync_timeout_is_504(media):
    with Emulator(queue_s=0.0, processing_s=60, sync_timeout_s=0.2, video_maker=tone_video_maker) as emu:
        with httpx.Client(base_url=emu.url, headers=KEY, timeout=30) as client:
            image, audio = upload_both(client, media)
            r = client.post(f"/v1/{SLUG}", json={"image_url": image, "audio_url": audio})
    assert r.status_code == 504 and r.json()["error"]


def test_inputs_may_be_data_uris(emu, client, clock, media):
    r = client.post(
        f"/v2/{SLUG}",
        json={"image_url": data_url(media["image"], "image/jpeg"), "audio_url": data_url(media["audio"], "audio/wav")},
    )
    clock.advance(3.0)
    assert client.get(f"/v2/requests/{r.json()['request_id']}/status").json()["status"] == "COMPLETED"
