"""Voice track checks: every accepted format, limits, broken files, trimming, output, envelope."""

from __future__ import annotations

import subprocess
import time

import av
import numpy as np
import pytest
from PIL import Image

import media_factory as mf
from avatar_core.config import Settings
from avatar_core.errors import InputError
from avatar_core.media import audio as audio_mod
from avatar_core.media.audio import AUDIO_LIMITS, loudness_envelope
from avatar_core.media.inputs import check_audio


@pytest.fixture
def settings(tmp_path):
    return Settings(output_dir=tmp_path / "out")


@pytest.fixture(autouse=True)
def no_subprocesses(monkeypatch):
    """pydub must never shell out to ffmpeg/ffprobe (there is none): fail loudly if it tries."""

    def refuse(*a, **kw):
        raise AssertionError(f"a subprocess was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def _decoded_seconds(path) -> float:
    with av.open(str(path)) as c:
        n = sum(f.samples for f in c.decode(audio=0))
        return n / c.streams.audio[0].sample_rate


@pytest.mark.parametrize(
    "fmt, codec",
    [
        ("mp3", "mp3"),
        ("wav", "pcm_s16le"),
        ("m4a", "aac"),
        ("aac", "aac"),
        ("ogg", "opus"),
        ("oga", "vorbis"),
        ("flac", "flac"),
        ("webm", "opus"),
    ],
)
def test_each_format_becomes_mp3_for_hosted_providers(tmp_path, settings, fmt, codec):
    src = mf.make_tone(tmp_path / f"voice.{fmt}", fmt, 3.0)
    res = check_audio(src, provider="wavespeed", settings=settings)
    assert res.original_codec == codec
    assert res.format == "mp3" and res.codec == "mp3" and res.path.suffix == ".mp3"
    assert "MP3 keeps the upload small" in res.format_reason
    assert res.duration_s == pytest.approx(3.0, abs=0.1)
    assert _decoded_seconds(res.path) == pytest.approx(3.0, abs=0.15)
    assert res.channels in (1, 2) and res.sample_rate > 0
    assert res.waveform_png.is_file()


def test_local_provider_gets_wav(tmp_path, settings):
    src = mf.make_tone(tmp_path / "v.m4a", "m4a", 3.0)
    res = check_audio(src, provider="local", settings=settings)
    assert res.format == "wav" and res.codec == "pcm_s16le" and res.path.suffix == ".wav"
    assert "WAV" in res.format_reason
    assert _decoded_seconds(res.path) == pytest.approx(3.07, abs=0.1)


def test_kling_reason_names_the_inline_limit(tmp_path, settings):
    res = check_audio(mf.make_tone(tmp_path / "v.wav", "wav", 3.0), provider="kling", settings=settings)
    assert res.format == "mp3" and "5 MB" in res.format_reason


def test_mp3_that_already_fits_is_passed_on_unchanged(tmp_path, settings):
    src = mf.make_tone(tmp_path / "v.mp3", "mp3", 3.0)
    res = check_audio(src, provider="fal", settings=settings)
    assert res.path.read_bytes() == src.read_bytes()


def test_sound_track_of_a_video(tmp_path, settings):
    src = mf.make_video_with_audio(tmp_path / "clip.mp4", 3.0)
    res = check_audio(src, provider="wavespeed", settings=settings)
    assert res.original_codec == "aac"
    assert res.duration_s == pytest.approx(3.0, abs=0.1)
    assert any("sound track of the video" in w for w in res.warnings)


def test_video_without_sound(tmp_path, settings):
    src = mf.make_video_with_audio(tmp_path / "mute.mp4", 1.0, audio=False)
    with pytest.raises(InputError, match="This video has no sound track"):
        check_audio(src, settings=settings)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_a_picture_given_as_audio_is_called_a_picture(tmp_path, settings, fmt, ext):
    src = mf.make_image(tmp_path / f"photo.{ext}", fmt, (320, 400))
    with pytest.raises(InputError) as exc:
        check_audio(src, settings=settings)
    assert exc.value.message.startswith(f"photo.{ext} is a picture, not a sound file. Put it in the portrait field")
    assert "video" not in exc.value.message and "voice recording (MP3, WAV" in exc.value.message


def test_too_short(tmp_path, settings):
    src = mf.make_tone(tmp_path / "short.wav", "wav", 1.0)
    with pytest.raises(InputError, match=r"too short \(1.0 s\). It must last at least 2 s"):
        check_audio(src, settings=settings)


def test_too_long_is_refused_from_the_headers(tmp_path, settings, monkeypatch):
    src = mf.make_tone(tmp_path / "long.wav", "wav", 330.0, sample_rate=8000)

    def no_decode(*a, **kw):
        raise AssertionError("decoded a file the headers already ruled out")

    monkeypatch.setattr(audio_mod, "decode", no_decode)
    with pytest.raises(InputError, match=r"too long \(330.0 s\). WaveSpeed accepts at most 300 s"):
        check_audio(src, provider="wavespeed", settings=settings)


def test_just_over_the_limit_is_caught_after_decoding(tmp_path, settings):
    # 301 s is within the 5 % header slack, so the decoded length decides.
    src = mf.make_tone(tmp_path / "long.flac", "flac", 301.0, sample_rate=8000)
    with pytest.raises(InputError, match=r"too long \(301.0 s\)"):
        check_audio(src, provider="kling", settings=settings, trim_silence=True)


def test_limits_are_one_table_per_provider(tmp_path, settings, monkeypatch):
    assert set(AUDIO_LIMITS) == {"local", "wavespeed", "segmind", "fal", "replicate", "kling"}
    monkeypatch.setitem(AUDIO_LIMITS, "segmind", audio_mod.AudioLimits(2.0, 60.0, None, "mp3", "test"))
    src = mf.make_tone(tmp_path / "v.wav", "wav", 70.0, sample_rate=8000)
    with pytest.raises(InputError, match="Segmind accepts at most 60 s"):
        check_audio(src, provider="segmind", settings=settings)
    assert check_audio(src, provider="fal", settings=settings).duration_s == pytest.approx(70.0)


def test_silence_is_an_error(tmp_path, settings):
    src = mf.make_silence(tmp_path / "quiet.wav", "wav", 4.0)
    with pytest.raises(InputError, match="The audio is silent"):
        check_audio(src, settings=settings)


def test_corrupt_bytes(tmp_path, settings):
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(1).bytes(50_000))
    with pytest.raises(InputError) as exc:
        check_audio(tmp_path / "noise.mp3", settings=settings)
    assert "noise.mp3" in str(exc.value)
    assert "not an audio file" in str(exc.value) or "damaged" in str(exc.value)


