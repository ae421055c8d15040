"""Credentials derived from a key (the Kling JWT, header values) are scrubbed like keys.

A provider that echoes the request's Authorization header back ("...Authorization: Bearer
eyJ...") must not get the server's token to the user, the log or the job store: the
token names the access key and is signed with the secret.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace

import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings, redact
from avatar_core.emulator import Emulator, Fault, tone_video_maker
from avatar_core.events import FailedEvent
from avatar_core.providers.kling import make_jwt
from avatar_core.store import JobStore
from tests.helpers import collect
from tests.media_factory import make_image, make_tone

ACCESS, SECRET = "klDERIVEDaccess2121", "klDERIVEDsecret2323"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("derived")
    return make_image(d / "face.png", "PNG", (400, 500)), make_tone(d / "voice.wav", "wav", 2.0)


@pytest.mark.parametrize("where", ["submit-401", "reads-503"])
async def test_an_echoed_kling_token_reaches_no_one(inputs, tmp_path, caplog, where):
    caplog.set_level(logging.DEBUG)  # no redaction filter on caplog's handler
    token = make_jwt(ACCESS, SECRET, time.time())  # what the app sends: the echo carries one like it
    echo = f"Unauthorized. Received headers: Authorization: Bearer {token}; token={token}"
    with Emulator(queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker,
                  api_keys={"kling": f"{ACCESS}:{SECRET}"}) as emu:
        if where == "submit-401":
            emu.faults.add(Fault("status", r"^/v1/videos/avatar/image2video$", method="POST", status=401,
                                 message=echo))
        else:
            emu.faults.add(Fault("status", r"^/v1/videos/avatar/image2video/", method="GET", status=503,
                                 count=None, message=echo))
        settings = replace(load_settings(env={}, dotenv_path=None), kling_access_key=Secret(ACCESS),
                           kling_secret_key=Secret(SECRET), kling_base_url=emu.url, output_dir=tmp_path,
                           poll_typical_s=1.0, deadline_s=4)
        store = JobStore(tmp_path / "jobs.sqlite3")
        events = await collect(jobs.run_job("kling", *inputs, settings=settings, store=store))
        wire = {r.header("authorization").split(" ", 1)[1] for r in emu.requests if r.header("authorization")}
    last = events[-1]
    assert isinstance(last, FailedEvent), last
    if where == "submit-401":
        assert "Authorization: Bearer ****" in last.message, last
    logged = "\n".join(r.getMessage() for r in caplog.records)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as conn:
        dump = "\n".join(conn.iterdump())
    assert wire and token.split(".")[0] in {w.split(".")[0] for w in wire}
    for text in (last.message, logged, dump):
        for credential in (*wire, token, token.split(".")[1], ACCESS, SECRET):
            assert credential not in text
    if where == "reads-503":
        assert "status read" in logged and "Authorization: Bearer ****" in logged


def test_redact_knows_derived_credentials_by_their_shape():
    text = ('Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJrIn0.c2ln x-api-key: sm-abc123 '
            '{"authorization": "Key id:secret"} Bearer r8_abcdefgh. Key expired; check the key.')
    assert redact(text, []) == ('Authorization: Bearer **** x-api-key: **** {"authorization": "Key ****"} '
                                'Bearer **** Key expired; check the key.')


FAL_KEY = "fal-CANCELLEAK-key:5e5e5e5e5e"


async def test_a_cancel_error_echoing_the_key_is_scrubbed_before_it_is_logged(inputs, tmp_path, caplog):
    # Closing a submitted fal.ai job cancels it at the provider; the provider refuses with
    # an answer that quotes the key and the header. caplog has no redaction filter: the
    # job loop itself must scrub what it logs.
    from avatar_core.events import Submitted

    caplog.set_level(logging.DEBUG)
    echo = f"cancel refused for key {FAL_KEY} (sent Authorization: Key {FAL_KEY})"
    with Emulator(queue_s=5.0, processing_s=5.0, video_maker=tone_video_maker) as emu:
        emu.faults.add(Fault("status", r"/cancel$", method="PUT", status=500, count=None, message=echo))
        settings = replace(load_settings(env={}, dotenv_path=None), fal_key=Secret(FAL_KEY), fal_base_url=emu.url,
                           output_dir=tmp_path, poll_typical_s=1.0)
        run = jobs.run_job("fal", *inputs, settings=settings, store=JobStore(tmp_path / "jobs.sqlite3"))
        async for event in run:
            if isinstance(event, Submitted):
                break
        await run.aclose()
        cancels = emu.requests_to("PUT", r"/cancel$")
    assert cancels, "the job was never cancelled at the provider"
    assert all(r.header("authorization") == f"Key {FAL_KEY}" for r in cancels)  # the key did go over the wire
    lines = [r.getMessage() for r in caplog.records if "could not cancel" in r.getMessage()]
    assert lines and "cancel refused for key ****" in lines[0], lines
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert FAL_KEY not in logged and "5e5e5e5e5e" not in logged


async def test_a_bug_whose_text_quotes_the_key_is_logged_scrubbed(inputs, tmp_path, caplog, monkeypatch):
    # An unexpected exception (a bug of ours) whose text carries what a provider sent.
    caplog.set_level(logging.DEBUG)
    key = "ws-BUGLEAK-key-77777777"

    def broken_probe(path):
        raise ValueError(f"could not parse the answer {{'echo': 'Bearer {key}', 'key': '{key}'}}")

    monkeypatch.setattr(jobs, "probe_duration", broken_probe)
    with Emulator(queue_s=0.1, processing_s=0.2, video_maker=tone_video_maker) as emu:
        settings = replace(load_settings(env={}, dotenv_path=None), wavespeed_api_key=Secret(key),
                           wavespeed_base_url=emu.url, output_dir=tmp_path, poll_typical_s=0.5)
        events = await collect(jobs.run_job("wavespeed", *inputs, settings=settings))
    assert isinstance(events[-1], FailedEvent) and key not in events[-1].message
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "unexpected error in job" in text and "ValueError: could not parse the answer" in text
    assert key not in text and "****" in text
