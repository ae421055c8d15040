"""The realistic corpus (tests/corpus.py) rendered, and sent to every hosted provider.

1. **Local preview.** Every photo class the checks accept, with 5 s of real speech, and
   every recording format, with the example portrait, go the way the app sends them:
   ``prepare_inputs`` for the ``local`` provider, then ``jobs.run_job("local", ...)`` (the
   real renderer on its worker thread). Each MP4 is decoded and checked (``check_mp4``:
   timestamps, duration within 0.1 s, H.264/AAC, a moving picture); the picture must keep
   the photo's shape and come out upright (camera-rotated photos are compared with the
   upright portrait rendered the same way).
2. **Hosted providers.** A real job per provider against the loopback emulator, with
   awkward photos (HEIC, CMYK, cut-out PNG, EXIF-rotated, 24 MP, 48-bit PNG) and
   recordings (WebM/Opus without a duration, M4A, FLAC, Ogg, 48 kHz 24-bit WAV, 8 kHz
   WAV). What went over the wire is read back from the emulator's request log in each
   provider's own form (presigned PUT, data-URL upload, inline data URI, multipart file,
   raw base64) and must be the very bytes the emulator's job received; those bytes are
   decoded: a JPEG or PNG labelled as what it is, upright, and an MP3 (what every hosted
   provider gets from us, see ``AUDIO_LIMITS``) as long as the recording.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avatar_core import jobs
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, tone_video_maker
from avatar_core.emulator.server import decode_data_uri
from avatar_core.events import Done
from avatar_core.media.audio import AUDIO_LIMITS
from avatar_core.media.face import detect_faces
from avatar_core.media.inputs import prepare_inputs
from avatar_core.render import render_video
from avatar_core.render.motion import CROP_ZOOM
from avatar_core.render.video import output_size
from corpus import AUDIO_FORMATS, IMAGE_CLASSES, IMAGES, astronaut, astronaut_portrait
from tests.helpers import collect
from tests.mp4check import Mp4Report, check_mp4

SPEECH_S = 5.0
PORTRAIT = Path(__file__).resolve().parent.parent / "examples" / "portrait.jpg"
# Photo classes the checks accept (the refused ones never reach a renderer or a provider).
ACCEPTED = [c for c in IMAGE_CLASSES if c.faces is not None]
# The upright picture each class shows once turned and flattened ("" = its own picture).
REFERENCE = {"astronaut": astronaut, "portrait": astronaut_portrait}
# Grey thumbnails are compared at this width; 0..255 mean absolute difference.
THUMB_W = 48
SAME_PICTURE = 9.0  # the same picture, re-encoded, framed, its jaw and head a little moved (~5)
TURNED_AWAY = 40.0  # the same picture upside down differs from it upright by far more (~80)
SAME_RENDER = 2.0  # two renders of (nearly) the same pixels with the same voice (~0.5)


def _settings(tmp_path, **kw):
    return replace(load_settings(env={}, dotenv_path=None), output_dir=tmp_path / "out", poll_typical_s=0.2,
                   deadline_s=120, **kw)


def thumb(picture: Image.Image, width: int = THUMB_W) -> np.ndarray:
    height = max(2, round(width * picture.height / picture.width))
    return np.asarray(picture.convert("L").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"thumbnails of different shapes {a.shape} and {b.shape}"
    return float(np.abs(a - b).mean())


def framed(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``picture`` as the renderer frames it at ``size``: zoomed in by CROP_ZOOM about the centre."""
    w, h = size
    big = picture.convert("RGB").resize((round(w * CROP_ZOOM), round(h * CROP_ZOOM)), Image.Resampling.BILINEAR)
    left, top = (big.width - w) // 2, (big.height - h) // 2
    return big.crop((left, top, left + w, top + h))


def first_frame(path: Path) -> Image.Image:
    with av.open(str(path)) as c:
        return next(c.decode(c.streams.video[0])).to_image()


def sound_level_dbfs(path: Path) -> float:
    """RMS of the video's whole sound track, in dBFS."""
    with av.open(str(path)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    return 20 * np.log10(max(1e-9, float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))))


