"""fal.ai end to end: the job loop, the real client, the loopback emulator over HTTP.

Asserts what went over the wire (paths with the dropped sub-path, ``Key`` auth, data
URIs), the events the user sees, and the MP4 that came back.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import httpx
import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, Fault, JobPlan, tone_video_maker
from avatar_core.emulator.server import CANCELLED
from avatar_core.errors import InputError, ProtocolError
from avatar_core.events import Done, FailedEvent, ProcessingEvent, QueuedEvent, Submitted
from avatar_core.providers.base import Completed, JobHandle, Processing, Queued, SubmitRequest
from avatar_core.providers.fal import FalProvider, app_path
from tests.media_factory import make_image, make_tone
from tests.helpers import check_mp4, collect, run_through_read_faults, until

KEY = "fal-test-key-789"
APP = "/fal-ai/kling-video"
AUDIO_S = 2.5


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.4, processing_s=1.2, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu):
    emu.reset()
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fal-inputs")
    return make_image(d / "face.png", "PNG", (480, 600)), make_tone(d / "voice.wav", "wav", AUDIO_S)


@pytest.fixture
def settings(emu, tmp_path):
    return replace(
        load_settings(env={}, dotenv_path=None),
        fal_key=Secret(KEY),
        fal_base_url=emu.url,
        output_dir=tmp_path / "out",
        poll_typical_s=1.0,
        deadline_s=60,
    )




def decode(data_uri: str) -> tuple[str, bytes]:
    head, payload = data_uri.split(",", 1)
    return head, base64.b64decode(payload)


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize(
    "tier,version,endpoint",
    [
        ("standard", "v1", "fal-ai/kling-video/v1/standard/ai-avatar"),
        ("pro", "v1", "fal-ai/kling-video/v1/pro/ai-avatar"),
        ("standard", "v2", "fal-ai/kling-video/ai-avatar/v2/standard"),
        ("pro", "v2", "fal-ai/kling-video/ai-avatar/v2/pro"),
    ],
)
async def test_end_to_end_every_endpoint(emu, settings, inputs, tier, version, endpoint):
    image, audio = inputs
    events = await collect(jobs.run_job("fal", image, audio, tier=tier, version=version, settings=settings))
    done = events[-1]
    assert isinstance(done, Done), done
    check_mp4(done.path, AUDIO_S)
    assert done.metadata["model"] == endpoint and done.metadata["tier"] == tier
    rid = done.request_id
    assert any(isinstance(e, QueuedEvent) for e in events)
    progress = [e for e in events if isinstance(e, ProcessingEvent) and e.logs]
    assert progress and progress[-1].logs[0] == "Starting avatar generation"

    (submit,) = emu.requests_to("POST", ".*")  # no upload call: files ride in the submit
    assert submit.path == f"/{endpoint}"
    assert set(submit.json) == {"image_url", "audio_url", "prompt"}
    assert submit.json["prompt"] == "."  # fal's default for an empty prompt
    head, raw = decode(submit.json["image_url"])
    assert head == "data:image/png;base64" and raw == image.read_bytes()
    head, raw = decode(submit.json["audio_url"])
    assert head == "data:audio/wav;base64" and raw == audio.read_bytes()
    # Status and result use /{owner}/{app}/requests/{id}: the endpoint's sub-path is dropped.
    polls = emu.requests_to("GET", rf"^{APP}/requests/{rid}/status$")
    assert polls and all(p.param("logs") == "1" for p in polls)
    assert len(emu.requests_to("GET", rf"^{APP}/requests/{rid}$")) == 1
    assert not emu.requests_to(None, rf"^/{endpoint}/requests")
    for r in emu.requests_to(None, r"^/fal-ai/"):
        assert r.header("authorization") == f"Key {KEY}"


async def test_prompt_is_sent_as_given(emu, settings, inputs):
    image, audio = inputs
    events = await collect(jobs.run_job("fal", image, audio, prompt="a calm smile", settings=settings))
    assert isinstance(events[-1], Done)
    assert emu.requests_to("POST", "^/fal-ai/")[0].json["prompt"] == "a calm smile"


# ------------------------------------------------------------------ faults


async def test_429_and_5xx_on_status_reads_are_survived_with_one_submit(emu, settings, inputs):
    polls = await run_through_read_faults(emu, "fal", settings, inputs, [
        Fault("status", r"/status$", count=1, status=429, retry_after=1),
        Fault("status", r"/status$", count=3, status=503),
    ], poll=r"/status$", submit=r"^/fal-ai/")
    assert len(polls) >= 5


async def test_failed_request_names_the_request_id_and_error_type(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(fail="Face not detected in the image"))
    events = await collect(jobs.run_job("fal", image, audio, settings=settings))
    last = events[-1]
    rid = next(e for e in events if isinstance(e, Submitted)).request_id
    assert isinstance(last, FailedEvent) and last.kind == "JobFailed"
    assert "Face not detected" in last.message and rid in last.message
    assert "runner_server_error" in last.message
    assert not emu.requests_to("GET", rf"^{APP}/requests/{rid}$")  # no result read for a failure


async def test_bad_key_is_an_auth_error_that_hides_the_key(emu, settings, inputs):
    image, audio = inputs
    emu.api_keys = {"fal": {KEY}}
    try:
        events = await collect(jobs.run_job("fal", image, audio, settings=settings, api_key="wrong-fal-key"))
    finally:
        emu.api_keys = {}
    last = events[-1]
    assert last.kind == "AuthError" and "key" in last.message and "wrong-fal-key" not in last.message


async def test_submit_5xx_is_uncertain_and_names_fals_error_type(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", r"^/fal-ai/kling-video/v1/", method="POST", status=504, message="upstream slow"))
    events = await collect(jobs.run_job("fal", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "SubmitUncertain"
    assert "upstream slow" in last.message and "[request_timeout]" in last.message  # x-fal-error-type
    assert len(emu.requests_to("POST", r"^/fal-ai/")) == 1


async def test_urls_on_another_host_never_get_the_key(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("body", r"^/fal-ai/kling-video/v1/", method="POST", body={
        "request_id": "abc123",
        "status_url": "https://collector.example/steal/status",
        "response_url": "https://collector.example/steal",
        "cancel_url": "https://collector.example/steal/cancel",
    }))
    client = FalProvider(KEY, emu.url)
    try:
        handle = await client.submit(SubmitRequest("data:image/png;base64,AA==", "data:audio/wav;base64,AA=="))
        assert client.request_url(handle, "status") == f"{emu.url}{APP}/requests/abc123/status"
    finally:
        await client.aclose()


async def test_an_oversized_inline_file_is_refused_before_sending(tmp_path, emu):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    client = FalProvider(KEY, emu.url)
    try:
        with pytest.raises(InputError, match="URL"):
            await client.upload(big, "image/png")
    finally:
        await client.aclose()
    assert len(emu.requests) == 0


# ------------------------------------------------------------------ resume and cancel


async def test_resume_from_the_request_id_alone(emu, settings, inputs):
    image, audio = inputs
    client = FalProvider(KEY, emu.url)
    try:
        request = SubmitRequest(await client.upload(image, "image/png"), await client.upload(audio, "audio/wav"),
                                tier="pro", version="v2")
        handle = await client.submit(request)
    finally:
        await client.aclose()
    assert emu.requests_to("POST", ".*")[0].path == "/fal-ai/kling-video/ai-avatar/v2/pro"

    # A new process: no submit URLs at hand, only (provider, request id).
    events = await collect(jobs.resume("fal", handle.request_id, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    check_mp4(events[-1].path, AUDIO_S)
    assert emu.requests_to("GET", rf"^{APP}/requests/{handle.request_id}/status$")
    assert len(emu.requests_to("POST", ".*")) == 1


async def test_closing_the_job_cancels_it_over_the_wire(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(queue_s=30))
    gen = jobs.run_job("fal", image, audio, settings=settings)
    rid = (await until(gen, QueuedEvent)).request_id
    await gen.aclose()
    (put,) = emu.requests_to("PUT", ".*")
    assert put.path == f"{APP}/requests/{rid}/cancel" and put.header("authorization") == f"Key {KEY}"
    assert emu.job(rid).phase(emu.now(), emu.retention_s) == CANCELLED


# ------------------------------------------------------------------ streaming status


async def test_stream_status_pushes_until_completed(emu, inputs):
    image, audio = inputs
    client = FalProvider(KEY, emu.url)
    try:
        request = SubmitRequest(await client.upload(image, "image/png"), await client.upload(audio, "audio/wav"))
        handle = await client.submit(request)
        seen = [s async for s in client.stream_status(handle)]
        # Rebuilt handle, new client: the stream URL is derived from the request id too.
        fresh = FalProvider(KEY, emu.url)
        try:
            assert isinstance(await fresh.result(JobHandle("fal", handle.request_id)), Completed)
        finally:
            await fresh.aclose()
    finally:
        await client.aclose()
    assert isinstance(seen[0], Queued) and seen[0].position == 0
    assert any(isinstance(s, Processing) and s.logs for s in seen)
    assert isinstance(seen[-1], Completed)
    (stream,) = emu.requests_to("GET", r"/status/stream$")
    assert stream.path == f"{APP}/requests/{handle.request_id}/status/stream"


async def test_stream_status_reads_events_as_the_sse_rules_say():
    """Keep-alive comments and events with no data are skipped, an event's ``data:`` lines
    are joined with newlines, ``event:``/``id:`` fields do not get in the way, and the
    request asks for an event stream."""
    body = (": keep-alive\n\n"
            'data: {"status": "IN_QUEUE",\ndata:  "queue_position": 2}\n\n'
            "event: status\nid: 6\n\n"
            'event: status\nid: 7\ndata: {"status": "IN_PROGRESS", "logs": [{"message": "step 1"}]}\n\n'
            'data: {"status": "COMPLETED"}\n\n')
    seen_requests = []

    def reply(request):
        seen_requests.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = FalProvider(KEY, "http://fal.test", transport=httpx.MockTransport(reply))
    try:
        got = [s async for s in client.stream_status(JobHandle("fal", "rid-1", model=f"{APP}/ai-avatar"))]
    finally:
        await client.aclose()
    assert [type(s) for s in got] == [Queued, Processing, Completed]
    assert got[0].position == 2 and got[1].logs == ("step 1",)
    (request,) = seen_requests
    assert request.headers["accept"] == "text/event-stream"
    assert request.url.path == f"{APP}/requests/rid-1/status/stream" and request.url.params["logs"] == "1"


async def test_a_status_event_that_is_not_json_is_a_protocol_error():
    def reply(request):
        return httpx.Response(200, text="data: {not json\n\n", headers={"content-type": "text/event-stream"})

    client = FalProvider(KEY, "http://fal.test", transport=httpx.MockTransport(reply))
    try:
        with pytest.raises(ProtocolError, match="not JSON"):
            [s async for s in client.stream_status(JobHandle("fal", "rid-1", model=f"{APP}/ai-avatar"))]
    finally:
        await client.aclose()


def test_app_path_keeps_owner_and_app():
    assert app_path("fal-ai/kling-video/ai-avatar/v2/pro") == "fal-ai/kling-video"
    with pytest.raises(ValueError):
        app_path("kling")


def test_error_detail_reads_the_header_and_the_body():
    client = FalProvider(KEY, "http://127.0.0.1:9")
    r = httpx.Response(500, json={"detail": "boom"}, headers={"x-fal-error-type": "runner_disconnected"})
    assert client.error_detail(r) == "boom [runner_disconnected]"
    r = httpx.Response(422, json={"detail": [{"loc": ["body", "image_url"], "msg": "field required"}]})
    assert client.error_detail(r) == "field required"
