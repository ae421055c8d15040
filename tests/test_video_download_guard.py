"""The finished-video download obeys the same address rules as input links, at every hop.

An emulator job's result link either redirects (302 from the provider's own, configured
host) or points straight at a loopback server that stands for a metadata service. The
download must stop before that server is contacted, with one fixed message that says
nothing about what is there; the configured provider host itself stays trusted.
"""

from __future__ import annotations

import http.server
import threading
from typing import ClassVar
from dataclasses import replace

import pytest

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, JobPlan, tone_video_maker
from avatar_core.events import Done, FailedEvent
from tests.helpers import collect
from tests.media_factory import make_image, make_tone

KEY = "ws-download-guard-key-5p"


class _Target(http.server.BaseHTTPRequestHandler):
    """Stands for a cloud metadata service: answers a PNG and records every request."""

    seen: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).seen.append(self.path)
        body = b"\x89PNG\r\n\x1a\nsecret-instance-credentials"
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def target():
    _Target.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.05, processing_s=0.1, video_maker=tone_video_maker) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("guard-in")
    return make_image(d / "face.png", "PNG", (400, 500)), make_tone(d / "voice.wav", "wav", 1.0)


def _settings(emu, tmp_path, **kw):
    # allow_private_urls stays off: only the configured provider endpoint (the emulator) is trusted.
    return replace(load_settings(env={}, dotenv_path=None), wavespeed_api_key=Secret(KEY),
                   wavespeed_base_url=emu.url, output_dir=tmp_path / "out", poll_typical_s=0.2, deadline_s=60,
                   **kw)


def _job_started_elsewhere(emu, plan: JobPlan) -> str:
    emu.plan_jobs(plan)
    import base64

    png = base64.b64encode(make_image_bytes()).decode()
    job = emu.create_job("wavespeed", "kwaivgi/kling-v1-ai-avatar-standard", "standard",
                         {"image": f"data:image/png;base64,{png}", "audio": "data:audio/wav;base64,AAAA"})
    emu.wait_for_job(job, 10)
    return job.id


def make_image_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 90, 80)).save(buf, "PNG")
    return buf.getvalue()


def _refusal(rid: str) -> str:
    return jobs.REFUSED_VIDEO_HOST.format(label="WaveSpeed", rid=rid)


@pytest.mark.parametrize("where", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_a_resumed_job_whose_video_redirects_to_loopback_is_refused_at_that_hop(emu, target, tmp_path, where):
    emu.reset()
    _Target.seen = []
    rid = _job_started_elsewhere(emu, JobPlan(video="redirect",
                                              redirect_to=f"http://{where}:{target}/latest/meta-data/iam"))
    events = await collect(jobs.resume("wavespeed", rid, settings=_settings(emu, tmp_path)))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.kind == "ResultInvalid", last
    assert last.message == _refusal(rid)  # the same words whatever the address: nothing about it
    assert "image/png" not in last.message and str(target) not in last.message
    # The provider's own link was asked (it is the trusted, configured host) ...
    assert len(emu.requests_to("GET", rf"/emulator/outputs/{rid}/output\.mp4$")) == 1
    # ... and the place it pointed to never was.
    assert _Target.seen == []
    assert not list((tmp_path / "out").rglob("*.mp4*"))


async def test_a_result_link_straight_at_a_private_address_is_refused(emu, target, tmp_path, inputs):
    emu.reset()
    _Target.seen = []
    emu.plan_jobs(JobPlan(video_link=f"http://127.0.0.1:{target}/computeMetadata/v1/"))
    events = await collect(jobs.run_job("wavespeed", *inputs, settings=_settings(emu, tmp_path)))
    last = events[-1]
    assert isinstance(last, FailedEvent) and last.message == _refusal(last.request_id), last
    assert _Target.seen == []
    assert len(emu.requests_to("POST", r"^/api/v3/kwaivgi/")) == 1  # the job itself ran normally


async def test_a_name_that_cannot_be_looked_up_gets_the_same_words(emu, tmp_path):
    emu.reset()
    rid = _job_started_elsewhere(emu, JobPlan(video="redirect", redirect_to="http://no-such-host.invalid/v.mp4"))
    events = await collect(jobs.resume("wavespeed", rid, settings=_settings(emu, tmp_path)))
    assert events[-1].message == _refusal(rid)


async def test_the_address_check_is_what_stops_it(emu, target, tmp_path):
    """With AVATAR_ALLOW_PRIVATE_URLS (a trusted local setup) the same hop is followed."""
    emu.reset()
    _Target.seen = []
    rid = _job_started_elsewhere(emu, JobPlan(video="redirect", redirect_to=f"http://127.0.0.1:{target}/x"))
    events = await collect(jobs.resume("wavespeed", rid, settings=_settings(emu, tmp_path, allow_private_urls=True)))
    assert _Target.seen == ["/x"]
    assert "image/png instead of a video" in events[-1].message


async def test_the_configured_provider_host_is_trusted_and_its_video_arrives(emu, tmp_path, inputs):
    emu.reset()
    events = await collect(jobs.run_job("wavespeed", *inputs, settings=_settings(emu, tmp_path)))
    assert isinstance(events[-1], Done), events[-1]
    assert events[-1].path.is_file() and events[-1].path.read_bytes()[4:8] == b"ftyp"


def test_every_configured_endpoint_is_trusted_and_nothing_else():
    s = replace(load_settings(env={}, dotenv_path=None), wavespeed_base_url="http://127.0.0.1:9999",
                segmind_upload_url="https://Upload.Example:8443/upload-asset")
    trusted = jobs.provider_endpoints(s)
    assert ("127.0.0.1", 9999) in trusted and ("upload.example", 8443) in trusted
    assert ("api.segmind.com", 443) in trusted  # the default endpoints too
    assert ("127.0.0.1", 80) not in trusted


async def test_the_download_transport_checks_again_at_connect_time(target):
    """A name that resolved to a public address at the hop check but to loopback when connecting
    (DNS rebinding) is refused by the transport itself, before any byte reaches the target."""
    import httpx

    from avatar_core.errors import InputError
    from avatar_core.media.fetch import async_checked_transport

    _Target.seen = []
    transport = async_checked_transport(allow_private=False, resolver=lambda host, port: ["127.0.0.1"])
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(InputError):
            await client.get(f"http://rebind.test:{target}/latest/meta-data/")
    assert _Target.seen == []
    trusted = async_checked_transport(allow_private=False, resolver=lambda host, port: ["203.0.113.9"],
                                      trusted=frozenset({("127.0.0.1", target)}))
    async with httpx.AsyncClient(transport=trusted) as client:
        assert (await client.get(f"http://127.0.0.1:{target}/ok")).status_code == 200
    assert _Target.seen == ["/ok"]