def test_truncated_m4a(tmp_path, settings):
    data = mf.make_tone(tmp_path / "full.m4a", "m4a", 3.0).read_bytes()
    (tmp_path / "cut.m4a").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"cut\.m4a"):
        check_audio(tmp_path / "cut.m4a", settings=settings)


def test_text_file_is_not_audio(tmp_path, settings):
    (tmp_path / "notes.mp3").write_text("these are my notes, not a recording\n" * 50)
    with pytest.raises(InputError, match=r"notes\.mp3 is not an audio file we can read. Use MP3, WAV"):
        check_audio(tmp_path / "notes.mp3", settings=settings)


def test_picture_given_as_audio(tmp_path, settings):
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(InputError) as exc:
        check_audio(tmp_path / "photo.png", settings=settings)
    assert "photo.png" in str(exc.value)


def test_header_without_samples(tmp_path, settings):
    import wave

    with wave.open(str(tmp_path / "hollow.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(InputError, match=r"hollow\.wav is damaged or empty: no sound could be decoded"):
        check_audio(tmp_path / "hollow.wav", settings=settings)


def test_empty_and_missing(tmp_path, settings):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        check_audio(tmp_path / "empty.wav", settings=settings)
    with pytest.raises(InputError, match="was not found"):
        check_audio(tmp_path / "gone.wav", settings=settings)


def test_trim_silence_reports_seconds_and_money_saved(tmp_path, settings):
    src = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=2.0, speech_s=3.0, tail_s=2.0)
    res = check_audio(src, provider="wavespeed", settings=settings, trim_silence=True)
    # 4 s of silence minus 0.25 s of padding kept on each side
    assert res.trimmed_s == pytest.approx(3.5, abs=0.06)
    assert res.duration_s == pytest.approx(3.5, abs=0.06)
    assert res.original_duration_s == pytest.approx(7.0, abs=0.01)
    assert res.money_saved_usd == pytest.approx(0.25)  # 2 blocks of 5 s -> 1 block
    assert _decoded_seconds(res.path) == pytest.approx(3.5, abs=0.1)


def test_trim_money_uses_tier_and_version(tmp_path, settings):
    src = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=3.0, speech_s=4.0, tail_s=3.0)
    res = check_audio(src, provider="fal", tier="pro", settings=settings, trim_silence=True)
    assert res.money_saved_usd == pytest.approx(res.trimmed_s * 0.115, abs=0.002)
    res = check_audio(src, provider="kling", settings=settings, trim_silence=True)
    assert res.trimmed_s > 5 and res.money_saved_usd is None  # price unknown


