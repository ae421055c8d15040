"""Every scripted fault the emulator offers, seen from a raw HTTP client."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

import media_factory as mf
from avatar_core.emulator import Emulator, FakeClock, Fault, JobPlan, tone_video_maker

WS_MODEL = "kwaivgi/kling-v2-ai-avatar-pro"
SEG_SLUG = "kling-v2-pro-avatar"
WS = {"Authorization": "Bearer k"}
SEG = {"x-api-key": "k"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import base64

    d = tmp_path_factory.mktemp("fault-media")
    image = mf.make_image(d / "face.png", "PNG", (320, 400))
    audio = mf.make_tone(d / "voice.wav", "wav", 2.0)
    return {
        "image": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode(),
        "audio": "data:audio/wav;base64," + base64.b64encode(audio.read_bytes()).decode(),
    }


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def emu(clock):
    with Emulator(queue_s=0.0, processing_s=1.0, clock=clock, video_maker=tone_video_maker) as e:
        yield e


def ws_submit(emu, inputs, **kw):
    return httpx.post(f"{emu.url}/api/v3/{WS_MODEL}", json=inputs, headers=WS, **kw)


def ws_poll(emu, job_id):
    return httpx.get(f"{emu.url}/api/v3/predictions/{job_id}/result", headers=WS)


def seg_submit(emu, inputs):
    body = {"image_url": inputs["image"], "audio_url": inputs["audio"]}
    return httpx.post(f"{emu.url}/v2/{SEG_SLUG}", json=body, headers=SEG)


# ---------------------------------------------------------------- HTTP statuses


def test_429_with_and_without_retry_after(emu, inputs):
    emu.faults.add(Fault("status", r"/result$", status=429, retry_after=7))
    emu.faults.add(Fault("status", r"/result$", status=429))
    job_id = ws_submit(emu, inputs).json()["data"]["id"]
    first = ws_poll(emu, job_id)
    assert first.status_code == 429 and first.headers["retry-after"] == "7"
    assert first.json()["code"] == 429
    second = ws_poll(emu, job_id)
    assert second.status_code == 429 and "retry-after" not in second.headers
    assert ws_poll(emu, job_id).status_code == 200


def test_retry_after_may_be_an_http_date(emu):
    emu.faults.add(Fault("status", ".*", status=429, retry_after="Wed, 21 Oct 2026 07:28:00 GMT"))
    r = httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG)
    assert r.headers["retry-after"] == "Wed, 21 Oct 2026 07:28:00 GMT"
    assert r.json() == {"error": "Too many requests"}


def test_bursts_of_5xx_on_reads_are_consumed_in_order(emu, inputs):
    job_id = ws_submit(emu, inputs).json()["data"]["id"]
    for status in (500, 502, 503, 504):
        emu.faults.add(Fault("status", r"/result$", count=2, status=status, method="GET"))
    seen = [ws_poll(emu, job_id).status_code for _ in range(9)]
    assert seen == [500, 500, 502, 502, 503, 503, 504, 504, 200]
    assert emu.faults.pending() == []


def test_fault_method_filter_and_unlimited_count(emu, inputs):
    emu.faults.add(Fault("status", r"^/api/v3/", count=None, status=503, method="GET"))
    job_id = ws_submit(emu, inputs).json()["data"]["id"]  # POST passes
    assert [ws_poll(emu, job_id).status_code for _ in range(3)] == [503, 503, 503]
    emu.faults.clear()
    assert ws_poll(emu, job_id).status_code == 200


def test_segmind_406_for_credits(emu, inputs):
    emu.faults.add(Fault("status", rf"^/v2/{SEG_SLUG}$", status=406))
    r = seg_submit(emu, inputs)
    assert r.status_code == 406
    assert r.json() == {"error": "Insufficient credits"}
    assert "x-remaining-credits" in r.headers
    assert emu.jobs == {}


def test_wavespeed_app_error_is_http_200_with_code_500(emu, inputs):
    job_id = ws_submit(emu, inputs).json()["data"]["id"]
    emu.faults.add(Fault("app_error", r"/result$", message="model backend crashed"))
    r = ws_poll(emu, job_id)
    assert r.status_code == 200 and r.json() == {"code": 500, "message": "model backend crashed"}


# ---------------------------------------------------------------- connection-level


def test_slow_answer(emu):
    emu.faults.add(Fault("slow", r"/status$", delay_s=0.3))
    t0 = time.monotonic()
    r = httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG)
    assert time.monotonic() - t0 >= 0.3 and r.status_code == 404
    emu.faults.add(Fault("slow", r"/status$", delay_s=0.5))
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG, timeout=0.1)


def test_dropped_submit_still_creates_the_job(emu, inputs):
    """'Sent, but no answer': the client cannot know the job exists, but it does."""
    emu.faults.add(Fault("drop", re.escape(WS_MODEL), method="POST"))
    with pytest.raises(httpx.RemoteProtocolError):
        ws_submit(emu, inputs)
    assert len(emu.jobs) == 1
    assert len(emu.requests_to("POST", re.escape(WS_MODEL))) == 1


def test_drop_without_processing_creates_nothing(emu, inputs):
    emu.faults.add(Fault("drop", rf"^/v2/{SEG_SLUG}$", process=False))
    with pytest.raises(httpx.RemoteProtocolError):
        seg_submit(emu, inputs)
    assert emu.jobs == {}
    assert seg_submit(emu, inputs).status_code == 200  # the server is still fine


def test_malformed_json(emu):
    emu.faults.add(Fault("malformed_json", r"/status$"))
    r = httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_html_page_and_custom_body(emu):
    emu.faults.add(Fault("html", r"/status$", status=502))
    emu.faults.add(Fault("body", r"/status$", status=200, body={"status": "QUEUED"}))
    r = httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG)
    assert r.status_code == 502 and r.text.lower().startswith("<!doctype html")
    assert httpx.get(f"{emu.url}/v2/requests/x/status", headers=SEG).json() == {"status": "QUEUED"}


@pytest.mark.parametrize("kind", ["malformed_json", "html", "body"])
def test_a_spoilt_answer_to_a_handled_submit_still_creates_the_job(emu, inputs, kind):
    # handle=True: the submit is processed (a paid job exists) and only the answer is spoilt.
    emu.faults.add(Fault(kind, r"^/v2/", method="POST", body={"status": "QUEUED"}))
    assert seg_submit(emu, inputs).status_code == 200 and len(emu.jobs) == 0  # default: not handled
    emu.faults.add(Fault(kind, r"^/v2/", method="POST", body={"status": "QUEUED"}, handle=True))
    r = seg_submit(emu, inputs)
    assert r.status_code == 200 and "request_id" not in r.text
    [job] = emu.jobs.values()
    assert job.model == SEG_SLUG


def test_huge_answer_declares_and_streams_more_than_asked(emu, capfd):
    emu.faults.add(Fault("huge", r"\.mp4$", size=1024**3))
    with httpx.stream("GET", f"{emu.url}/emulator/outputs/abc/output.mp4") as r:
        assert int(r.headers["content-length"]) == 1024**3
        got = 0
        for chunk in r.iter_bytes():
            got += len(chunk)
            if got > 2 * 1024 * 1024:
                break
    assert got > 2 * 1024 * 1024
    assert httpx.get(f"{emu.url}/emulator/health").status_code == 200
    time.sleep(0.5)  # the handler notices the hang-up on its next write
    assert "Exception occurred" not in capfd.readouterr().err  # a client leaving is not an error


# ---------------------------------------------------------------- job-level scenarios


def test_failed_job_with_message_on_both_protocols(emu, clock, inputs):
    emu.plan_jobs(JobPlan(fail="RAI: the image shows a public figure"), JobPlan(fail="RAI: blocked"))
    ws_id = ws_submit(emu, inputs).json()["data"]["id"]
    seg_id = seg_submit(emu, inputs).json()["request_id"]
    clock.advance(1.0)
    assert ws_poll(emu, ws_id).json()["data"]["error"] == "RAI: the image shows a public figure"
    r = httpx.get(f"{emu.url}/v2/requests/{seg_id}", headers=SEG)
    assert r.status_code == 422 and r.json()["error"] == "RAI: blocked"


def test_unknown_status_value(emu, inputs):
    emu.plan_jobs(JobPlan(status_value="thinking"), JobPlan(status_value="WARMING_UP"))
    ws_id = ws_submit(emu, inputs).json()["data"]["id"]
    seg_id = seg_submit(emu, inputs).json()["request_id"]
    assert ws_poll(emu, ws_id).json()["data"]["status"] == "thinking"
    assert httpx.get(f"{emu.url}/v2/requests/{seg_id}/status", headers=SEG).json()["status"] == "WARMING_UP"


@pytest.mark.parametrize("video,status,marker", [("403", 403, "AccessDenied"), ("404", 404, "NoSuchKey"), ("html", 200, "<html")])
def test_result_url_misbehaves(emu, clock, inputs, video, status, marker):
    emu.plan_jobs(JobPlan(video=video))
    job_id = ws_submit(emu, inputs).json()["data"]["id"]
    clock.advance(1.0)
    url = ws_poll(emu, job_id).json()["data"]["outputs"][0]
    r = httpx.get(url)
    assert r.status_code == status and marker in r.text
    assert not r.headers["content-type"].startswith("video/")


@pytest.mark.parametrize("declared", [True, False])
def test_huge_result_video(emu, clock, inputs, declared):
    emu.plan_jobs(JobPlan(video="huge", huge_bytes=600 * 1024 * 1024, huge_declared=declared))
    seg_id = seg_submit(emu, inputs).json()["request_id"]
    clock.advance(1.0)
    url = httpx.get(f"{emu.url}/v2/requests/{seg_id}", headers=SEG).json()["output"]
    with httpx.stream("GET", url) as r:
        if declared:
            assert int(r.headers["content-length"]) == 600 * 1024 * 1024
        else:
            assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
        first = next(r.iter_bytes())
    assert first and set(first) == {0}


def test_per_job_duration_for_benchmarks(emu, clock, inputs):
    emu.plan_jobs(JobPlan(queue_s=2.0, processing_s=5.0), JobPlan(processing_s=0.5))
    slow = seg_submit(emu, inputs).json()["request_id"]
    fast = seg_submit(emu, inputs).json()["request_id"]

    def status(rid):
        return httpx.get(f"{emu.url}/v2/requests/{rid}/status", headers=SEG).json()["status"]

    clock.advance(0.5)
    assert (status(slow), status(fast)) == ("QUEUED", "COMPLETED")
    clock.advance(1.5)
    assert status(slow) == "PROCESSING"
    clock.advance(5.0)
    assert status(slow) == "COMPLETED"
