"""WaveSpeed and Segmind end to end: the job loop, the real clients, the loopback emulator.

Every test asserts what went over the wire (paths, auth header, body fields, upload
form), the events the user would see, and the MP4 that came back.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, Fault, JobPlan, tone_video_maker
from avatar_core.events import Done, FailedEvent, ProcessingEvent, QueuedEvent, Submitted, Uploading
from avatar_core.store import JobStore
from tests.media_factory import make_image, make_tone
from tests.helpers import check_mp4, collect, run_through_read_faults, until

WS_KEY = "ws-test-key-123"
SM_KEY = "sm-test-key-456"


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.3, processing_s=0.6, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu):
    emu.reset()
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    image = make_image(d / "face.png", "PNG", (480, 600))
    audio = make_tone(d / "voice.wav", "wav", 2.5)
    return image, audio


@pytest.fixture
def settings(emu, tmp_path):
    base = load_settings(env={}, dotenv_path=None)
    return replace(
        base,
        wavespeed_api_key=Secret(WS_KEY),
        segmind_api_key=Secret(SM_KEY),
        wavespeed_base_url=emu.url,
        segmind_base_url=emu.url,
        segmind_upload_url=emu.url + "/upload-asset",
        output_dir=tmp_path / "out",
        poll_typical_s=1.0,
        deadline_s=60,
    )




def stages(events) -> list[str]:
    out = []
    for e in events:
        name = type(e).__name__
        if not out or out[-1] != name:
            out.append(name)
    return out


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("tier", ["standard", "pro"])
async def test_wavespeed_end_to_end(emu, settings, inputs, tier, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    events = await collect(jobs.run_job("wavespeed", image, audio, tier=tier, prompt="smile", settings=settings,
                                        store=store, audio_seconds=2.5))
    assert stages(events)[:2] == ["Uploading", "Submitted"]
    assert "Downloading" in stages(events) and isinstance(events[-1], Done), events[-1]
    done = events[-1]
    check_mp4(done.path, 2.5)
    assert done.path.parent == settings.output_dir / "videos"

    # The wire: two presigned uploads (no key sent to the PUT target), one submit, polls.
    uploads = emu.requests_to("POST", r"^/api/v3/media/uploads$")
    assert [u.json["filename"] for u in uploads] == ["face.png", "voice.wav"]
    assert uploads[0].json["content_type"] == "image/png" and uploads[1].json["content_type"] == "audio/wav"
    assert uploads[0].json["size"] == image.stat().st_size
    puts = emu.requests_to("PUT", ".*")
    assert len(puts) == 2 and all(p.header("authorization") is None for p in puts)
    assert puts[0].body == image.read_bytes()
    model = f"kwaivgi/kling-v1-ai-avatar-{tier}"
    submits = emu.requests_to("POST", rf"^/api/v3/{model}$")
    assert len(submits) == 1
    body = submits[0].json
    assert set(body) == {"image", "audio", "prompt"} and body["prompt"] == "smile"
    assert body["image"].startswith(emu.url) and body["audio"].startswith(emu.url)
    polls = emu.requests_to("GET", rf"^/api/v3/predictions/{done.request_id}/result$")
    assert polls
    for r in submits + polls + uploads:
        assert r.header("authorization") == f"Bearer {WS_KEY}"
    # The row tells the whole story.
    row = store.get("wavespeed", done.request_id)
    assert row.status == "completed" and row.model == model and row.tier == tier
    assert row.status_history[0].status == "submitted"


@pytest.mark.parametrize("tier", ["standard", "pro"])
async def test_segmind_end_to_end(emu, settings, inputs, tier):
    image, audio = inputs
    events = await collect(jobs.run_job("segmind", image, audio, tier=tier, settings=settings))
    done = events[-1]
    assert isinstance(done, Done), done
    check_mp4(done.path, 2.5)
    assert any(isinstance(e, QueuedEvent) for e in events) or any(isinstance(e, ProcessingEvent) for e in events)

    uploads = emu.requests_to("POST", r"^/upload-asset$")
    assert len(uploads) == 2
    data_url = uploads[0].json["data_urls"][0]
    assert data_url.startswith("data:image/png;base64,")
    assert base64.b64decode(data_url.split(",", 1)[1]) == image.read_bytes()
    slug = {"standard": "kling-v1-standard-ai-avatar", "pro": "kling-v1-pro-ai-avatar"}[tier]
    submits = emu.requests_to("POST", rf"^/v2/{slug}$")
    assert len(submits) == 1
    assert set(submits[0].json) == {"image_url", "audio_url"}  # no prompt given: none sent
    for r in submits + uploads + emu.requests_to("GET", r"^/v2/requests/"):
        assert r.header("x-api-key") == SM_KEY and r.header("authorization") is None
    assert emu.requests_to("GET", rf"^/v2/requests/{done.request_id}/status$")
    assert emu.requests_to("GET", rf"^/v2/requests/{done.request_id}$")  # the result read


async def test_v2_models_use_their_own_ids(emu, settings, inputs):
    image, audio = inputs
    await collect(jobs.run_job("wavespeed", image, audio, version="v2", settings=settings))
    await collect(jobs.run_job("segmind", image, audio, tier="pro", version="v2", settings=settings))
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/kling-v2-ai-avatar-standard$")) == 1
    assert len(emu.requests_to("POST", r"^/v2/kling-v2-pro-avatar$")) == 1


async def test_links_are_refused_so_the_provider_only_gets_checked_files(emu, settings, inputs):
    # Issue 14.4 (behaviour changed on purpose): links used to be passed through when the
    # checks changed nothing; a link can serve the provider other bytes, so never again.
    image, audio = inputs
    img_url = emu.url + emu.file_url(emu.store_file(image.read_bytes(), "face.png", "image/png"))[len(emu.url):]
    aud_url = emu.url + emu.file_url(emu.store_file(audio.read_bytes(), "voice.wav", "audio/wav"))[len(emu.url):]
    events = await collect(jobs.run_job("wavespeed", img_url, aud_url, settings=settings))
    assert isinstance(events[-1], FailedEvent) and events[-1].kind == "InputError"
    assert not any(isinstance(e, (Uploading, Submitted)) for e in events)
    assert emu.requests_to("POST", r".*") == []


# ------------------------------------------------------------------ faults


async def test_rate_limit_and_5xx_bursts_on_reads_are_survived_with_one_submit(emu, settings, inputs):
    polls = await run_through_read_faults(emu, "wavespeed", settings, inputs, [
        Fault("status", r"/result$", count=1, status=429, retry_after=1),
        Fault("status", r"/result$", count=1, status=429),
        Fault("status", r"/result$", count=3, status=502),
    ], poll=r"/result$", submit=r"^/api/v3/kwaivgi/")
    assert len(polls) >= 6


async def test_segmind_5xx_bursts_are_survived(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", r"/status$", count=2, status=503),
                   Fault("status", r"^/v2/requests/[^/]+$", count=1, status=500))
    events = await collect(jobs.run_job("segmind", image, audio, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    assert len(emu.requests_to("POST", r"^/v2/kling")) == 1


async def test_dropped_submit_is_never_resent_and_says_where_to_look(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("drop", r"^/api/v3/kwaivgi/", method="POST"))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=settings))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.kind == "SubmitUncertain"
    assert "dashboard" in last.message and "may have" in last.message
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1
    assert len(emu.jobs) == 1  # the emulator did create the job: that is why we must not resend


@pytest.mark.parametrize("provider", ["wavespeed", "segmind"])
async def test_failed_job_names_the_request_id(emu, settings, inputs, provider):
    image, audio = inputs
    emu.plan_jobs(JobPlan(fail="Content blocked by the safety filter"))
    events = await collect(jobs.run_job(provider, image, audio, settings=settings))
    last = events[-1]
    submitted = next(e for e in events if isinstance(e, Submitted))
    assert isinstance(last, FailedEvent) and last.kind == "JobFailed"
    assert "safety filter" in last.message and submitted.request_id in last.message


async def test_segmind_out_of_credits(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", r"^/v2/kling", method="POST", status=406, message="Insufficient credits"))
    events = await collect(jobs.run_job("segmind", image, audio, settings=settings))
    assert events[-1].kind == "CreditsError" and "credits" in events[-1].message.lower()
    assert len(emu.requests_to("POST", r"^/v2/kling")) == 1


async def test_wavespeed_http_200_with_error_code_on_submit(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("app_error", r"^/api/v3/kwaivgi/", method="POST", message="internal inference error"))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=settings))
    assert events[-1].kind == "SubmitUncertain" and "internal inference error" in events[-1].message
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1


async def test_wavespeed_http_200_with_error_code_on_read_is_retried(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("app_error", r"/result$", count=2, message="busy"))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=settings))
    assert isinstance(events[-1], Done)


@pytest.mark.parametrize("provider", ["wavespeed", "segmind"])
async def test_bad_key_gives_the_providers_401_and_a_clear_message(emu, settings, inputs, provider):
    image, audio = inputs
    emu.api_keys = {"wavespeed": {WS_KEY}, "segmind": {SM_KEY}}
    try:
        events = await collect(jobs.run_job(provider, image, audio, settings=settings, api_key="wrong-key"))
    finally:
        emu.api_keys = {}
    last = events[-1]
    assert last.kind == "AuthError" and "key" in last.message
    assert "wrong-key" not in last.message
    assert not emu.requests_to("POST", r"^/(api/v3/kwaivgi|v2/kling)")  # stopped at the upload


async def test_slow_answer_past_the_read_timeout_is_retried(emu, settings, inputs):
    import httpx

    from avatar_core.providers.wavespeed import WaveSpeedProvider

    image, audio = inputs
    emu.faults.add(Fault("slow", r"/result$", count=1, delay_s=1.5))
    client = WaveSpeedProvider(WS_KEY, emu.url, timeout=httpx.Timeout(0.5))
    try:
        events = await collect(jobs.run_job("wavespeed", image, audio, settings=settings, client=client))
    finally:
        await client.aclose()
    assert isinstance(events[-1], Done), events[-1]
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1


@pytest.mark.parametrize("video,kind", [("404", "ResultExpired"), ("403", "ResultExpired"), ("html", "ResultInvalid")])
async def test_bad_result_links(emu, settings, inputs, video, kind):
    image, audio = inputs
    emu.plan_jobs(JobPlan(video=video))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=settings))
    assert events[-1].kind == kind, events[-1]
    assert events[-1].request_id in events[-1].message
    assert not list((settings.output_dir / "videos").glob("*.mp4"))


async def test_video_larger_than_the_cap_is_refused(emu, settings, inputs):
    image, audio = inputs
    capped = replace(settings, max_video_bytes=1024 * 1024)
    emu.plan_jobs(JobPlan(video="huge", huge_bytes=5 * 1024 * 1024, huge_declared=True))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=capped))
    assert events[-1].kind == "ResultInvalid" and "limit" in events[-1].message
    # Undeclared (chunked) zeros are refused too, and nothing is left on disk.
    emu.plan_jobs(JobPlan(video="huge", huge_bytes=5 * 1024 * 1024, huge_declared=False))
    events = await collect(jobs.run_job("wavespeed", image, audio, settings=capped))
    assert events[-1].kind == "ResultInvalid"
    assert not list((settings.output_dir / "videos").glob("*"))


async def test_unknown_status_value_ends_with_a_resume_hint(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(status_value="WARMING_UP"))
    events = await collect(jobs.run_job("segmind", image, audio, settings=settings))
    assert events[-1].kind == "ProtocolError"
    assert "WARMING_UP" in events[-1].message and "resume" in events[-1].message


async def test_expired_job_on_resume(emu, settings):
    events = await collect(jobs.resume("segmind", "no-such-request", settings=settings))
    assert events[-1].kind == "ResultExpired" and "no-such-request" in events[-1].message


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("provider", ["wavespeed", "segmind"])
async def test_a_job_left_behind_is_resumed_to_its_video(emu, settings, inputs, provider, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    gen = jobs.run_job(provider, image, audio, settings=settings, store=store)
    request_id = (await until(gen, Submitted)).request_id
    await gen.aclose()  # the tab closed: neither provider can cancel, so the job runs on
    assert store.get(provider, request_id).status == "submitted"

    events = await collect(jobs.resume(provider, request_id, settings=settings, store=store))
    assert isinstance(events[-1], Done) and events[-1].request_id == request_id
    check_mp4(events[-1].path, 2.5)
    assert len(emu.requests_to("POST", r"^/(api/v3/kwaivgi|v2/kling)")) == 1
    row = store.get(provider, request_id)
    assert row.status == "completed" and row.output_path == str(events[-1].path)