def test_untrimmed_silence_is_pointed_out(tmp_path, settings):
    src = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=2.0, speech_s=3.0, tail_s=2.0)
    res = check_audio(src, provider="wavespeed", settings=settings)
    assert res.trimmed_s == 0.0 and res.duration_s == pytest.approx(7.0, abs=0.01)
    assert any("3.5 s of silence" in w and "$0.25" in w for w in res.warnings)


def test_trimming_can_make_it_too_short(tmp_path, settings):
    src = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=3.0, speech_s=1.0, tail_s=3.0)
    with pytest.raises(InputError, match=r"too short .* after trimming silence"):
        check_audio(src, settings=settings, trim_silence=True)


def test_waveform_png_shows_the_wave(tmp_path, settings):
    res = check_audio(mf.make_tone(tmp_path / "v.wav", "wav", 3.0), settings=settings)
    img = Image.open(res.waveform_png).convert("RGB")
    assert img.size == (1000, 200)
    blue = sum(1 for x in range(0, 1000, 10) if img.getpixel((x, 130))[2] > 150 and img.getpixel((x, 130))[0] < 100)
    assert blue > 80  # the tone fills the width
    dark = sum(1 for x in range(8, 120) for y in range(6, 40) if sum(img.getpixel((x, y))) < 150)
    assert dark > 20  # the duration text is printed top-left


def test_waveform_label_is_the_duration():
    from avatar_core.media.preview import format_duration

    assert format_duration(3.04) == "3.0 s"
    assert format_duration(125.4) == "2:05.4 (125.4 s)"


def test_stereo_48k_and_multichannel_kept_to_two(tmp_path, settings):
    src = mf.make_tone(tmp_path / "v.flac", "flac", 3.0, sample_rate=48000, channels=2)
    res = check_audio(src, provider="replicate", settings=settings)
    assert res.channels == 2 and res.sample_rate == 48000


def test_loudness_envelope(tmp_path):
    src = mf.make_speechlike(tmp_path / "v.wav", "wav", lead_s=1.0, speech_s=2.0, tail_s=1.0)
    env = loudness_envelope(src, 25)
    assert env.shape == (100,)
    assert env.dtype == np.float32
    assert env.min() >= 0.0 and env.max() == pytest.approx(1.0)
    assert np.all(env[:24] == 0.0) and np.all(env[-24:] == 0.0)  # pauses: mouth closed
    assert env[25:75].mean() > 0.5
    assert np.ptp(env[25:75]) > 0.3  # follows the syllable-like rhythm
    assert loudness_envelope(src, 30).shape == (120,)


def test_loudness_envelope_of_silence_is_zero(tmp_path):
    env = loudness_envelope(mf.make_silence(tmp_path / "s.wav", "wav", 2.0), 24)
    assert env.shape == (48,) and not env.any()


def test_five_minutes_decode_quickly(tmp_path, settings):
    src = mf.make_tone(tmp_path / "v.mp3", "mp3", 299.0, sample_rate=22050)
    t0 = time.perf_counter()
    res = check_audio(src, provider="kling", settings=settings)
    assert time.perf_counter() - t0 < 10
    assert res.path.stat().st_size <= 5 * 1024 * 1024


