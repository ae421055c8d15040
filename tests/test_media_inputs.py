"""The entry points the app and CLI call: URL inputs, pass-through, prepare_inputs."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

import media_factory as mf
from avatar_core.config import Settings
from avatar_core.errors import InputError
from avatar_core.media import check_audio, check_image, prepare_inputs
from media_factory import LocalServer


@pytest.fixture
def settings(tmp_path):
    return Settings(output_dir=tmp_path / "out", allow_private_urls=True)


@pytest.fixture
def files(tmp_path):
    return {
        "/face.jpg": mf.make_portrait(tmp_path / "face.jpg", "JPEG").read_bytes(),
        "/turned.jpg": mf.make_image(tmp_path / "turned.jpg", "JPEG", (400, 600), exif_orientation=6).read_bytes(),
        "/face.webp": mf.make_portrait(tmp_path / "face.webp", "WEBP").read_bytes(),
        "/voice.mp3": mf.make_tone(tmp_path / "voice.mp3", "mp3", 3.0).read_bytes(),
        "/voice.wav": mf.make_tone(tmp_path / "voice.wav", "wav", 3.0).read_bytes(),
        "/quiet.wav": mf.make_silence(tmp_path / "quiet.wav", "wav", 3.0).read_bytes(),
    }


@pytest.fixture
def server(files):
    with LocalServer({k: (200, {}, v) for k, v in files.items()}) as srv:
        yield srv


def test_image_url_is_checked_and_kept_for_pass_through(server, settings):
    res = check_image(server.url("/face.jpg"), settings=settings)
    assert res.source_url == server.url("/face.jpg")
    assert res.passthrough_ok is True  # a plain upright RGB JPEG: the provider may fetch the URL
    assert len(res.faces) == 1
    assert res.path.is_file() and res.path.parent == settings.output_dir / "inputs"


def test_converted_url_image_is_not_passed_through(server, settings):
    turned = check_image(server.url("/turned.jpg"), settings=settings)
    assert (turned.width, turned.height) == (600, 400) and turned.passthrough_ok is False
    webp = check_image(server.url("/face.webp"), settings=settings)
    assert webp.format == "JPEG" and webp.passthrough_ok is False


def test_local_file_has_no_source_url(tmp_path, settings):
    res = check_image(mf.make_portrait(tmp_path / "a.jpg"), settings=settings)
    assert res.source_url is None and res.passthrough_ok is False


def test_audio_url(server, settings):
    mp3 = check_audio(server.url("/voice.mp3"), provider="wavespeed", settings=settings)
    assert mp3.source_url == server.url("/voice.mp3") and mp3.passthrough_ok is True
    wav = check_audio(server.url("/voice.wav"), provider="wavespeed", settings=settings)
    assert wav.format == "mp3" and wav.passthrough_ok is False  # converted, so upload ours
    with pytest.raises(InputError, match="The audio is silent"):
        check_audio(server.url("/quiet.wav"), settings=settings)


def test_private_url_refused_unless_settings_allow_it(server, tmp_path):
    strict = Settings(output_dir=tmp_path / "out")  # allow_private_urls defaults to False
    with pytest.raises(InputError, match="local or private network address"):
        check_image(server.url("/face.jpg"), settings=strict)
    with pytest.raises(InputError, match="local or private network address"):
        check_audio(server.url("/voice.mp3"), settings=strict)
    assert server.hits == []


def test_unsupported_link_schemes(settings):
    with pytest.raises(InputError, match="Only web links"):
        check_image("file:///etc/passwd", settings=settings)
    with pytest.raises(InputError, match="Only web links"):
        check_audio("data:audio/mp3;base64,AAAA", settings=settings)


def test_prepare_inputs_estimates_the_cost_from_the_audio(server, settings, tmp_path):
    speech = mf.make_speechlike(tmp_path / "s.wav", "wav", lead_s=2.0, speech_s=3.0, tail_s=2.0)
    got = prepare_inputs(
        server.url("/face.jpg"), speech, provider="wavespeed", tier="standard", version="v1", settings=settings
    )
    assert got.cost.usd == pytest.approx(0.50)  # 7 s -> two started 5 s blocks
    assert got.audio.duration_s == pytest.approx(7.0, abs=0.01)
    assert got.image.source_url == server.url("/face.jpg")
    assert any("silence" in w for w in got.warnings)

    trimmed = prepare_inputs(
        server.url("/face.jpg"), speech, provider="wavespeed", tier="standard", settings=settings, trim_silence=True
    )
    assert trimmed.cost.usd == pytest.approx(0.25)
    assert trimmed.audio.money_saved_usd == pytest.approx(0.25)


def test_prepare_inputs_warnings_gather_both_sides(tmp_path, settings):
    flat = mf.make_image(tmp_path / "flat.png", "PNG", (500, 500))
    voice = mf.make_tone(tmp_path / "v.wav", "wav", 3.0)
    got = prepare_inputs(flat, voice, provider="kling", tier="pro", settings=settings)
    assert got.cost.usd is None
    assert any("No face was found" in w for w in got.warnings)
    assert any("price of this job is not known" in w for w in got.warnings)
    assert got.audio.format == "mp3"


def test_prepare_inputs_refuses_unknown_choices_before_any_work(tmp_path, settings):
    with pytest.raises(InputError, match="does not offer model version v1"):
        prepare_inputs(tmp_path / "nope.jpg", tmp_path / "nope.wav", provider="replicate", tier="pro", version="v1",
                       settings=settings)
    with pytest.raises(InputError, match="Unknown provider"):
        check_audio(tmp_path / "nope.wav", provider="acme", settings=settings)


def test_results_are_frozen(tmp_path, settings):
    res = check_image(mf.make_portrait(tmp_path / "a.jpg"), settings=settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.width = 1  # type: ignore[misc]
    assert isinstance(res.preview, Image.Image)


def test_folder_is_not_a_file(tmp_path, settings):
    with pytest.raises(InputError, match="is a folder"):
        check_image(tmp_path, settings=settings)


@pytest.mark.parametrize("trim, words", [
    (False, "The audio is longer than 300 s. The local preview accepts at most 300 s: cut it into shorter parts "
            "(or switch on silence trimming if it has long pauses at the ends)."),
    (True, "The audio is longer than 360 s before trimming silence. The local preview accepts at most 300 s: "
           "cut it into shorter parts."),
])
def test_a_lying_webm_is_refused_by_its_real_length(tmp_path, settings, trim, words):
    from tests.attack_media import lying_webm

    src = lying_webm(tmp_path / "lie.webm", hold_s=1200, claim_s=5)  # 20 min behind a 5 s header
    with pytest.raises(InputError) as exc:
        check_audio(src, provider="local", settings=settings, trim_silence=trim)
    assert exc.value.message == words


def test_a_recording_just_past_the_limit_is_still_cut_to_it(tmp_path, settings):
    # Encoder padding (up to CODEC_PADDING_S) is cut, not refused: the decode cap leaves room for it.
    src = mf.make_tone(tmp_path / "edge.wav", "wav", 300.05)
    check = check_audio(src, provider="local", settings=settings)
    assert check.duration_s == 300.0
