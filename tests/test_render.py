"""The local preview renderer: the MP4 a browser gets, and whether it looks like talking."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage import data

import media_factory as mf
from avatar_core.errors import InputError, JobCancelled
from avatar_core.media.face import detect_faces
from avatar_core.render import NO_FACE_NOTE, RenderResult, output_size, render_video

FPS = 25
RATE = 44_100


def write_wav(path: Path, signal: np.ndarray, rate: int = RATE) -> Path:
    """Mono 16-bit WAV of float samples in -1..1, written with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((np.clip(signal, -1, 1) * 32767).astype(np.int16)[None, :],
                                           format="s16", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def talk_then_pause(seconds: int) -> np.ndarray:
    """Odd seconds silent, even seconds a 220 Hz voice-like tone whose loudness rises and falls
    three times a second (syllables)."""
    t = np.arange(seconds * RATE) / RATE
    talking = (np.floor(t) % 2 == 0).astype(np.float64)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t - np.pi / 2)
    return 0.5 * talking * syllables * np.sin(2 * np.pi * 220 * t)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("render_media")
    face = d / "astronaut.png"
    Image.fromarray(data.astronaut()).save(face)  # 512x512, one real frontal face
    wide = Image.new("RGB", (1600, 900), (190, 180, 170))
    wide.paste(Image.fromarray(data.astronaut()).resize((900, 900)), (350, 0))
    wide.save(d / "wide.jpg", quality=90)
    plain = Image.new("RGB", (640, 480), (90, 140, 200))
    ImageDraw.Draw(plain).rectangle((200, 150, 440, 330), fill=(240, 200, 60))
    plain.save(d / "no_face.png")
    write_wav(d / "talk.wav", talk_then_pause(5))
    write_wav(d / "short.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(RATE) / RATE))
    write_wav(d / "long.wav", 0.3 * np.sin(2 * np.pi * 220 * np.arange(20 * RATE) / RATE))
    return {"face": face, "wide": d / "wide.jpg", "no_face": d / "no_face.png", "talk": d / "talk.wav",
            "short": d / "short.wav", "long": d / "long.wav"}


@pytest.fixture(scope="module")
def talking(media, tmp_path_factory) -> tuple[RenderResult, list[np.ndarray]]:
    """The astronaut speaking 5 s of talk/pause, rendered once and decoded to gray frames."""
    out = tmp_path_factory.mktemp("render_out") / "talk.mp4"
    result = render_video(media["face"], media["talk"], out)
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]
    return result, frames


