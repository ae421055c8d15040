"""The result videos the emulator serves: real MP4s as long as the submitted audio."""

from __future__ import annotations

import io
import threading

import av
import httpx
import pytest

import media_factory as mf
from avatar_core.emulator import Emulator, FakeClock, tone_video_maker
from avatar_core.emulator.video import default_video_maker, render_video_maker

KEY = {"x-api-key": "k"}


def probe(data: bytes) -> tuple[set[str], float]:
    with av.open(io.BytesIO(data)) as f:
        codecs = {s.codec_context.name for s in f.streams}
        return codecs, f.duration / av.time_base


def audio_seconds(path) -> float:
    with av.open(str(path)) as f:
        stream = f.streams.audio[0]
        samples = sum(frame.samples for frame in f.decode(stream))
        return samples / stream.rate


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_tone_maker_sound_decodes_as_long_as_the_voice(tmp_path, rate):
    """Decoded samples, not the header: a telephone-rate voice once came back 0.128 s longer
    (AAC priming at 8 kHz), failing every duration check on a hosted result of it."""
    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300))
    audio = mf.make_tone(tmp_path / "a.wav", "wav", 5.0, sample_rate=rate)
    out = tmp_path / "o.mp4"
    tone_video_maker(image, audio, out)
    with av.open(str(out)) as f:
        assert f.streams.audio[0].rate in (44100, 48000)
    assert audio_seconds(out) == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize("fmt,seconds", [("wav", 2.0), ("mp3", 3.7), ("m4a", 2.3)])
def test_tone_maker_matches_audio_length(tmp_path, fmt, seconds):
    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300), color=(10, 200, 30))
    audio = mf.make_tone(tmp_path / f"a.{fmt}", fmt, seconds)
    out = tmp_path / "o.mp4"
    tone_video_maker(image, audio, out)
    codecs, duration = probe(out.read_bytes())
    assert codecs == {"h264", "aac"}
    assert duration == pytest.approx(audio_seconds(audio), abs=0.1)


def run_job(emu: Emulator, clock: FakeClock, image_url: str, audio_url: str, slug="kling-v1-standard-ai-avatar"):
    with httpx.Client(base_url=emu.url, headers=KEY, timeout=120) as c:
        rid = c.post(f"/v2/{slug}", json={"image_url": image_url, "audio_url": audio_url}).json()["request_id"]
        clock.advance(10)
        output = c.get(f"/v2/requests/{rid}").json()["output"]
        return httpx.get(output, timeout=120)


def upload(emu: Emulator, path, mime: str) -> str:
    import base64

    url = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    r = httpx.post(f"{emu.url}/upload-asset", json={"data_urls": [url]}, headers=KEY)
    return r.json()["file_urls"][0]


def test_default_video_is_the_local_renderer(tmp_path):
    """The default maker is avatar_core.render.render_video: a real H.264/AAC MP4 as long
    as the audio, served as video/mp4."""
    pytest.importorskip("avatar_core.render")
    assert default_video_maker() is render_video_maker
    image = mf.make_portrait(tmp_path / "face.jpg", "JPEG", scale=0.6)
    audio = mf.make_tone(tmp_path / "voice.mp3", "mp3", 2.2)
    clock = FakeClock()
    with Emulator(clock=clock) as emu:
        assert emu.video_maker is render_video_maker
        r = run_job(emu, clock, upload(emu, image, "image/jpeg"), upload(emu, audio, "audio/mpeg"))
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    codecs, duration = probe(r.content)
    assert codecs == {"h264", "aac"}
    assert duration == pytest.approx(audio_seconds(audio), abs=0.1)


class CountingMaker:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, str]] = []
        self.lock = threading.Lock()

    def __call__(self, image_path, audio_path, out_path, tier):
        with self.lock:
            self.calls.append((image_path.read_bytes(), audio_path.read_bytes(), tier))
        tone_video_maker(image_path, audio_path, out_path, tier)


def test_renders_are_cached_per_inputs_and_tier(tmp_path):
    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300))
    audio = mf.make_tone(tmp_path / "a.wav", "wav", 1.5)
    other_audio = mf.make_tone(tmp_path / "b.wav", "wav", 1.5, freq=220)
    maker = CountingMaker()
    clock = FakeClock()
    with Emulator(clock=clock, video_maker=maker) as emu:
        img, aud, aud2 = upload(emu, image, "image/png"), upload(emu, audio, "audio/wav"), upload(emu, other_audio, "audio/wav")
        first = run_job(emu, clock, img, aud)
        again = run_job(emu, clock, img, aud)
        pro = run_job(emu, clock, img, aud, slug="kling-v2-pro-avatar")
        other = run_job(emu, clock, img, aud2)
    assert first.content == again.content
    assert [c[2] for c in maker.calls] == ["standard", "pro", "standard"]
    assert maker.calls[0][:2] == (image.read_bytes(), audio.read_bytes())
    assert other.content != first.content and pro.status_code == 200


def test_inputs_from_another_loopback_server(tmp_path):
    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300))
    audio = mf.make_tone(tmp_path / "a.wav", "wav", 1.2)
    clock = FakeClock()
    with Emulator(video_maker=tone_video_maker) as host, Emulator(clock=clock, video_maker=tone_video_maker) as emu:
        r = run_job(emu, clock, upload(host, image, "image/png"), upload(host, audio, "audio/wav"))
    codecs, duration = probe(r.content)
    assert codecs == {"h264", "aac"} and duration == pytest.approx(1.2, abs=0.1)


def test_renderer_failure_is_a_500_on_the_video_url(tmp_path):
    def broken(image_path, audio_path, out_path, tier):
        raise RuntimeError("renderer exploded")

    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300))
    audio = mf.make_tone(tmp_path / "a.wav", "wav", 1.0)
    clock = FakeClock()
    with Emulator(clock=clock, video_maker=broken) as emu:
        r = run_job(emu, clock, upload(emu, image, "image/png"), upload(emu, audio, "audio/wav"))
    assert r.status_code == 500 and "renderer exploded" in r.json()["error"]


def test_head_of_video_gives_its_length(tmp_path):
    image = mf.make_image(tmp_path / "i.png", "PNG", (300, 300))
    audio = mf.make_tone(tmp_path / "a.wav", "wav", 1.0)
    clock = FakeClock()
    with Emulator(clock=clock, video_maker=tone_video_maker) as emu:
        r = run_job(emu, clock, upload(emu, image, "image/png"), upload(emu, audio, "audio/wav"))
        head = httpx.head(str(r.url))
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(r.content)
