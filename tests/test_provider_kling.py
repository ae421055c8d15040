"""Kling's own API end to end: the job loop, the real client, the loopback emulator over HTTP.

Asserts what went over the wire (the JWT, decoded and checked here; ``image`` and
``sound_file`` as raw base64 or URLs; ``mode``), the ``code``/``task_status`` envelope and
its error codes as the user reads them, the token's refresh on an injected clock, and the
MP4 that came back. Kling documents no cancel endpoint, so closing a job sends nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace

import httpx
import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import QUEUED, Emulator, FakeClock, Fault, JobPlan, tone_video_maker
from avatar_core.errors import InputError
from avatar_core.events import Done, FailedEvent, ProcessingEvent, QueuedEvent, Submitted, Uploading
from avatar_core.providers.base import SubmitRequest
from avatar_core.providers.kling import KlingProvider, make_jwt
from avatar_core.store import JobStore
from tests.media_factory import make_image, make_tone
from tests.helpers import check_mp4, collect, run_through_read_faults, until

ACCESS = "ak-test-3fQ9"
SECRET = "sk-test-very-secret-Zp81"
PATH = "/v1/videos/avatar/image2video"
SUBMIT = rf"^{PATH}$"
AUDIO_S = 2.5
MB = 1024 * 1024


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.4, processing_s=1.2, video_maker=tone_video_maker,
                  api_keys={"kling": f"{ACCESS}:{SECRET}"}) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _clean(emu):
    emu.reset()  # also puts the Kling protocol's JWT clock back to wall time
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kling-inputs")
    return make_image(d / "face.jpg", "JPEG", (480, 600)), make_tone(d / "voice.mp3", "mp3", AUDIO_S)


@pytest.fixture
def settings(emu, tmp_path):
    return replace(
        load_settings(env={}, dotenv_path=None),
        kling_access_key=Secret(ACCESS),
        kling_secret_key=Secret(SECRET),
        kling_base_url=emu.url,
        output_dir=tmp_path / "out",
        poll_typical_s=1.0,
        deadline_s=60,
    )




def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(authorization: str | None, secret: str = SECRET) -> dict:
    """The payload of ``Bearer <jwt>`` after checking header and HS256 signature by hand."""
    scheme, _sp, token = (authorization or "").partition(" ")
    assert scheme == "Bearer", authorization
    head, payload, sig = token.split(".")
    assert json.loads(_unb64url(head)) == {"alg": "HS256", "typ": "JWT"}
    expected = hmac.new(secret.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(_unb64url(sig), expected), "signature does not verify with the secret key"
    return json.loads(_unb64url(payload))


def token_of(request) -> str:
    return request.header("authorization").partition(" ")[2]


def kling_requests(emu):
    return emu.requests_to(None, rf"^{PATH}")


def envelope_error(code: int, message: str) -> dict:
    return {"code": code, "message": message, "request_id": "req-test"}


# ------------------------------------------------------------------ the token


def test_jwt_is_hs256_signed_with_the_secret_and_lives_thirty_minutes():
    now = 1_800_000_000.7
    token = make_jwt(ACCESS, SECRET, now)
    payload = decode_jwt(f"Bearer {token}")
    assert payload == {"iss": ACCESS, "exp": 1_800_000_000 + 1800, "nbf": 1_800_000_000 - 5}
    with pytest.raises(AssertionError, match="signature"):
        decode_jwt(f"Bearer {token}", secret="another-secret")
    assert SECRET not in token


async def test_token_is_reused_then_refreshed_before_it_lapses(emu, inputs):
    image, audio = inputs
    clock = FakeClock(1_800_000_000.0)
    emu.protocols["kling"].clock = clock  # the emulator checks nbf/exp on the same clock
    client = KlingProvider(ACCESS, SECRET, emu.url, clock=clock)
    try:
        handle = await client.submit(SubmitRequest(await client.upload(image, "image/jpeg"),
                                                   await client.upload(audio, "audio/mpeg")))
        await client.status(handle)
        clock.advance(1000)  # 800 s left: still reused
        await client.status(handle)
        first = kling_requests(emu)
        assert len(first) == 3 and len({token_of(r) for r in first}) == 1
        assert decode_jwt(first[0].header("authorization"))["exp"] == 1_800_000_000 + 1800

        clock.advance(501)  # 299 s left, under the 300 s margin: a new token before the old one lapses
        await client.status(handle)
        newest = kling_requests(emu)[-1]
        payload = decode_jwt(newest.header("authorization"))
        assert token_of(newest) != token_of(first[0])
        assert payload == {"iss": ACCESS, "exp": 1_800_001_501 + 1800, "nbf": 1_800_001_501 - 5}

        clock.advance(299)  # the first token's exp: the server refuses it, the client is fine
        with httpx.Client(base_url=emu.url) as web:
            stale = web.get(f"{PATH}/{handle.request_id}", headers={"Authorization": f"Bearer {token_of(first[0])}"})
        assert stale.status_code == 401 and stale.json()["code"] == 1004
        await client.status(handle)
        assert token_of(kling_requests(emu)[-1]) == token_of(newest)
    finally:
        await client.aclose()


async def test_server_saying_1004_gets_one_resend_with_a_fresh_token(emu, inputs):
    image, audio = inputs
    ours, theirs = FakeClock(1_800_000_000.0), FakeClock(1_800_000_000.0)
    emu.protocols["kling"].clock = theirs
    client = KlingProvider(ACCESS, SECRET, emu.url, clock=ours)
    try:
        request = SubmitRequest(await client.upload(image, "image/jpeg"), await client.upload(audio, "audio/mpeg"))
        handle = await client.submit(request)
        # Our clock says the cached token has 1000 s left; the server's clock says it lapsed.
        ours.advance(800)
        theirs.advance(1800)
        await client.status(handle)
        gets = emu.requests_to("GET", rf"^{PATH}/")
        assert len(gets) == 2
        assert decode_jwt(gets[0].header("authorization"))["exp"] == 1_800_001_800  # refused: 1004
        assert decode_jwt(gets[1].header("authorization"))["exp"] == 1_800_000_800 + 1800  # fresh, accepted

        # The same on submit: a 401 with 1004 created no task, so one resend is safe.
        ours.advance(800)
        theirs.advance(900)
        await client.submit(request)
    finally:
        await client.aclose()
    posts = emu.requests_to("POST", SUBMIT)
    assert len(posts) == 3 and len(emu.jobs) == 2
    assert decode_jwt(posts[2].header("authorization"))["exp"] > decode_jwt(posts[1].header("authorization"))["exp"]


async def test_wrong_secret_is_an_auth_error_that_hides_both_keys(emu, settings, inputs):
    image, audio = inputs
    events = await collect(jobs.run_job("kling", image, audio, settings=settings, api_key=f"{ACCESS}:wrong-secret"))
    last = events[-1]
    assert last.kind == "AuthError" and "access key / secret key" in last.message
    assert "code 1002" in last.message
    assert "wrong-secret" not in last.message and ACCESS not in last.message
    assert len(emu.requests_to("POST", SUBMIT)) == 1  # 1002 is not an expiry: no resend
    assert not emu.jobs


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("tier,mode", [("standard", "std"), ("pro", "pro")])
async def test_end_to_end_both_modes(emu, settings, inputs, tier, mode, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    events = await collect(jobs.run_job("kling", image, audio, tier=tier, settings=settings, store=store))
    done = events[-1]
    assert isinstance(done, Done), done
    check_mp4(done.path, AUDIO_S)
    model = f"kling-avatar-{mode}"
    assert done.metadata["model"] == model and done.metadata["tier"] == tier
    assert float(done.metadata["duration"]) == pytest.approx(AUDIO_S, abs=0.1)  # Kling's videos[0].duration
    assert any(isinstance(e, Uploading) for e in events)  # local checks only: no upload call exists
    assert any(isinstance(e, QueuedEvent) for e in events)

    requests = emu.requests.snapshot()
    assert all(r.path.startswith(PATH) or r.path.startswith("/emulator/outputs/") for r in requests)
    (submit,) = emu.requests_to("POST", SUBMIT)
    body = submit.json
    assert set(body) == {"image", "sound_file", "mode"} and body["mode"] == mode
    # Raw base64, no data: prefix, byte-exact.
    assert not body["image"].startswith("data:") and base64.b64decode(body["image"]) == image.read_bytes()
    assert not body["sound_file"].startswith("data:") and base64.b64decode(body["sound_file"]) == audio.read_bytes()
    polls = emu.requests_to("GET", rf"^{PATH}/{done.request_id}$")
    assert polls
    for r in [submit, *polls]:
        payload = decode_jwt(r.header("authorization"))
        assert payload["iss"] == ACCESS and payload["exp"] - payload["nbf"] == 1805
        assert SECRET not in r.body.decode("latin-1") and SECRET not in json.dumps(r.headers)
    assert emu.job(done.request_id).tier == tier
    row = store.get("kling", done.request_id)
    assert row.status == "completed" and row.model == model


async def test_prompt_is_sent_as_given_and_links_are_refused(emu, settings, inputs):
    image, audio = inputs
    events = await collect(jobs.run_job("kling", image, audio, prompt="speaks warmly", settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    body = emu.requests_to("POST", SUBMIT)[0].json
    assert body["prompt"] == "speaks warmly" and body["mode"] == "std"
    # The checked files travel inline, byte for byte (issue 14.4: never a link).
    assert base64.b64decode(body["image"]) == image.read_bytes()
    assert base64.b64decode(body["sound_file"]) == audio.read_bytes()
    img_url = emu.file_url(emu.store_file(image.read_bytes(), "face.jpg", "image/jpeg"))
    aud_url = emu.file_url(emu.store_file(audio.read_bytes(), "voice.mp3", "audio/mpeg"))
    events = await collect(jobs.run_job("kling", img_url, aud_url, settings=settings))
    assert isinstance(events[-1], FailedEvent) and events[-1].kind == "InputError"
    assert len(emu.requests_to("POST", SUBMIT)) == 1


async def test_inline_files_within_klings_limits_and_over_them_refused_before_sending(emu, tmp_path):
    client = KlingProvider(ACCESS, SECRET, emu.url)
    try:
        at_limit = tmp_path / "at.mp3"
        at_limit.write_bytes(b"\x01" * (5 * MB))
        assert base64.b64decode(await client.upload(at_limit, "audio/mpeg")) == at_limit.read_bytes()
        over = tmp_path / "over.mp3"
        over.write_bytes(b"\x01" * (5 * MB + 1))
        with pytest.raises(InputError, match=r"at most 5 MB inline.*URL for the audio"):
            await client.upload(over, "audio/mpeg")
        # Images may be bigger (10 MB) than sound (5 MB).
        picture = tmp_path / "big.jpg"
        picture.write_bytes(b"\x02" * (10 * MB))
        assert len(base64.b64decode(await client.upload(picture, "image/jpeg"))) == 10 * MB
        picture.write_bytes(b"\x02" * (10 * MB + 1))
        with pytest.raises(InputError, match=r"at most 10 MB inline.*URL for the image"):
            await client.upload(picture, "image/jpeg")
    finally:
        await client.aclose()
    assert len(emu.requests) == 0


# ------------------------------------------------------------------ faults


async def test_429_and_5xx_on_reads_are_survived_with_one_submit(emu, settings, inputs):
    polls = await run_through_read_faults(emu, "kling", settings, inputs, [
        Fault("status", rf"^{PATH}/", method="GET", count=1, status=429, retry_after=1),
        Fault("status", rf"^{PATH}/", method="GET", count=3, status=503),
        Fault("body", rf"^{PATH}/", method="GET", count=1, body=envelope_error(5000, "Server internal error")),
    ], poll=rf"^{PATH}/", submit=SUBMIT)
    assert len(polls) >= 6


async def test_rate_limit_on_submit_is_a_refusal_so_it_is_sent_again(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("status", SUBMIT, method="POST", status=429, retry_after=1, message="API request too fast"))
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    posts = emu.requests_to("POST", SUBMIT)
    assert len(posts) == 2 and len(emu.jobs) == 1
    assert posts[1].wall - posts[0].wall >= 0.95


@pytest.mark.parametrize("code,kind,words", [
    (1102, "CreditsError", "used up its resource pack"),
    (1101, "CreditsError", "is in arrears"),
    (1100, "AuthError", "problem with the account"),
])
async def test_account_codes_on_http_429_are_not_waited_out(emu, settings, inputs, code, kind, words):
    image, audio = inputs
    emu.faults.add(Fault("body", SUBMIT, method="POST", status=429, body=envelope_error(code, "Account says no")))
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == kind and words in last.message
    assert f"code {code}: Account says no" in last.message
    assert len(emu.requests_to("POST", SUBMIT)) == 1


@pytest.mark.parametrize("fault,words", [
    (Fault("status", SUBMIT, method="POST", status=500, message="Server internal error"), "HTTP 500"),
    (Fault("drop", SUBMIT, method="POST"), "connection"),
    (Fault("body", SUBMIT, method="POST", body=envelope_error(5001, "Server temporarily unavailable")), "code 5001"),
])
async def test_uncertain_submits_are_never_resent(emu, settings, inputs, fault, words):
    image, audio = inputs
    emu.faults.add(fault)
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.kind == "SubmitUncertain"
    assert words in last.message and "before submitting again" in last.message
    assert len(emu.requests_to("POST", SUBMIT)) == 1
    if fault.kind == "drop":
        assert len(emu.jobs) == 1  # the task exists: that is why it must not be sent twice


async def test_a_refused_request_shows_klings_code_and_message(emu, settings, inputs):
    image, audio = inputs
    emu.faults.add(Fault("body", SUBMIT, method="POST", status=400,
                         body=envelope_error(1301, "Trigger content security policy")))
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "InputError" and "code 1301: Trigger content security policy" in last.message


async def test_failed_task_shows_klings_message_and_the_task_id(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(fail="Failure to pass the risk control system"))
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    last = events[-1]
    task_id = next(e for e in events if isinstance(e, Submitted)).request_id
    assert last.kind == "JobFailed"
    assert "Kling API reports the job failed: Failure to pass the risk control system" in last.message
    assert task_id in last.message


async def test_unknown_task_status_is_an_error_not_processing(emu, settings, inputs):
    image, audio = inputs
    emu.plan_jobs(JobPlan(status_value="queueing"))
    events = await collect(jobs.run_job("kling", image, audio, settings=settings))
    last = events[-1]
    assert last.kind == "ProtocolError" and "'queueing'" in last.message and "resume" in last.message
    assert not any(isinstance(e, ProcessingEvent) for e in events)
    assert len(emu.requests_to("GET", rf"^{PATH}/")) == 3  # three strikes, then the user is told


# ------------------------------------------------------------------ resume and (no) cancel


async def test_resume_from_the_task_id_alone(emu, settings, inputs):
    image, audio = inputs
    client = KlingProvider(ACCESS, SECRET, emu.url)
    try:
        request = SubmitRequest(await client.upload(image, "image/jpeg"), await client.upload(audio, "audio/mpeg"),
                                tier="pro")
        handle = await client.submit(request)
    finally:
        await client.aclose()
    events = await collect(jobs.resume("kling", handle.request_id, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    check_mp4(events[-1].path, AUDIO_S)
    assert emu.requests_to("GET", rf"^{PATH}/{handle.request_id}$")
    assert len(emu.requests_to("POST", SUBMIT)) == 1


async def test_closing_the_job_sends_nothing_and_leaves_it_resumable(emu, settings, inputs, tmp_path):
    image, audio = inputs
    store = JobStore(tmp_path / "jobs.sqlite3")
    emu.plan_jobs(JobPlan(queue_s=30))
    gen = jobs.run_job("kling", image, audio, settings=settings, store=store)
    task_id = (await until(gen, QueuedEvent)).request_id
    before = len(emu.requests)
    await gen.aclose()
    assert len(emu.requests) == before  # Kling has no cancel endpoint: nothing is sent
    assert {r.method for r in emu.requests} == {"POST", "GET"} and len(emu.requests_to("POST", ".*")) == 1
    assert emu.job(task_id).phase(emu.now(), emu.retention_s) == QUEUED  # it runs on at Kling
    row = store.get("kling", task_id)
    assert row.status != "cancelled" and "may still finish" in row.status_history[-1].detail


# ------------------------------------------------------------------ the emulator's protocol


def test_emulator_refuses_bad_tokens_with_klings_codes(emu):
    now = emu.protocols["kling"].clock()
    cases = [
        ({}, 1001),
        ({"Authorization": "Bearer not.a.jwt"}, 1002),
        ({"Authorization": f"Bearer {make_jwt(ACCESS, 'wrong-secret', now)}"}, 1002),
        ({"Authorization": f"Bearer {make_jwt('someone-else', SECRET, now)}"}, 1002),
        ({"Authorization": f"Bearer {make_jwt(ACCESS, SECRET, now + 600)}"}, 1003),
        ({"Authorization": f"Bearer {make_jwt(ACCESS, SECRET, now - 1801)}"}, 1004),
    ]
    with httpx.Client(base_url=emu.url) as web:
        for headers, code in cases:
            for method, path in (("POST", PATH), ("GET", f"{PATH}/abc")):
                r = web.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.json()["code"] == code, (headers, method)
                assert r.json()["request_id"]
    assert not emu.jobs


def test_emulator_checks_inline_inputs(emu):
    token = make_jwt(ACCESS, SECRET, emu.protocols["kling"].clock())
    good_audio = base64.b64encode(b"ID3" + b"\0" * 100).decode()
    cases = [
        ({"image": "data:image/png;base64,iVBORw0KGgo=", "sound_file": good_audio}, "data:"),
        ({"image": "!!not base64!!", "sound_file": good_audio}, "neither a URL nor valid base64"),
        ({"image": "https://example.test/a.jpg", "sound_file": base64.b64encode(b"\0" * (5 * MB + 1)).decode()},
         "limit is 5 MB"),
        ({"image": "https://example.test/a.jpg", "sound_file": good_audio, "mode": "ultra"}, "mode"),
        ({"image": "https://example.test/a.jpg", "sound_file": good_audio, "prompt": "x" * 2501}, "2500"),
    ]
    with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {token}"}) as web:
        for body, words in cases:
            r = web.post(PATH, json=body)
            assert r.status_code == 400 and r.json()["code"] == 1201 and words in r.json()["message"], body
    assert not emu.jobs


async def test_task_is_gone_after_the_retention_period(inputs, tmp_path):
    image, audio = inputs
    clock = FakeClock()
    with Emulator(queue_s=1, processing_s=2, retention_s=600, clock=clock, video_maker=tone_video_maker,
                  api_keys={"kling": f"{ACCESS}:{SECRET}"}) as emu:
        client = KlingProvider(ACCESS, SECRET, emu.url)
        try:
            handle = await client.submit(SubmitRequest(await client.upload(image, "image/jpeg"),
                                                       await client.upload(audio, "audio/mpeg")))
            clock.advance(599)
            assert (await client.result(handle)).video_url.endswith("/output.mp4")
        finally:
            await client.aclose()
        clock.advance(1)
        token = make_jwt(ACCESS, SECRET, emu.protocols["kling"].clock())
        with httpx.Client(base_url=emu.url, headers={"Authorization": f"Bearer {token}"}) as web:
            r = web.get(f"{PATH}/{handle.request_id}")
        assert r.status_code == 404 and r.json()["code"] == 1203
        settings = replace(load_settings(env={}, dotenv_path=None), kling_access_key=Secret(ACCESS),
                           kling_secret_key=Secret(SECRET), kling_base_url=emu.url, output_dir=tmp_path / "out")
        events = await collect(jobs.resume("kling", handle.request_id, settings=settings))
    last = events[-1]
    assert last.kind == "ResultExpired" and handle.request_id in last.message
