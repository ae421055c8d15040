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
    # A picture without a face is refused for hosted providers (test below), so the image
    # side's warning comes through the Local preview, which animates it anyway.
    flat = mf.make_image(tmp_path / "flat.png", "PNG", (500, 500))
    voice = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=2.0, speech_s=3.0, tail_s=1.0)
    got = prepare_inputs(flat, voice, provider="local", tier="standard", settings=settings)
    assert not got.image.faces
    assert any("No face was found" in w for w in got.warnings)
    assert any("silence at its start/end" in w for w in got.warnings)
    priced = prepare_inputs(mf.make_portrait(tmp_path / "face.jpg"), mf.make_tone(tmp_path / "t.wav", "wav", 3.0),
                            provider="kling", tier="pro", settings=settings)
    assert priced.cost.usd is None
    assert any("price of this job is not known" in w for w in priced.warnings)
    assert priced.audio.format == "mp3"


@pytest.mark.parametrize("provider", ["wavespeed", "segmind", "fal", "replicate", "kling"])
def test_prepare_inputs_refuses_a_portrait_without_a_face_for_hosted_providers(tmp_path, settings, provider):
    from avatar_core.providers import LABELS

    flat = mf.make_image(tmp_path / "flat.png", "PNG", (500, 500))
    voice = mf.make_tone(tmp_path / "v.wav", "wav", 3.0)
    with pytest.raises(InputError) as caught:
        prepare_inputs(flat, voice, provider=provider, tier="standard", settings=settings)
    message = caught.value.message
    assert message.startswith("No face was found in the portrait")
    assert f"nothing was sent to {LABELS[provider]}" in message and "one face looks at the camera" in message
    # Refused at the image: the voice track was not even converted.
    work = settings.output_dir / "inputs"
    assert list(work.glob("image-*")) and not list(work.glob("audio-*"))


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


# ----------------------------------------------------------------------------- link text (issue 14, item 1 and 2)


def test_link_text_is_never_a_path(tmp_path, settings):
    """A Link that names a server file, a folder, ~ or nothing gets the same words; nothing is read."""
    from avatar_core.media.inputs import LINK_ONLY_WEB, Link

    real = mf.make_portrait(tmp_path / "real.jpg")
    voice = mf.make_tone(tmp_path / "real.mp3", "mp3", 3.0)
    for text in (str(real), str(voice), str(tmp_path), str(tmp_path / "missing.png"), "~", "/etc/passwd",
                 f"file://{real}", "data:image/png;base64,AAAA", "ftp://x.test/a.jpg", "C:\\a.jpg", "real.jpg"):
        for check in (check_image, check_audio):
            with pytest.raises(InputError) as exc:
                check(Link(text), settings=settings)
            assert exc.value.message == LINK_ONLY_WEB, (text, exc.value.message)
    assert not (settings.output_dir / "inputs").exists() or not any((settings.output_dir / "inputs").iterdir())
    # The same file as a path (an upload, the CLI) is checked as usual.
    assert check_image(real, settings=settings).width > 0


def test_a_links_download_is_deleted_after_the_check_pass_or_fail(server, settings, monkeypatch, tmp_path):
    import tempfile

    from avatar_core.media.inputs import Link

    private = tmp_path / "private-tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    server.routes["/page.html"] = (200, {"Content-Type": "text/html"}, b"<html><script>x()</script></html>")
    with pytest.raises(InputError, match=r"page\.html is not an image we can read") as exc:
        check_image(Link(server.url("/page.html")), settings=settings)
    assert str(private) not in exc.value.message and "url-" not in exc.value.message
    ok = check_image(Link(server.url("/face.jpg")), settings=settings)
    aud = check_audio(Link(server.url("/voice.mp3")), provider="wavespeed", settings=settings)
    assert list(private.iterdir()) == []  # both downloads gone
    kept = sorted(p.name for p in (settings.output_dir / "inputs").iterdir())
    assert all(n.startswith(("image-", "audio-", "wave-")) for n in kept), kept
    # The link's MP3 was written by us, not kept as downloaded (still fit to pass through).
    assert aud.passthrough_ok and aud.path.read_bytes() != server.routes["/voice.mp3"][2]
    assert ok.path.read_bytes() != server.routes["/face.jpg"][2]


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