def test_decoding_stops_past_the_limit_whatever_the_header_claims(tmp_path):
    from tests.attack_media import lying_webm

    src = lying_webm(tmp_path / "lie.webm", hold_s=900, claim_s=5)
    assert audio_mod.probe(src).duration_s == pytest.approx(5.0)  # a real lie: the header says 5 s
    t0 = time.perf_counter()
    with pytest.raises(audio_mod.AudioTooLong) as exc:
        audio_mod.decode(src, max_s=30.0)
    assert time.perf_counter() - t0 < 2.0  # 30 s of Opus, not 900
    assert exc.value.limit_s == 30.0 and "lie.webm is longer than 30 s" in exc.value.message
    # Within the limit it decodes to the last sample, header or not.
    seg = audio_mod.decode(src, max_s=1000.0)
    assert len(seg) / 1000.0 == pytest.approx(900.0, abs=10.0)
    assert len(seg.raw_data) == int(seg.frame_count()) * seg.frame_width


def test_mono_samples_match_the_float_mix_of_every_channel(tmp_path):
    seg = audio_mod.decode(mf.make_tone(tmp_path / "st.wav", "wav", 7.0, channels=2, sample_rate=44100))
    monkey = audio_mod._BLOCK_FRAMES
    try:
        audio_mod._BLOCK_FRAMES = 1000  # many blocks, a short last one
        blocked = audio_mod.mono_samples(seg)
    finally:
        audio_mod._BLOCK_FRAMES = monkey
    np.testing.assert_allclose(blocked, audio_mod.samples(seg).mean(axis=1), atol=1e-6)
    assert blocked.dtype == np.float32 and blocked.shape == (len(audio_mod.samples(seg)),)


def _dominant_hz(seg) -> float:
    x = audio_mod.mono_samples(seg)
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * seg.frame_rate / len(x))


@pytest.mark.parametrize("rate", [96000, 192000])
def test_a_faster_rate_than_48_khz_is_resampled_while_decoding(tmp_path, rate):
    src = mf.make_tone(tmp_path / f"v{rate}.flac", "flac", 2.0, freq=1000.0, sample_rate=rate, channels=2)
    assert audio_mod.probe(src).sample_rate == rate
    seg = audio_mod.decode(src, max_s=3.0)
    assert seg.frame_rate == 48000 and seg.channels == 2
    assert len(seg.raw_data) == pytest.approx(2.0 * 48000 * 4, rel=0.01)  # 2 s at 48 kHz, not at the source rate
    assert _dominant_hz(seg) == pytest.approx(1000.0, abs=2.0)  # the same sound, not sped up or slowed down


def test_the_fastest_studio_rate_decodes_to_48_khz_and_the_cap_is_still_in_seconds(tmp_path):
    from tests.attack_media import high_rate_flac

    src = high_rate_flac(tmp_path / "fast.flac", 384000, 3.0)
    assert audio_mod.probe(src).sample_rate == 384000
    seg = audio_mod.decode(src, max_s=5.0)
    assert seg.frame_rate == 48000 and seg.channels == 2
    assert len(seg) / 1000.0 == pytest.approx(3.0, abs=0.1)
    assert not audio_mod.is_silent(seg)
    with pytest.raises(audio_mod.AudioTooLong):  # 3 s of it is more than 2 s, whatever the rate
        audio_mod.decode(src, max_s=2.0)


def test_a_rate_faster_than_any_recorder_is_refused_before_decoding(tmp_path, settings):
    from tests.attack_media import high_rate_flac

    src = high_rate_flac(tmp_path / "fast.flac", 655350, 20.0)  # FLAC's highest rate
    t0 = time.process_time()
    with pytest.raises(InputError) as exc:
        audio_mod.decode(src)
    assert time.process_time() - t0 < 0.2  # from the header: resampling 20 s of it takes about as long
    assert exc.value.message == ("The audio in fast.flac is sampled at 655350 Hz, faster than any recorder makes "
                                 "(at most 384000 Hz). Export it again at 48 kHz or 44.1 kHz.")
    with pytest.raises(InputError, match="sampled at 655350 Hz"):
        check_audio(src, settings=settings)
    assert not list((settings.output_dir / "inputs").glob("audio-*"))  # nothing written for it


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_rates_up_to_48_khz_keep_their_own_rate(tmp_path, rate):
    seg = audio_mod.decode(mf.make_tone(tmp_path / "v.flac", "flac", 1.0, sample_rate=rate))
    assert seg.frame_rate == rate


