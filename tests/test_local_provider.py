"""The ``local`` provider: the Provider protocol over the in-process renderer."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import av
import pytest
from PIL import Image
from skimage import data

import media_factory as mf
from avatar_core.errors import InputError, JobCancelled, JobFailed, ResultExpired
from avatar_core.providers.base import Completed, Failed, JobHandle, Processing, Provider, Queued, SubmitRequest
from avatar_core.providers.local import EXPIRED_MESSAGE, LocalProvider
from avatar_core.render import RenderResult

POLL_S = 0.05
WAIT_S = 60.0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("local_inputs")
    face = d / "face dir" / "astronaut.jpg"  # a space, to prove URLs are quoted and unquoted
    face.parent.mkdir()
    Image.fromarray(data.astronaut()).resize((360, 360)).save(face, quality=90)
    return {
        "face": face,
        "voice": mf.make_tone(d / "voice.wav", "wav", 2.0),
        "long": mf.make_tone(d / "long.wav", "wav", 30.0),
    }


def path_of(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file"
    return Path(unquote(parsed.path))


async def wait_until(provider: LocalProvider, handle: JobHandle, kinds: tuple[type, ...]):
    deadline = time.monotonic() + WAIT_S
    seen = []
    while time.monotonic() < deadline:
        status = await provider.status(handle)
        seen.append(status)
        if isinstance(status, kinds):
            return status, seen
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"no {kinds} within {WAIT_S} s; last {seen[-3:]}")


async def request_for(provider: LocalProvider, inputs, audio: str = "voice", tier: str = "standard") -> SubmitRequest:
    image_url = await provider.upload(inputs["face"], "image/jpeg")
    audio_url = await provider.upload(inputs[audio], "audio/wav")
    return SubmitRequest(image_url=image_url, audio_url=audio_url, tier=tier)


async def test_is_a_provider_and_upload_is_the_file_itself(inputs, tmp_path):
    provider = LocalProvider(tmp_path)
    assert isinstance(provider, Provider)
    assert provider.name == "local" and provider.supports_cancel
    sent = []
    url = await provider.upload(inputs["face"], "image/jpeg", progress=lambda a, b: sent.append((a, b)))
    assert url.startswith("file://") and "%20" in url
    assert path_of(url) == inputs["face"].resolve()
    size = inputs["face"].stat().st_size
    assert sent == [(size, size)]
    assert list(tmp_path.iterdir()) == []  # nothing copied
    with pytest.raises(InputError, match="not found"):
        await provider.upload(tmp_path / "missing.jpg", "image/jpeg")


async def test_submit_poll_and_get_a_playable_mp4(inputs, tmp_path):
    provider = LocalProvider(tmp_path / "work", max_concurrent=1)
    handle = await provider.submit(await request_for(provider, inputs))
    assert handle.provider == "local" and len(handle.request_id) == 32
    assert handle.model == "local-preview-720p"
    status, seen = await wait_until(provider, handle, (Completed, Failed))
    assert isinstance(status, Completed), status
    assert all(isinstance(s, (Queued, Processing, Completed)) for s in seen)
    progress = [s.progress for s in seen if isinstance(s, Processing)]
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)

    video = path_of(status.video_url)
    assert video.parent == (tmp_path / "work").resolve()
    assert status.metadata["renderer"] == "local-preview"
    assert status.metadata["face_found"] is True and status.metadata["note"] == ""
    assert (status.metadata["width"], status.metadata["height"]) == (480, 480)
    assert status.metadata["fps"] == 25
    with av.open(str(video)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"
        assert abs(c.duration / av.time_base - 2.0) <= 1 / 25
    assert await provider.result(handle) == status
    assert await provider.cancel(handle) is False  # already finished: nothing to stop
    await provider.aclose()


async def test_pro_tier_renders_up_to_1080p(inputs, tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(data.astronaut()).resize((1400, 1400)).save(big)
    provider = LocalProvider(tmp_path / "work", max_concurrent=1)
    voice = await provider.upload(inputs["voice"], "audio/wav")
    handle = await provider.submit(SubmitRequest(image_url=big.as_uri(), audio_url=voice, tier="pro"))
    assert handle.model == "local-preview-1080p"
    status, _ = await wait_until(provider, handle, (Completed, Failed))
    assert isinstance(status, Completed), status
    assert (status.metadata["width"], status.metadata["height"]) == (1080, 1080)


async def test_cancel_stops_the_render_and_deletes_the_file(inputs, tmp_path):
    provider = LocalProvider(tmp_path, max_concurrent=1)
    handle = await provider.submit(await request_for(provider, inputs, audio="long"))
    await wait_until(provider, handle, (Processing,))
    assert await provider.cancel(handle) is True
    status, _ = await wait_until(provider, handle, (Failed, Completed))
    assert isinstance(status, Failed) and status.cancelled
    assert "cancelled" in status.message
    with pytest.raises(JobCancelled):
        await provider.result(handle)
    assert list(tmp_path.iterdir()) == []  # no video, no partial file


async def test_unknown_handle_says_previews_do_not_survive_a_restart(tmp_path):
    provider = LocalProvider(tmp_path)
    handle = JobHandle(provider="local", request_id="0" * 32, model="local-preview-720p")
    for call in (provider.status, provider.result, provider.cancel):
        with pytest.raises(ResultExpired) as info:
            await call(handle)
        assert info.value.message == EXPIRED_MESSAGE


class GatedRender:
    """A stand-in for render_video that runs until the test opens its gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started: list[Path] = []

    def __call__(self, image, audio, out_path, *, tier, progress, cancel, fps=25) -> RenderResult:
        self.started.append(Path(out_path))
        progress(0.5)
        while not self.gate.wait(0.01):
            if cancel.is_set():
                raise JobCancelled("The local preview was cancelled.")
        Path(out_path).write_bytes(b"video")
        return RenderResult(Path(out_path), 2.0, 640, 480, 25, 50, True, "")


