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
SAME_RENDER = 4.0  # two renders of (nearly) the same pixels with the same voice


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
        reference: Mp4Report = request.getfixturevalue("upright_render")
        assert (reference.width, reference.height) == (report.width, report.height)
        assert len(reference.thumbnails) == len(report.thumbnails)
        worst = max(difference(a, b) for (_t, a), (_u, b) in zip(report.thumbnails, reference.thumbnails))
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