def decoded_seconds(source: bytes | Path) -> tuple[str, str, float]:
    """(container, codec, seconds of decoded samples) of an audio file or its bytes."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as c:
        s = c.streams.audio[0]
        n = sum(f.samples for f in c.decode(s))
        return c.format.name, s.codec_context.name, n / s.codec_context.sample_rate


# ================================================================== 1. the local preview


async def render_locally(image: Path, audio: Path, settings) -> tuple[Path, object]:
    """As the app does it: check and prepare both inputs for ``local``, then run the job."""
    prepared = prepare_inputs(image, audio, provider="local", tier="standard", settings=settings)
    assert prepared.audio.format == "wav" and prepared.image.format in ("JPEG", "PNG")
    events = await collect(jobs.run_job("local", prepared.image.path, prepared.audio.path, settings=settings,
                                        audio_seconds=prepared.audio.duration_s))
    assert isinstance(events[-1], Done), events[-1]
    return events[-1].path, prepared


@pytest.fixture(scope="module")
def speech(corpus) -> Path:
    """The one clip every photo class is rendered with: 5 s of real speech, as MP3."""
    return corpus.speech(SPEECH_S, "mp3")


@pytest.fixture(scope="module")
def upright_render(speech, tmp_path_factory) -> Mp4Report:
    """The upright portrait (a plain JPEG, no orientation tag) prepared and rendered with
    ``speech`` by the renderer the local provider runs, with the arguments it passes: what
    a camera-rotated photo of it must look like once rendered."""
    d = tmp_path_factory.mktemp("upright")
    source = d / "upright.jpg"
    astronaut_portrait().save(source, "JPEG", quality=92)
    prepared = prepare_inputs(source, speech, provider="local", tier="standard", settings=_settings(d))
    out = d / "upright.mp4"
    render_video(prepared.image.path, prepared.audio.path, out, tier="standard")
    return check_mp4(out, SPEECH_S)


@pytest.mark.parametrize("kind", ACCEPTED, ids=[c.name for c in ACCEPTED])
async def test_every_photo_class_renders_upright_in_the_local_preview(corpus, speech, kind, tmp_path, request):
    path, prepared = await render_locally(corpus.image(kind.name), speech, _settings(tmp_path))
    report = check_mp4(path, SPEECH_S)
    # The photo's shape, at the renderer's size for it (standard: within 1280 x 720).
    assert (report.width, report.height) == output_size(prepared.image.width, prepared.image.height, "standard")
    with Image.open(corpus.image(kind.name)) as src:
        src_w, src_h = src.size
    if kind.name.startswith("exif"):  # stored turned; the video shows it as the camera saw it
        assert report.height > report.width and (prepared.image.width, prepared.image.height) == (600, 800)
        if kind.name in ("exif6", "exif8"):
            assert src_w > src_h  # the stored pixels lie on their side: the tag alone makes it tall
    else:
        assert abs(report.width / report.height - src_w / src_h) < 0.01
    frame = thumb(first_frame(path))
    if kind.upright:
        reference = REFERENCE[kind.upright]()
        upright = thumb(framed(reference, (report.width, report.height)))
        assert difference(frame, upright) < SAME_PICTURE, "the video does not show the photo upright"
        assert difference(frame, thumb(framed(reference.rotate(180), (report.width, report.height)))) > TURNED_AWAY
    if kind.upright == "portrait":
        # ...and it is the upright portrait rendered the same way, frame for frame.
        twin: Mp4Report = request.getfixturevalue("upright_render")
        assert (twin.width, twin.height) == (report.width, report.height)
        assert len(twin.thumbnails) == len(report.thumbnails)
        worst = max(difference(a, b) for (_t, a), (_u, b) in zip(report.thumbnails, twin.thumbnails))
        assert worst < SAME_RENDER, f"a frame differs from the upright portrait's render by {worst:.1f}"
    assert sound_level_dbfs(path) > -40, "the speech is missing from the video"
    if kind.name == "cat":
        assert prepared.image.faces == []  # no face: animated gently all the same (the moving check above)


@pytest.mark.parametrize("fmt", list(AUDIO_FORMATS))
async def test_every_recording_format_renders_in_the_local_preview(corpus, fmt, tmp_path):
    source = corpus.speech(SPEECH_S, fmt)
    path, prepared = await render_locally(PORTRAIT, source, _settings(tmp_path))
    assert abs(prepared.audio.duration_s - SPEECH_S) <= 0.1
    report = check_mp4(path, SPEECH_S)
    with Image.open(PORTRAIT) as portrait:
        assert (report.width, report.height) == output_size(*portrait.size, "standard")
        assert difference(thumb(first_frame(path)), thumb(framed(portrait, (report.width, report.height)))) < SAME_PICTURE
    assert sound_level_dbfs(path) > -40, f"the {fmt} speech is missing from the video"


@pytest.mark.slow
async def test_a_75_second_browser_recording_renders_in_the_local_preview(corpus, tmp_path):
    """An ordinary length for a pitch, as a browser microphone saves it (WebM/Opus, no
    duration in its header): far past the old ~10 s failure, checked frame by frame."""
    source = corpus.speech(75, "webm")
    path, prepared = await render_locally(PORTRAIT, source, _settings(tmp_path))
    assert abs(prepared.audio.duration_s - 75) <= 0.1
    report = check_mp4(path, 75.0)
    assert len(report.video_pts) == round(75.0 * report.fps)
    assert sound_level_dbfs(path) > -40


# ================================================================== 2. the hosted providers

KLING_ACCESS, KLING_SECRET = "ak-corpus-1", "sk-corpus-secret-1"
IMAGE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}
# (provider, photo class, recording format): each provider gets its own awkward pair, and
# all of them the camera-rotated photo with a browser's WebM recording (no duration in it).
HOSTED_CASES = [
    ("wavespeed", "heic", "m4a"),
    ("segmind", "cmyk", "flac"),
    ("fal", "png_alpha", "ogg"),
    ("replicate", "png16_rgb", "wav48k24"),
    ("kling", "24mp", "wav8k"),
    *[(p, "exif6", "webm") for p in ("wavespeed", "segmind", "fal", "replicate", "kling")],
]


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.2, processing_s=0.3, video_maker=tone_video_maker,
                  api_keys={"kling": f"{KLING_ACCESS}:{KLING_SECRET}"}) as emulator:
        yield emulator


@pytest.fixture
def hosted_settings(emu, tmp_path):
    return _settings(
        tmp_path,
        wavespeed_api_key=Secret("ws-corpus"), wavespeed_base_url=emu.url,
        segmind_api_key=Secret("sm-corpus"), segmind_base_url=emu.url, segmind_upload_url=emu.url + "/upload-asset",
        fal_key=Secret("fal-corpus"), fal_base_url=emu.url,
        replicate_api_token=Secret("r8-corpus"), replicate_base_url=emu.url,
        kling_access_key=Secret(KLING_ACCESS), kling_secret_key=Secret(KLING_SECRET), kling_base_url=emu.url,
    )


def _data_uri(value: str) -> tuple[str, bytes]:
    assert value.startswith("data:") and ";base64," in value, f"not a base64 data URI: {value[:60]!r}"
    data, mime = decode_data_uri(value)
    return mime, data


def sent_files(emu, provider: str) -> dict[str, tuple[str | None, bytes]]:
    """What went over the wire to ``provider``, read from the emulator's request log in the
    provider's own form: {"image"|"audio": (declared MIME type or None, bytes)}."""
    if provider == "wavespeed":  # ask for a presigned PUT (declaring the type), then PUT the bytes
        asks = emu.requests_to("POST", r"^/api/v3/media/uploads$")
        puts = emu.requests_to("PUT", r"^/emulator/uploads/")
        assert len(asks) == len(puts) == 2
        submit = emu.requests_to("POST", r"^/api/v3/kwaivgi/")[0].json
        by_id = {p.path.rsplit("/", 1)[1]: (ask.json["content_type"], p) for ask, p in zip(asks, puts)}
        out = {}
        for what in ("image", "audio"):
            file_id = re.search(r"/emulator/files/([0-9a-f]+)/", submit[what]).group(1)
            declared, put = by_id[file_id]
            assert put.header("content-type") == declared and put.header("authorization") is None
            out[what] = (declared, put.body)
        return out
    if provider == "segmind":  # each file as a data URL to the upload endpoint, then URLs in the submit
        uploads = [_data_uri(u.json["data_urls"][0]) for u in emu.requests_to("POST", r"^/upload-asset$")]
        assert len(uploads) == 2
        images = [u for u in uploads if u[0].startswith("image/")]
        audios = [u for u in uploads if not u[0].startswith("image/")]
        assert len(images) == len(audios) == 1, [u[0] for u in uploads]
        submit = emu.requests_to("POST", r"^/v2/kling")[0].json
        assert submit["image_url"].startswith(emu.url) and submit["audio_url"].startswith(emu.url)
        return {"image": images[0], "audio": audios[0]}
    if provider == "fal":  # inline data URIs in the submit, no upload call
        submit = emu.requests_to("POST", r"^/fal-ai/")[0].json
        return {"image": _data_uri(submit["image_url"]), "audio": _data_uri(submit["audio_url"])}
    if provider == "replicate":
        submit = emu.requests_to("POST", r"^/v1/models/")[0].json["input"]
        files = emu.requests_to("POST", r"^/v1/files$")
        if not files:  # file_encoding="data_uri"
            return {"image": _data_uri(submit["image"]), "audio": _data_uri(submit["audio"])}
        assert len(files) == 2
        parts = {}
        for request in files:
            (part,) = [p for p in request.form if p.name == "content"]
            parts[(part.content_type.startswith("image/") and "image") or "audio"] = (part.content_type, part.data)
        assert set(parts) == {"image", "audio"}
        assert submit["image"].startswith(emu.url + "/v1/files/") and submit["audio"].startswith(emu.url + "/v1/files/")
        return parts
    if provider == "kling":  # raw base64 (no data: prefix, so no declared type) in the submit
        submit = emu.requests_to("POST", r"^/v1/videos/avatar/image2video$")[0].json
        assert not submit["image"].startswith(("data:", "http")) and not submit["sound_file"].startswith(("data:", "http"))
        return {"image": (None, base64.b64decode(submit["image"], validate=True)),
                "audio": (None, base64.b64decode(submit["sound_file"], validate=True))}
    raise KeyError(provider)