def test_six_channels_are_mixed_down_to_stereo(tmp_path):
    src = tmp_path / "surround.flac"
    pcm = np.repeat(mf.tone_pcm(2.0, sample_rate=48000), 6, axis=1)
    with av.open(str(src), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=48000, layout="5.1")
        stream.codec_context.format = "s16"
        for i in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[i : i + 4096].reshape(1, -1)), format="s16",
                                               layout="5.1")
            frame.sample_rate = 48000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert audio_mod.probe(src).channels == 6
    seg = audio_mod.decode(src)
    assert seg.channels == 2 and seg.frame_rate == 48000 and not audio_mod.is_silent(seg)


def test_the_local_preview_gets_a_48_khz_wav_from_a_192_khz_wav(tmp_path, settings):
    src = mf.make_tone(tmp_path / "studio.wav", "wav", 3.0, sample_rate=192000, channels=2)
    res = check_audio(src, provider="local", settings=settings)
    assert res.sample_rate == 48000 and res.channels == 2  # written again, not kept as it came
    assert res.path.stat().st_size < 3.1 * 48000 * 4 < src.stat().st_size
    with av.open(str(res.path)) as c:
        assert c.streams.audio[0].codec_context.name == "pcm_s16le" and c.streams.audio[0].sample_rate == 48000


def test_silence_windows_and_waveform_columns_are_the_same_a_block_at_a_time(tmp_path, monkeypatch):
    seg = audio_mod.decode(mf.make_speechlike(tmp_path / "s.wav", "wav", sample_rate=44100))
    whole_db, whole_x = audio_mod._window_dbfs(seg), audio_mod.mono_samples(seg)
    monkeypatch.setattr(audio_mod, "_BLOCK_FRAMES", 3000)  # many blocks, a short last one
    blocked_db = audio_mod._window_dbfs(seg)
    assert blocked_db.shape == (len(whole_x) // 882,)
    np.testing.assert_array_equal(blocked_db, whole_db)
    for columns in (1000, 997):
        lo, hi = audio_mod.mono_extremes(seg, columns)
        parts = np.array_split(whole_x, columns)
        np.testing.assert_array_equal(lo, [p.min() for p in parts])
        np.testing.assert_array_equal(hi, [p.max() for p in parts])
    short = seg[:5]  # fewer frames than columns: one column per frame
    lo, hi = audio_mod.mono_extremes(short, 1000)
    np.testing.assert_array_equal(lo, audio_mod.mono_samples(short))
    np.testing.assert_array_equal(hi, audio_mod.mono_samples(short))


@pytest.mark.parametrize("kind", ["heic", "avif"])
def test_a_heic_or_avif_photo_given_as_audio_is_called_a_picture(tmp_path, settings, kind):
    """FFmpeg opens HEIF pictures with its MP4 demuxer; they used to be "a video with no sound track"."""
    from tests.corpus import astronaut_portrait, heic

    src = tmp_path / f"IMG_0042.{kind}"
    if kind == "heic":
        heic(src)  # as an iPhone saves it
    else:
        astronaut_portrait().save(src, "AVIF", quality=60)
    with av.open(str(src)) as c:  # what made it look like a silent video
        assert c.format.name.startswith("mov,mp4") and not c.streams.audio
    for call in (lambda: check_audio(src, settings=settings), lambda: audio_mod.decode(src)):
        with pytest.raises(InputError) as exc:
            call()
        assert exc.value.message.startswith(f"IMG_0042.{kind} is a picture, not a sound file. Put it in the portrait field")
        assert "video" not in exc.value.message


def test_a_silent_mp4_video_is_still_a_video_without_sound(tmp_path, settings):
    src = mf.make_video_with_audio(tmp_path / "mute.mp4", 1.0, audio=False)
    assert not audio_mod._is_heif_picture(src)
    with pytest.raises(InputError, match=r"^This video has no sound track \(mute.mp4\)"):
        audio_mod.probe(src)
