"""The realistic corpus (tests/corpus.py) through the input checks, as a user meets them.

Every photo class goes through ``check_image`` and the app's handler (the text a user
reads); the checked file must be a JPEG or PNG a provider takes, upright, not washed out,
with the faces the photo has. Every recording format (real speech, 30 s) goes through
``check_audio`` for the local preview (WAV) and a hosted provider (MP3), decoded back.
"""

from __future__ import annotations

from dataclasses import replace

import av
import numpy as np
import pytest
from PIL import Image

from avatar_core.config import load_settings
from avatar_core.errors import InputError
from avatar_core.media.face import detect_faces
from avatar_core.media.image import MAX_OUTPUT_BYTES, MIN_SIDE_PX
from avatar_core.media.inputs import check_audio, check_image
from avatar_core.ui import Handlers
from corpus import AUDIO_FORMATS, IMAGE_CLASSES, astronaut, astronaut_portrait


@pytest.fixture
def settings(tmp_path):
    return replace(load_settings(env={}, dotenv_path=None), output_dir=tmp_path / "out")


def _unmd(text: str) -> str:
    return text.replace("\\", "")


def looks_like(picture: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference (0..255) of two pictures at the reference's size, in gray."""
    a = np.asarray(picture.convert("L").resize(reference.size), dtype=np.float32)
    return float(np.abs(a - np.asarray(reference.convert("L"), dtype=np.float32)).mean())


def decoded_audio(path) -> tuple[str, str, int, int, float]:
    """(container, codec, rate, channels, seconds of decoded samples) of an audio file."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        n = sum(f.samples for f in c.decode(s))
        return c.format.name, s.codec_context.name, s.codec_context.sample_rate, s.codec_context.channels, n / s.codec_context.sample_rate


# ------------------------------------------------------------------------------ photos


@pytest.mark.parametrize("kind", IMAGE_CLASSES, ids=[c.name for c in IMAGE_CLASSES])
def test_every_photo_class_through_the_image_check(corpus, settings, kind):
    source = corpus.image(kind.name)
    handler_preview, handler_text = Handlers(settings).check_image(str(source), "")
    if kind.faces is None:
        with pytest.raises(InputError) as refused:
            check_image(source, settings=settings)
        for words in kind.refused:
            assert words in refused.value.message
            assert words in _unmd(handler_text)
        assert handler_preview is None and handler_text.startswith("**Problem:**")
        return

    check = check_image(source, settings=settings)
    assert "Problem" not in handler_text and handler_preview is not None
    # What will be uploaded: a JPEG or PNG, 8-bit RGB, within the providers' limits.
    assert check.path.stat().st_size <= MAX_OUTPUT_BYTES
    with Image.open(check.path, formats=["JPEG", "PNG"]) as sent:
        assert sent.format == check.format and sent.mode == "RGB"
        assert min(sent.size) >= MIN_SIDE_PX and sent.size == (check.width, check.height)
        sent.load()
        picture = sent.copy()
    assert len(check.faces) == kind.faces
    assert len(detect_faces(picture)) == kind.faces  # the face is still there in the file itself
    gray = np.asarray(picture.convert("L"), dtype=np.float32)
    assert 40 < gray.mean() < 215 and gray.std() > 25, "washed out, black or flat"
    if kind.upright == "astronaut":
        assert looks_like(picture, astronaut()) < 12
    elif kind.upright == "portrait":
        assert (check.width, check.height) == (600, 800)
        assert looks_like(picture, astronaut_portrait()) < 12
    if kind.name.startswith("exif"):
        assert "turned upright using its camera orientation tag" in handler_text
    if kind.name == "png_alpha":  # transparency flattened onto white, the face untouched
        assert picture.getpixel((2, 2)) == (255, 255, 255)
        assert looks_like(picture.crop((150, 60, 300, 200)), astronaut().crop((150, 60, 300, 200))) < 6
    if kind.name == "cmyk":  # colours survive (not inverted): the astronaut's suit stays white-ish
        assert looks_like(picture, astronaut()) < 12
        rgb = np.asarray(picture, dtype=np.float32) - np.asarray(astronaut(), dtype=np.float32)
        assert np.abs(rgb).mean() < 16
    if kind.name == "24mp":
        assert check.original_format == "JPEG" and source.stat().st_size > MAX_OUTPUT_BYTES
    if kind.name == "heic":
        assert check.original_format == "HEIF" and check.format == "JPEG"
    if kind.name == "cat":
        assert "No face was found in the image" in handler_text
    if kind.name == "group":
        assert "3 faces were found" in handler_text and "crop the photo so only one face remains" in handler_text


def test_a_heic_upload_reaches_the_image_check_through_the_portrait_input(corpus, tmp_path, settings):
    """The app's gr.Image hands a HEIC upload on to our check, which reads it."""
    import gradio as gr
    from gradio.data_classes import ImageData

    from avatar_core.ui import hand_refused_uploads_to_checks

    source = corpus.image("heic")
    image = hand_refused_uploads_to_checks(gr.Image(type="filepath"))
    handed = image.preprocess(ImageData(path=str(source), orig_name="IMG_0001.HEIC"))
    check = check_image(handed, settings=settings)
    assert check.original_format == "HEIF" and len(check.faces) == 1


# ------------------------------------------------------------------------------ recordings


@pytest.mark.parametrize("fmt", list(AUDIO_FORMATS))
def test_every_recording_format_through_the_audio_check(corpus, settings, fmt):
    source = corpus.speech(30, fmt)
    local = check_audio(source, provider="local", settings=settings)
    assert abs(local.duration_s - 30) <= 0.1 and local.format == "wav"
    assert local.warnings == []  # real speech, no long silences, not a video
    container, codec, rate, channels, seconds = decoded_audio(local.path)
    assert (container, codec) == ("wav", "pcm_s16le") and abs(seconds - 30) <= 0.1
    assert channels == AUDIO_FORMATS[fmt][3] and rate == AUDIO_FORMATS[fmt][2]

    hosted = check_audio(source, provider="wavespeed", settings=settings)
    container, codec, rate, channels, seconds = decoded_audio(hosted.path)
    assert (container, codec) == ("mp3", "mp3float") and abs(seconds - 30) <= 0.1
    assert hosted.codec == "mp3" and abs(hosted.duration_s - 30) <= 0.1

    wave, text, shown_s = Handlers(settings).check_audio(str(source), "", "wavespeed", "standard", "", False)
    assert wave is not None and "Problem" not in text and abs(shown_s - 30) <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["m4a", "webm"])
def test_a_recording_of_exactly_the_limit_is_accepted(corpus, settings, fmt):
    """300 s recorded as AAC decodes ~20 ms longer (encoder priming): cut, not refused."""
    source = corpus.speech(300, fmt)
    for provider, out in (("local", "wav"), ("kling", "mp3")):
        check = check_audio(source, provider=provider, settings=settings)
        assert check.duration_s <= 300.0 and check.duration_s >= 299.9 and check.format == out
        assert decoded_audio(check.path)[4] <= 300.06  # MP3's own padding is all that may be added