async def test_second_render_waits_in_line_with_a_limit_of_one(inputs, tmp_path):
    render = GatedRender()
    provider = LocalProvider(tmp_path, max_concurrent=1, render=render)
    request = await request_for(provider, inputs)
    first = await provider.submit(request)
    await wait_until(provider, first, (Processing,))
    second = await provider.submit(request)
    third = await provider.submit(request)
    assert await provider.status(second) == Queued(position=1)
    assert await provider.status(third) == Queued(position=2)
    assert await provider.status(first) == Processing(progress=0.5)

    # Leaving the line moves the ones behind up, and the cancelled one never starts.
    assert await provider.cancel(second) is True
    assert await provider.status(second) == Failed(message="The local preview was cancelled.", cancelled=True)
    assert await provider.status(third) == Queued(position=1)

    render.gate.set()
    for handle in (first, third):
        status, _ = await wait_until(provider, handle, (Completed, Failed))
        assert isinstance(status, Completed)
    assert len(render.started) == 2
    await provider.aclose()


async def test_render_errors_become_failed_with_the_reason(inputs, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wav" * 50)
    provider = LocalProvider(tmp_path / "work", max_concurrent=1)
    handle = await provider.submit(SubmitRequest(image_url=inputs["face"].as_uri(), audio_url=junk.as_uri()))
    status, _ = await wait_until(provider, handle, (Failed, Completed))
    assert isinstance(status, Failed) and not status.cancelled
    assert "MP3, WAV, M4A or AAC" in status.message
    with pytest.raises(JobFailed, match="MP3, WAV"):
        await provider.result(handle)


async def test_submit_refuses_remote_or_missing_files(inputs, tmp_path):
    provider = LocalProvider(tmp_path)
    with pytest.raises(InputError, match="file on this computer"):
        await provider.submit(SubmitRequest(image_url="https://example.com/a.jpg", audio_url=inputs["voice"].as_uri()))
    with pytest.raises(InputError, match="not found"):
        await provider.submit(SubmitRequest(image_url=(tmp_path / "gone.jpg").as_uri(), audio_url=inputs["voice"].as_uri()))
    # A plain path works like a file:// URL.
    render = GatedRender()
    render.gate.set()
    plain = LocalProvider(tmp_path, max_concurrent=1, render=render)
    handle = await plain.submit(SubmitRequest(image_url=str(inputs["face"]), audio_url=str(inputs["voice"])))
    status, _ = await wait_until(plain, handle, (Completed, Failed))
    assert isinstance(status, Completed)


async def test_a_job_is_found_through_another_provider_instance(inputs, tmp_path):
    render = GatedRender()
    render.gate.set()
    first = LocalProvider(tmp_path, max_concurrent=1, render=render)
    handle = await first.submit(await request_for(first, inputs))
    await first.aclose()
    again = LocalProvider(tmp_path)
    status, _ = await wait_until(again, handle, (Completed, Failed))
    assert isinstance(status, Completed)