async def run_hosted(emu, settings, provider: str, image: Path, audio: Path, **kw):
    """As the app does it: prepare for this provider, run the job; -> (prepared, Done, emulator job)."""
    prepared = prepare_inputs(image, audio, provider=provider, tier="standard", settings=settings)
    events = await collect(jobs.run_job(provider, prepared.image.path, prepared.audio.path, settings=settings,
                                        audio_seconds=prepared.audio.duration_s, **kw))
    assert isinstance(events[-1], Done), events[-1]
    (job,) = emu.jobs.values()
    assert set(job.received) == {"image", "audio"} and job.input_error is None
    return prepared, events[-1], job


def assert_received_what_a_provider_takes(emu, provider, kind, source_audio, prepared, job):
    wire = sent_files(emu, provider)
    for what in ("image", "audio"):  # the bytes that travelled are the bytes the job got
        assert wire[what][1] == job.received[what].data, f"{provider}: the {what} received is not the one sent"

    # The photo: a JPEG or PNG, labelled as what it is, 8-bit RGB, upright, one face.
    declared, data = wire["image"]
    with Image.open(io.BytesIO(data)) as sent:
        assert sent.format in IMAGE_MIME, f"{provider} was sent a {sent.format} image"
        assert declared in (None, IMAGE_MIME[sent.format]), f"a {sent.format} image labelled {declared}"
        assert sent.mode == "RGB" and sent.size == (prepared.image.width, prepared.image.height)
        sent.load()
        picture = sent.copy()
    assert len(detect_faces(picture)) == 1
    if kind.upright:
        reference = REFERENCE[kind.upright]()
        if kind.upright == "portrait":
            assert picture.size == (600, 800)
        upright = thumb(reference.resize(picture.size))
        assert difference(thumb(picture), upright) < SAME_PICTURE, f"{provider} was sent the photo turned"
        assert difference(thumb(picture), thumb(reference.rotate(180).resize(picture.size))) > TURNED_AWAY
    if kind.name == "png_alpha":  # the transparent surround flattened onto white
        assert picture.getpixel((2, 2)) == (255, 255, 255)

    # The voice: MP3 (what every hosted provider is given), as long as the recording.
    assert AUDIO_LIMITS[provider].output == "mp3"
    declared, data = wire["audio"]
    assert declared in (None, "audio/mpeg"), f"{provider}: MP3 labelled {declared}"
    container, codec, seconds = decoded_seconds(data)
    assert (container, codec) == ("mp3", "mp3float"), f"{provider} was sent {container}/{codec}"
    source_s = decoded_seconds(source_audio)[2]
    assert abs(seconds - source_s) <= 0.1 and abs(seconds - SPEECH_S) <= 0.1, (seconds, source_s)