def top_level_atoms(path: Path) -> list[str]:
    names, data_ = [], path.read_bytes()
    pos = 0
    while pos + 8 <= len(data_):
        size, kind = struct.unpack(">I4s", data_[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data_[pos + 8:pos + 16])[0]
        names.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return names


def test_output_is_a_browser_playable_mp4_as_long_as_the_audio(talking):
    result, _ = talking
    assert result.path.is_file()
    with av.open(str(result.path)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert video.codec_context.name == "h264"
        assert video.codec_context.pix_fmt == "yuv420p"
        assert video.width % 2 == 0 and video.height % 2 == 0
        assert (video.width, video.height) == (result.width, result.height) == (512, 512)
        assert audio.codec_context.name == "aac"
        n = sum(1 for _ in c.decode(video=0))
        assert n == result.frames == 5 * FPS
        assert abs(n / FPS - 5.0) <= 1 / FPS
        assert abs(float(audio.duration * audio.time_base) - 5.0) <= 1 / FPS
        assert abs(c.duration / av.time_base - 5.0) <= 1 / FPS
    assert abs(result.duration_s - 5.0) < 1e-3
    assert result.fps == FPS and result.face_found and result.note == ""
    atoms = top_level_atoms(result.path)
    assert atoms.index("moov") < atoms.index("mdat"), atoms  # faststart: plays while downloading


def test_the_soundtrack_is_the_voice_in_time(talking):
    result, _ = talking
    with av.open(str(result.path)) as c:
        pcm = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].codec_context.sample_rate
    per_second = [float(np.sqrt(np.mean(pcm[s * rate + rate // 10:(s + 1) * rate - rate // 10] ** 2)))
                  for s in range(5)]
    loud, quiet = per_second[0::2], per_second[1::2]
    assert min(loud) > 0.1 and max(quiet) < 0.01, per_second


def test_mouth_moves_with_the_voice_and_rests_in_silence(talking, media):
    result, frames = talking
    face = detect_faces(Image.open(media["face"]))[0]  # same scale: the output is 512x512 too
    mouth = (slice(face.y + int(0.7 * face.h), face.y + int(1.1 * face.h)),
             slice(face.x + face.w // 4, face.x + 3 * face.w // 4))
    forehead = (slice(face.y, face.y + face.h // 5), slice(face.x + face.w // 4, face.x + 3 * face.w // 4))

    def motion(region, seconds):
        diffs = [np.abs(frames[i][region] - frames[i - 1][region]).mean()
                 for s in seconds for i in range(s * FPS + 5, (s + 1) * FPS - 2)]
        return float(np.mean(diffs))

    talk, pause = motion(mouth, (0, 2, 4)), motion(mouth, (1, 3))
    assert talk > 3 * pause, (talk, pause)
    assert talk > 1.5  # grey levels per pixel per frame: visibly moving
    # It is the mouth that talks, not the whole head shaking.
    assert motion(forehead, (0, 2, 4)) < talk / 2


def test_eyes_blink(talking, media):
    _, frames = talking
    face = detect_faces(Image.open(media["face"]))[0]
    eyes = (slice(face.y + face.h // 5, face.y + face.h // 2), slice(face.x, face.x + face.w))
    change = [np.abs(frames[i][eyes] - frames[i - 1][eyes]).mean() for i in range(1, len(frames))]
    # From one frame to the next the eyes barely change (slow head sway); a blink changes them a lot.
    assert max(change) > 3 * float(np.median(change)) + 1.0, (max(change), np.median(change))


@pytest.mark.parametrize(
    "size,tier,expected",
    [
        ((1600, 900), "standard", (1280, 720)),
        ((1600, 900), "pro", (1600, 900)),  # never enlarged past the source
        ((3200, 1800), "pro", (1920, 1080)),
        ((900, 1600), "standard", (720, 1280)),
        ((4000, 3000), "standard", (960, 720)),
        ((3000, 4000), "pro", (1080, 1440)),
        ((512, 512), "standard", (512, 512)),
        ((300, 300), "standard", (480, 480)),  # small pictures get a watchable minimum
        ((301, 753), "pro", (480, 1200)),
        ((333, 777), "standard", (480, 1120)),
    ],
)
def test_output_size_fits_the_tier_keeps_aspect_and_is_even(size, tier, expected):
    w, h = output_size(*size, tier)
    assert (w, h) == expected
    assert w % 2 == 0 and h % 2 == 0
    assert abs(w / h - size[0] / size[1]) < 0.01


@pytest.mark.parametrize("tier,limit", [("standard", (1280, 720)), ("pro", (1920, 1080))])
def test_tier_sets_the_video_size(media, tmp_path, tier, limit):
    big = tmp_path / "big.jpg"
    Image.open(media["wide"]).resize((2400, 1350)).save(big, quality=85)
    result = render_video(big, media["short"], tmp_path / "out.mp4", tier=tier)
    with av.open(str(result.path)) as c:
        v = c.streams.video[0]
        assert (v.width, v.height) == (result.width, result.height) == limit
    assert result.face_found


def test_a_picture_without_a_face_still_moves_and_says_so(media, tmp_path):
    result = render_video(media["no_face"], media["talk"], tmp_path / "plain.mp4")
    assert not result.face_found
    assert result.note == NO_FACE_NOTE
    with av.open(str(result.path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        frames = [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(video=0)]
    assert len(frames) == 5 * FPS
    # The yellow card grows and shrinks (breathing zoom, loudness pulse): animated, not a still.
    card = [int((f > 165).sum()) for f in frames]
    assert max(card) > 1.01 * min(card), (min(card), max(card))


@pytest.mark.parametrize("fmt", ["mp3", "m4a"])
def test_compressed_audio_and_a_pil_image(media, tmp_path, fmt):
    audio = mf.make_tone(tmp_path / f"voice.{fmt}", fmt, 2.0, sample_rate=44_100, channels=2)
    with av.open(str(audio)) as c:
        s = c.streams.audio[0]
        expected = float(s.duration * s.time_base) if s.duration else c.duration / av.time_base
    image = Image.fromarray(data.astronaut()).resize((360, 360))
    result = render_video(image, audio, tmp_path / "out.mp4")
    assert abs(result.duration_s - expected) <= 2 / FPS  # MP3/AAC pad a few ms at each end
    with av.open(str(result.path)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.audio[0].codec_context.channels == 2
        assert abs(result.frames / FPS - result.duration_s) <= 1 / FPS
    assert (result.width, result.height) == (480, 480)


def test_a_16_bit_grey_scan_keeps_its_brightness(media, corpus, tmp_path):
    """A 16-bit greyscale PNG of a real face (a scanned photo) is rendered as grey as it is,
    not white: the renderer scales it to 8 bits (value >> 8) instead of clipping at 255."""
    source = corpus.image("png16_gray")
    with Image.open(source) as im:
        assert im.mode == "I;16"
        expected = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.float32)
    result = render_video(source, media["short"], tmp_path / "scan.mp4")
    assert result.face_found
    with av.open(str(result.path)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    assert abs(first.mean() - expected.mean()) < 6, (first.mean(), expected.mean())
    assert first.std() > 0.7 * expected.std()  # the picture, not a flat grey
    assert np.abs(first[..., 0] - first[..., 2]).mean() < 3  # still grey, no colour cast


def test_progress_runs_from_zero_to_one(media, tmp_path):
    seen: list[float] = []
    render_video(media["face"], media["short"], tmp_path / "p.mp4", progress=seen.append)
    assert seen == sorted(seen) and len(seen) > 5
    assert 0 <= seen[0] < 0.2 and seen[-1] == 1.0


def test_cancel_stops_promptly_and_leaves_no_file(media, tmp_path):
    cancel = threading.Event()
    seen: list[float] = []

    def progress(p: float) -> None:
        seen.append(p)
        if p >= 0.2:
            cancel.set()

    out = tmp_path / "cancelled.mp4"
    with pytest.raises(JobCancelled):
        render_video(media["face"], media["long"], out, progress=progress, cancel=cancel)
    assert max(seen) < 0.35  # stopped within a few frames of the request, not at the end
    assert list(tmp_path.iterdir()) == []  # neither the video nor a partial file


def test_cancel_before_start(media, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled):
        render_video(media["face"], media["short"], tmp_path / "x.mp4", cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_inputs_are_input_errors(media, tmp_path):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio" * 100)
    with pytest.raises(InputError, match="MP3, WAV, M4A or AAC"):
        render_video(media["face"], junk, tmp_path / "out.mp4")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"not an image")
    with pytest.raises(InputError, match="JPEG or PNG"):
        render_video(fake, media["short"], tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_the_renderer_stops_reading_past_300_s(tmp_path):
    import time

    from avatar_core.media.audio import AUDIO_LIMITS
    from avatar_core.render import soundtrack
    from tests.attack_media import lying_webm

    assert soundtrack.MAX_RENDER_S == AUDIO_LIMITS["local"].max_s == 300.0
    src = lying_webm(tmp_path / "lie.webm", hold_s=1800, claim_s=5)  # 30 min behind a 5 s header
    t0 = time.process_time()
    with pytest.raises(InputError, match=r"^The audio is longer than 300 s; the local preview renders at most 300 s"):
        soundtrack.measure_loudness(src, fps=25)
    assert time.process_time() - t0 < 8.0  # about 300 s of Opus decoded, not 1800
    short = lying_webm(tmp_path / "short.webm", hold_s=40, claim_s=5)
    assert soundtrack.measure_loudness(short, fps=25).duration_s == pytest.approx(40, abs=1)  # the real length
