"""Replicate end to end: the job loop, the real client, the loopback emulator over HTTP.

Asserts what went over the wire (``/v1/files`` uploads, the prediction on
``kwaivgi/kling-avatar-v2`` with ``mode``, ``Bearer`` auth, the cancel POST), the events
the user sees, the error text built from RFC 7807 problem bodies, and the MP4 that came back.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import httpx
import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, FakeClock, Fault, JobPlan, tone_video_maker
from avatar_core.emulator.server import CANCELLED
from avatar_core.errors import InputError
from avatar_core.events import Done, FailedEvent, ProcessingEvent, QueuedEvent, Submitted, Uploading
from avatar_core.providers.base import SubmitRequest
from avatar_core.providers.replicate import ReplicateProvider
from avatar_core.store import JobStore
from tests.media_factory import make_image, make_tone
from tests.helpers import check_mp4, collect, run_through_read_faults, until

TOKEN = "r8_test_token_5Hq2"
MODEL = "kwaivgi/kling-avatar-v2"
PREDICT = rf"^/v1/models/{MODEL}/predictions$"
AUDIO_S = 2.5


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.4, processing_s=1.2, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu):
    emu.reset()
    yield
    emu.api_keys = {}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("replicate-inputs")
    return make_image(d / "face.png", "PNG", (480, 600)), make_tone(d / "voice.wav", "wav", AUDIO_S)


@pytest.fixture
def settings(emu, tmp_path):
    return replace(
        load_settings(env={}, dotenv_path=None),
        replicate_api_token=Secret(TOKEN),
        replicate_base_url=emu.url,
        output_dir=tmp_path / "out",
        poll_typical_s=1.0,
        deadline_s=60,
    )




def submitted_id(events) -> str:
    return next(e for e in events if isinstance(e, Submitted)).request_id


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("tier,mode", [("standard", "std"), ("pro", "pro")])
async def test_end_to_end_both_tiers(emu, settings, inputs, tier, mode, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    events = await collect(jobs.run_job("replicate", image, audio, tier=tier, settings=settings, store=store))
    done = events[-1]
    assert isinstance(done, Done), done
    check_mp4(done.path, AUDIO_S)
    assert done.metadata["model"] == MODEL and done.metadata["tier"] == tier
    assert done.metadata["metrics"]["predict_time"] > 0
    assert any(isinstance(e, Uploading) for e in events) and any(isinstance(e, QueuedEvent) for e in events)
    logs = [e.logs for e in events if isinstance(e, ProcessingEvent) and e.logs]
    assert logs and logs[0][0] == "Starting avatar generation"  # Replicate's log text reaches the status panel

    # The wire: two uploads to /v1/files (multipart field "content"), one prediction, polls.
    uploads = emu.requests_to("POST", r"^/v1/files$")
    assert len(uploads) == 2
    assert [u.field_names for u in uploads] == [["content"], ["content"]]
    assert uploads[0].form[0].data == image.read_bytes() and uploads[0].form[0].content_type == "image/png"
    assert uploads[1].form[0].data == audio.read_bytes() and uploads[1].form[0].content_type == "audio/wav"
    (submit,) = emu.requests_to("POST", PREDICT)
    assert set(submit.json) == {"input"}
    sent = submit.json["input"]
    assert set(sent) == {"image", "audio", "mode"}  # no prompt given: none sent
    assert sent["mode"] == mode
    file_urls = [f"{emu.url}/v1/files/{fid}" for fid in emu.files]
    assert [sent["image"], sent["audio"]] == file_urls  # the files' urls.get
    polls = emu.requests_to("GET", rf"^/v1/predictions/{done.request_id}$")
    assert polls
    assert not emu.requests_to("POST", r"/cancel$")
    for r in emu.requests:
        if r.path.startswith("/v1/"):
            assert r.header("authorization") == f"Bearer {TOKEN}"
    assert emu.job(done.request_id).tier == tier
    row = store.get("replicate", done.request_id)
    assert row.status == "completed" and row.model == MODEL and row.tier == tier


async def test_prompt_and_data_uri_inputs(emu, settings, inputs):
    image, audio = inputs
    client = ReplicateProvider(TOKEN, emu.url, file_encoding="data_uri")
    try:
        events = await collect(jobs.run_job("replicate", image, audio, prompt="a calm nod", settings=settings,
                                            client=client))
    finally:
        await client.aclose()
    assert isinstance(events[-1], Done), events[-1]
    check_mp4(events[-1].path, AUDIO_S)
    assert not emu.requests_to("POST", r"^/v1/files")  # inline: no upload call
    sent = emu.requests_to("POST", PREDICT)[0].json["input"]
    assert sent["prompt"] == "a calm nod" and sent["mode"] == "std"
    head, payload = sent["image"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(payload) == image.read_bytes()
    head, payload = sent["audio"].split(",", 1)
    assert head == "data:audio/wav;base64" and base64.b64decode(payload) == audio.read_bytes()


async def test_links_are_never_passed_through(emu, settings, inputs):
    # Issue 14.4: a link may serve the provider other bytes than it served the checks, so the
    # job loop refuses links; the app and the CLI send the checked files (jobs.inputs_to_send).
    image, audio = inputs
    img_url = emu.file_url(emu.store_file(image.read_bytes(), "face.png", "image/png"))
    aud_url = emu.file_url(emu.store_file(audio.read_bytes(), "voice.wav", "audio/wav"))
    events = await collect(jobs.run_job("replicate", img_url, aud_url, settings=settings))
    assert isinstance(events[-1], FailedEvent) and events[-1].kind == "InputError"
    assert "only sends files it has checked" in events[-1].message
    assert emu.requests_to("POST", r".*") == []


async def test_an_oversized_inline_file_is_refused_before_sending(tmp_path, emu):
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    client = ReplicateProvider(TOKEN, emu.url, file_encoding="data_uri")
    try:
        with pytest.raises(InputError, match="10 MB"):
            await client.upload(big, "audio/wav")
    finally:
        await client.aclose()
    assert len(emu.requests) == 0


# ------------------------------------------------------------------ faults


async def test_429_and_5xx_on_reads_are_survived_with_one_submit(emu, settings, inputs):
    polls = await run_through_read_faults(emu, "replicate", settings, inputs, [
        Fault("status", r"^/v1/predictions/[^/]+$", method="GET", count=1, status=429, retry_after=1),
        Fault("status", r"^/v1/predictions/[^/]+$", method="GET", count=3, status=503),
    ], poll=r"^/v1/predictions/", submit=PREDICT)
    assert len(polls) >= 5


async def test_upload_5xx_is_retried(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", r"^/v1/files$", count=2, status=502))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    assert len(emu.requests_to("POST", r"^/v1/files$")) == 4  # two failed, then image and audio
    assert len(emu.requests_to("POST", PREDICT)) == 1


@pytest.mark.parametrize("fault", [
    Fault("status", PREDICT, method="POST", status=500, message="prediction queue hiccup"),
    Fault("drop", PREDICT, method="POST"),
])
async def test_submit_5xx_or_drop_is_uncertain_and_never_resent(emu, settings, inputs, fault):
    image, audio = inputs
    emu.faults.add(fault)
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.kind == "SubmitUncertain"
    assert "dashboard" in last.message and "Replicate" in last.message
    if fault.kind == "status":
        assert "HTTP 500" in last.message and "prediction queue hiccup" in last.message
    else:
        assert len(emu.jobs) == 1  # the prediction exists: exactly why it must not be sent twice
    assert len(emu.requests_to("POST", PREDICT)) == 1


async def test_bad_token_is_an_auth_error_that_hides_the_token(emu, settings, inputs):
    image, audio = inputs
    emu.api_keys = {"replicate": {TOKEN}}
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings, api_key="r8_wrong_token"))
    last = events[-1]
    assert last.kind == "AuthError" and "Replicate refused the API key" in last.message
    assert "Unauthenticated" in last.message  # the problem body's title reached the user
    assert "r8_wrong_token" not in last.message
    (upload,) = emu.requests_to("POST", r"^/v1/files$")  # stopped at the first upload
    assert upload.header("authorization") == "Bearer r8_wrong_token"
    assert not emu.requests_to("POST", PREDICT)


async def test_payment_required_is_a_credits_error(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("body", PREDICT, method="POST", status=402, content_type="application/problem+json", body={
        "title": "Insufficient credit",
        "detail": "You have insufficient credit to run this model. Go to https://replicate.com/account/billing",
        "status": 402,
    }))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "CreditsError"
    assert "no credits left" in last.message and "account/billing" in last.message
    assert len(emu.requests_to("POST", PREDICT)) == 1


async def test_rfc7807_validation_error_reaches_the_user(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("body", PREDICT, method="POST", status=422, content_type="application/problem+json", body={
        "title": "Input validation failed",
        "detail": "- input.audio: audio must be at most 300 seconds long",
        "status": 422,
    }))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "InputError"
    assert "HTTP 422: Input validation failed: - input.audio: audio must be at most 300 seconds long" in last.message
    assert len(emu.requests_to("POST", PREDICT)) == 1


async def test_submit_429_is_a_refusal_so_it_is_sent_again(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", PREDICT, method="POST", status=429, retry_after=1, message="Request was throttled"))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    posts = emu.requests_to("POST", PREDICT)
    assert len(posts) == 2 and len(emu.jobs) == 1
    assert posts[1].wall - posts[0].wall >= 0.95


async def test_failed_prediction_shows_replicates_error_and_the_id(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(fail="Content flagged as sensitive (E005)"))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    last = events[-1]
    rid = submitted_id(events)
    assert isinstance(last, FailedEvent) and last.kind == "JobFailed"
    assert "Replicate reports the job failed: Content flagged as sensitive (E005)" in last.message
    assert rid in last.message


async def test_unknown_status_value_is_an_error_not_processing(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(status_value="booting"))
    events = await collect(jobs.run_job("replicate", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "ProtocolError" and "'booting'" in last.message and "resume" in last.message
    assert not any(isinstance(e, ProcessingEvent) for e in events)


async def test_prediction_canceled_elsewhere_ends_as_cancelled(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(queue_s=30))
    gen = jobs.run_job("replicate", image, audio, settings=settings)
    events = []
    async for event in gen:
        events.append(event)
        if isinstance(event, QueuedEvent):
            # Someone presses Cancel on replicate.com.
            with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {TOKEN}"}) as web:
                assert web.post(f"/v1/predictions/{event.request_id}/cancel").json()["status"] == "canceled"
    last = events[-1]
    assert last.kind == "JobCancelled" and "cancelled at Replicate" in last.message


# ------------------------------------------------------------------ resume and cancel


async def test_resume_from_the_prediction_id_alone(emu, settings, inputs):
    image, audio = inputs
    client = ReplicateProvider(TOKEN, emu.url)
    try:
        request = SubmitRequest(await client.upload(image, "image/png"), await client.upload(audio, "audio/wav"),
                                tier="pro", version="v2")
        handle = await client.submit(request)
    finally:
        await client.aclose()
    assert emu.requests_to("POST", PREDICT)[0].json["input"]["mode"] == "pro"

    events = await collect(jobs.resume("replicate", handle.request_id, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    check_mp4(events[-1].path, AUDIO_S)
    assert emu.requests_to("GET", rf"^/v1/predictions/{handle.request_id}$")
    assert len(emu.requests_to("POST", PREDICT)) == 1


async def test_closing_the_job_cancels_the_prediction_over_the_wire(emu, settings, inputs, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    emu.plan_jobs(JobPlan(queue_s=30))
    gen = jobs.run_job("replicate", image, audio, settings=settings, store=store)
    rid = (await until(gen, QueuedEvent)).request_id
    await gen.aclose()
    (cancel,) = emu.requests_to("POST", r"/cancel$")
    assert cancel.path == f"/v1/predictions/{rid}/cancel"
    assert cancel.header("authorization") == f"Bearer {TOKEN}"
    assert emu.job(rid).phase(emu.now(), emu.retention_s) == CANCELLED
    assert store.get("replicate", rid).status == "cancelled"


async def test_cancel_of_a_finished_prediction_is_a_no(emu, inputs):
    image, audio = inputs
    client = ReplicateProvider(TOKEN, emu.url)
    try:
        handle = await client.submit(SubmitRequest(await client.upload(image, "image/png"),
                                                   await client.upload(audio, "audio/wav"), version="v2"))
        emu.complete_job_at(handle.request_id, emu.now())
        assert await client.cancel(handle) is False
    finally:
        await client.aclose()
    assert len(emu.requests_to("POST", r"/cancel$")) == 1


# ------------------------------------------------------------------ the emulator's protocol


def test_emulator_refuses_a_missing_or_wrong_token_on_every_route(emu):
    emu.api_keys = {"replicate": {TOKEN}}
    fid = emu.store_file(b"x", "a.png", "image/png").id
    calls = [("POST", f"/v1/models/{MODEL}/predictions", {"json": {"input": {}}}),
             ("GET", "/v1/predictions/abc", {}), ("POST", "/v1/predictions/abc/cancel", {}),
             ("POST", "/v1/files", {"files": {"content": ("a.png", b"x", "image/png")}}),
             ("GET", f"/v1/files/{fid}", {})]
    with httpx.Client(base_url=emu.url) as web:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Key {TOKEN}"}):
            for method, path, kw in calls:
                r = web.request(method, path, headers=headers, **kw)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["title"] == "Unauthenticated" and r.json()["status"] == 401
    assert not emu.jobs


def test_emulator_validates_inputs_with_problem_bodies(emu):
    with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {TOKEN}"}) as web:
        r = web.post(f"/v1/models/{MODEL}/predictions", json={"input": {"image": "https://x/a.png", "mode": "ultra"}})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["title"] == "Input validation failed" and body["status"] == 422
        assert "audio is required" in body["detail"] and "input.mode" in body["detail"]
        r = web.post("/v1/models/kwaivgi/kling-avatar-v1/predictions", json={"input": {}})
        assert r.status_code == 404 and r.json()["title"] == "Not found"
    assert not emu.jobs


async def test_emulator_prefer_wait_holds_the_answer_until_done(emu, inputs):
    image, audio = inputs
    with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as web:
        up = [web.post("/v1/files", files={"content": (p.name, p.read_bytes(), t)}).json()["urls"]["get"]
              for p, t in ((image, "image/png"), (audio, "audio/wav"))]
        r = web.post(f"/v1/models/{MODEL}/predictions", headers={"Prefer": "wait=10"},
                     json={"input": {"image": up[0], "audio": up[1], "mode": "pro"}})
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "succeeded" and body["output"].endswith("/output.mp4")
    assert body["urls"]["cancel"] == f"{emu.url}/v1/predictions/{body['id']}/cancel"


async def test_prediction_is_gone_after_an_hour(inputs, tmp_path):
    image, audio = inputs
    clock = FakeClock()
    with Emulator(queue_s=1, processing_s=2, clock=clock, video_maker=tone_video_maker) as emu:
        client = ReplicateProvider(TOKEN, emu.url)
        try:
            handle = await client.submit(SubmitRequest(await client.upload(image, "image/png"),
                                                       await client.upload(audio, "audio/wav"), version="v2"))
            clock.advance(3599)
            assert (await client.result(handle)).video_url.endswith("/output.mp4")
        finally:
            await client.aclose()
        clock.advance(1)
        with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {TOKEN}"}) as web:
            r = web.get(f"/v1/predictions/{handle.request_id}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        settings = replace(load_settings(env={}, dotenv_path=None), replicate_api_token=Secret(TOKEN),
                           replicate_base_url=emu.url, output_dir=tmp_path / "out")
        events = await collect(jobs.resume("replicate", handle.request_id, settings=settings))
    last = events[-1]
    assert last.kind == "ResultExpired" and handle.request_id in last.message