@pytest.fixture
def clean_emu(emu):
    emu.reset()
    yield emu


@pytest.mark.parametrize("provider,image,audio", HOSTED_CASES, ids=[f"{p}-{i}-{a}" for p, i, a in HOSTED_CASES])
async def test_every_hosted_provider_is_sent_formats_it_takes(clean_emu, hosted_settings, corpus, provider, image,
                                                              audio):
    emu = clean_emu
    source_audio = corpus.speech(SPEECH_S, audio)
    prepared, done, job = await run_hosted(emu, hosted_settings, provider, corpus.image(image), source_audio)
    assert_received_what_a_provider_takes(emu, provider, IMAGES[image], source_audio, prepared, job)
    check_mp4(done.path, SPEECH_S)  # the result came back and plays


async def test_replicate_inline_data_uris_are_formats_it_takes(clean_emu, hosted_settings, corpus):
    """Replicate's other way of taking files: data URIs inside the prediction's input."""
    from avatar_core.providers.replicate import ReplicateProvider

    emu = clean_emu
    source_audio = corpus.speech(SPEECH_S, "webm")
    client = ReplicateProvider("r8-corpus", emu.url, file_encoding="data_uri")
    try:
        prepared, _done, job = await run_hosted(emu, hosted_settings, "replicate", corpus.image("heic"), source_audio,
                                                client=client)
    finally:
        await client.aclose()
    assert not emu.requests_to("POST", r"^/v1/files$")
    assert_received_what_a_provider_takes(emu, "replicate", IMAGES["heic"], source_audio, prepared, job)
