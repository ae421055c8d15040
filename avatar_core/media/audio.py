"""Voice track checks, decoding, silence trimming, conversion and the loudness envelope.

Everything goes through PyAV (there is no system ffmpeg/ffprobe). ``probe`` reads only
the container headers; ``decode`` turns the first audio stream (also the sound track of
a video) into a pydub ``AudioSegment`` built from raw PCM, so pydub never shells out.
Output files are written by PyAV: MP3 for hosted providers (small uploads: 300 s at
128 kbit/s is 4.8 MB, under Kling's 5 MB inline limit), WAV for the local renderer
(lossless, nothing to decode twice).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from collections.abc import Mapping

import av
import numpy as np

with warnings.catch_warnings():
    # pydub looks for ffmpeg on import and warns when there is none; we never use it.
    warnings.simplefilter("ignore", RuntimeWarning)
    from pydub import AudioSegment

from ..errors import InputError

MB = 1024 * 1024


@dataclass(frozen=True)
class AudioLimits:
    """What one provider accepts. ``max_bytes`` None = no published size limit."""

    min_s: float
    max_s: float
    max_bytes: int | None
    output: Literal["mp3", "wav"]
    why: str  # why this output format, shown to the user


# The ONE table of per-provider audio limits (PROVIDERS.md "Input limits": 2 s to 300 s;
# older pages said 60 s, so each provider keeps its own row to change independently).
_MP3_WHY = "MP3 keeps the upload small"
AUDIO_LIMITS: Mapping[str, AudioLimits] = {
    "local": AudioLimits(2.0, 300.0, None, "wav", "WAV: lossless and read directly by the local renderer"),
    "wavespeed": AudioLimits(2.0, 300.0, 50 * MB, "mp3", f"{_MP3_WHY} (WaveSpeed takes audio uploads up to 50 MB)"),
    "segmind": AudioLimits(2.0, 300.0, None, "mp3", f"{_MP3_WHY} (Segmind uploads travel as base64 data URLs)"),
    # fal.ai, Replicate, Kling: PROVIDERS.md ("Input limits" and each provider's section), from their
    # API pages and SDKs as read 2026-11. fal.ai publishes no byte limit; its files ride inside the
    # JSON as data URIs, which the client caps at 10 MB (FalProvider.upload). Replicate's /v1/files
    # publishes none. Kling's own API takes sound_file inline (raw base64) up to 5 MB.
    "fal": AudioLimits(2.0, 300.0, 10 * MB, "mp3", f"{_MP3_WHY} (fal.ai files travel as data URIs, up to 10 MB here)"),
    "replicate": AudioLimits(2.0, 300.0, None, "mp3", f"{_MP3_WHY} (Replicate deletes inputs after 1 hour anyway)"),
    "kling": AudioLimits(2.0, 300.0, 5 * MB, "mp3", f"{_MP3_WHY}: Kling takes audio inline only up to 5 MB"),
}

# 128 kbit/s: transparent for speech, and 300 s (the longest allowed) is 4.8 MB < 5 MB.
MP3_BITRATE = 128_000
# Fallback when a file would still be over a provider's byte limit; speech stays clear.
MP3_BITRATE_SMALL = 64_000
# libmp3lame only takes these rates; anything else is resampled to 44.1 kHz.
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

# Silence: RMS below -50 dBFS in 20 ms windows. A quiet room recorded on a phone sits
# around -60..-55 dBFS; the softest speech is well above -45 dBFS.
SILENCE_DBFS = -50.0
SILENCE_WINDOW_S = 0.02
# Keep this much of the silence next to the speech when trimming, so soft onsets and
# trailing breaths are not cut and the avatar does not start talking on frame one.
TRIM_PADDING_S = 0.25
# Trims shorter than this are not worth a re-encode.
MIN_TRIM_S = 0.3

# The highest sample rate a decoded voice keeps. A file's rate is its sender's choice (FLAC
# allows 655350 Hz), so a cap in seconds alone does not bound memory; decoding resamples
# anything faster to this (48 kHz is more than speech needs, and what video players use).
# 44.1 kHz, 48 kHz and slower recordings keep their own rate.
MAX_SAMPLE_RATE = 48_000
# The fastest source rate decoded at all: 384 kHz is the top of studio converters (DXD is
# 352.8 kHz). Resampling costs time per source sample, so FLAC's 655350 Hz (or a WavPack
# header's any rate) would make a 100 KB file cost seconds of CPU; it is refused instead.
MAX_SOURCE_RATE = 384_000
# A decoded voice has at most this many channels: more are mixed down to stereo.
MAX_CHANNELS = 2

# Probing beyond the 300 s limit by this factor refuses a long file before decoding it.
_PROBE_SLACK = 1.05

# The longest sound any provider accepts. A container's own duration is only a claim (a
# 3 MB WebM can say 5 s and hold an hour), so decoding itself stops past a limit.
LONGEST_ALLOWED_S = max(limit.max_s for limit in AUDIO_LIMITS.values())
# With silence trimming on, a recording may last this much longer before it is trimmed.
MAX_TRIMMABLE_S = 60.0

_FRIENDLY_CODECS = {"mp3float": "mp3", "mp3": "mp3", "aac": "aac", "aac_fixed": "aac", "flac": "flac",
                    "vorbis": "vorbis", "libvorbis": "vorbis", "opus": "opus", "libopus": "opus"}


class AudioTooLong(InputError):
    """Decoding went past ``limit_s``: the sound lasts longer, whatever its header says."""

    def __init__(self, limit_s: float, name: str) -> None:
        self.limit_s = limit_s
        super().__init__(
            f"The audio in {name} is longer than {limit_s:g} s. Cut it into parts of at most {limit_s:g} s."
        )


@dataclass(frozen=True)
class AudioInfo:
    """What the container headers say, without decoding the samples."""

    duration_s: float | None  # None when the container does not say
    codec: str
    sample_rate: int
    channels: int
    container: str
    has_video: bool


def limits_for(provider: str) -> AudioLimits:
    """The provider's row of :data:`AUDIO_LIMITS`, or InputError naming the choices."""
    try:
        return AUDIO_LIMITS[provider]
    except KeyError:
        raise InputError(f"Unknown provider {provider!r}. Choose one of: {', '.join(AUDIO_LIMITS)}.") from None


def _name(path: Path) -> str:
    return path.name or str(path)


def _open(path: Path):
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"The audio file {_name(path)} was not found. Choose the file again.") from None
    if size == 0:
        raise InputError(f"The audio file {_name(path)} is empty (0 bytes). Record or export it again.")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        raise InputError(
            f"{_name(path)} is not an audio file we can read. Use MP3, WAV, M4A/AAC, OGG, FLAC, WebM "
            "or a video with sound."
        ) from exc
    except av.error.FFmpegError as exc:
        raise InputError(f"{_name(path)} could not be opened as audio ({exc.strerror}). Export it again as MP3 or WAV.") from exc


def _codec_name(stream) -> str:
    name = stream.codec_context.name
    if name.startswith("pcm_"):
        return name
    return _FRIENDLY_CODECS.get(name, name)


def _is_cover_art(stream) -> bool:
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except (AttributeError, TypeError):  # pragma: no cover - older PyAV
        return False


# Demuxers FFmpeg opens still pictures with (a PNG given as audio opens as a one-frame "video").
_PICTURE_FORMATS = ("image2", "_pipe", "gif", "apng", "webp")


# ftyp brands of HEIF pictures (HEIC, AVIF and their sequences): FFmpeg opens them with its
# MP4 demuxer ("mov,mp4,..."), as if they were videos. A video's own brands (isom, mp42,
# qt, M4V, ...) are none of these.
_PICTURE_BRANDS = frozenset({b"mif1", b"mif2", b"msf1", b"miaf", b"heic", b"heix", b"heim", b"heis", b"hevc",
                             b"hevx", b"heif", b"avif", b"avis", b"avio"})


def _is_heif_picture(path: Path) -> bool:
    """True when the file starts with an ISO-BMFF ftyp box naming a HEIF/AVIF picture brand."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return False
            size = int.from_bytes(head[:4], "big")
            if not 16 <= size <= 4096:
                return False
            body = f.read(size - 8)
    except OSError:
        return False
    # major brand, minor version (skipped), then the compatible brands
    brands = [body[0:4]] + [body[i : i + 4] for i in range(8, len(body) - 3, 4)]
    return any(brand in _PICTURE_BRANDS for brand in brands)


def _no_sound(container, path: Path) -> InputError:
    """The message for a file with no audio stream: a picture, a silent video, or neither."""
    fmt = container.format.name or ""
    if (container.streams.video and any(part in fmt for part in _PICTURE_FORMATS)) or _is_heif_picture(path):
        return InputError(
            f"{_name(path)} is a picture, not a sound file. Put it in the portrait field, and choose a voice "
            "recording (MP3, WAV, M4A, ...) for the voice."
        )
    what = "video has no sound track" if container.streams.video else "file has no sound in it"
    return InputError(f"This {what} ({_name(path)}). Choose a voice recording (MP3, WAV, M4A, ...).")


def probe(path: str | os.PathLike) -> AudioInfo:
    """Duration, codec, sample rate and channels from the headers (no full decode)."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise _no_sound(container, path)
        stream = container.streams.audio[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return AudioInfo(
            duration_s=duration,
            codec=_codec_name(stream),
            sample_rate=int(stream.codec_context.sample_rate or 0),
            channels=int(stream.codec_context.channels or 0),
            container=container.format.name,
            # Cover art in an MP3/M4A is a "video" stream flagged attached_pic: not a video.
            has_video=any(not _is_cover_art(v) for v in container.streams.video),
        )


def _check_source_rate(rate: int | None, path: Path) -> None:
    if rate and rate > MAX_SOURCE_RATE:
        raise InputError(
            f"The audio in {_name(path)} is sampled at {rate} Hz, faster than any recorder makes "
            f"(at most {MAX_SOURCE_RATE} Hz). Export it again at 48 kHz or 44.1 kHz."
        )


def decode(
    path: str | os.PathLike, *, sample_rate: int | None = None, mono: bool = False, max_s: float | None = None
) -> AudioSegment:
    """Decode the first audio stream to 16-bit PCM in a pydub AudioSegment (no ffmpeg binary).

    A source faster than :data:`MAX_SOURCE_RATE` is refused (InputError) from its header
    or its first faster frame. More than two channels are mixed down to stereo, and a rate above
    :data:`MAX_SAMPLE_RATE` is resampled to it, frame by frame as the file is read, so the
    PCM kept costs at most 192 kB per second whatever the file's own rate and channels.
    ``sample_rate``/``mono`` resample on the way (used by the loudness envelope). With
    ``max_s``, decoding stops and :class:`AudioTooLong` is raised as soon as more than
    ``max_s`` seconds have come out, whatever the container claims, so memory and time
    stay bounded by ``max_s``. The PCM grows in one buffer (no list of chunks joined at
    the end, no second copy).
    """
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise _no_sound(container, path)
        stream = container.streams.audio[0]
        _check_source_rate(stream.codec_context.sample_rate, path)
        channels = 1 if mono else min(MAX_CHANNELS, max(1, stream.codec_context.channels or 1))
        rate = min(sample_rate or stream.codec_context.sample_rate or 44100, MAX_SAMPLE_RATE)
        resampler = av.AudioResampler(format="s16", layout="mono" if channels == 1 else "stereo", rate=rate)
        frame_bytes = 2 * channels
        cap = None if max_s is None else int(math.ceil(max_s * rate)) * frame_bytes
        data = bytearray()

        def take(out) -> None:
            data.extend(memoryview(out.planes[0])[: out.samples * frame_bytes])
            if cap is not None and len(data) > cap:
                raise AudioTooLong(max_s, _name(path))

        decoded_frames = 0
        try:
            for frame in container.decode(stream):
                decoded_frames += 1
                _check_source_rate(frame.sample_rate, path)  # a stream may change its rate midway
                for out in resampler.resample(frame):
                    take(out)
            for out in resampler.resample(None):
                take(out)
        except av.error.FFmpegError as exc:
            if decoded_frames == 0:
                raise InputError(
                    f"The audio in {_name(path)} is damaged and cannot be decoded. Export or record it again."
                ) from exc
            # Damage after some good audio: keep what decoded (players do the same).
    if not data:
        raise InputError(f"The audio in {_name(path)} is damaged or empty: no sound could be decoded. Export it again.")
    return AudioSegment(data=data, sample_width=2, frame_rate=rate, channels=channels)


def samples(segment: AudioSegment) -> np.ndarray:
    """Float32 samples in -1..1, shape (n_frames, channels)."""
    arr = np.frombuffer(segment.raw_data, dtype=np.int16).astype(np.float32) / 32768.0
    return arr.reshape(-1, segment.channels)


# Samples converted to float at a time by :func:`mono_samples` (about 1 MB of float32).
_BLOCK_FRAMES = 1 << 18


def mono_samples(segment: AudioSegment) -> np.ndarray:
    """The mono mix as float32 in -1..1, shape (n_frames,), converted a block at a time.

    Costs one float32 per frame (a quarter of :func:`samples` on stereo), never a float
    copy of every channel of the whole clip.
    """
    pcm = np.frombuffer(segment.raw_data, dtype=np.int16).reshape(-1, segment.channels)
    mono = np.empty(pcm.shape[0], dtype=np.float32)
    for i in range(0, pcm.shape[0], _BLOCK_FRAMES):
        mono[i : i + _BLOCK_FRAMES] = _mono_range(pcm, i, i + _BLOCK_FRAMES)
    return mono


def _mono_range(pcm: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The mono mix of frames ``start:stop`` of int16 ``pcm`` (n_frames, channels), float32 in -1..1."""
    return pcm[start:stop].astype(np.float32).mean(axis=1) / 32768.0


def _window_dbfs(segment: AudioSegment, window_s: float = SILENCE_WINDOW_S) -> np.ndarray:
    """RMS level in dBFS of each whole ``window_s`` window of the mono mix.

    Computed a block of windows at a time from the 16-bit PCM: one float per window is
    kept, never a float copy of the clip (300 s of 48 kHz would be 55 MB of float32).
    """
    pcm = np.frombuffer(segment.raw_data, dtype=np.int16).reshape(-1, segment.channels)
    n = max(1, int(segment.frame_rate * window_s))
    count = pcm.shape[0] // n
    if count == 0:
        return np.array([-math.inf])
    rms = np.empty(count, dtype=np.float64)
    step = max(1, _BLOCK_FRAMES // n)
    for i in range(0, count, step):
        j = min(count, i + step)
        block = _mono_range(pcm, i * n, j * n).reshape(-1, n).astype(np.float64)
        rms[i:j] = np.sqrt(np.mean(block * block, axis=1))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms)


def mono_extremes(segment: AudioSegment, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of the mono mix in each of ``columns`` near-equal slices, as np.array_split cuts it.

    For drawing a waveform; computed a block at a time, so it costs two floats per column,
    not a float copy of the clip. Fewer frames than columns: one slice per frame.
    """
    pcm = np.frombuffer(segment.raw_data, dtype=np.int16).reshape(-1, segment.channels)
    n = pcm.shape[0]
    if n == 0 or columns <= 0:
        return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)
    columns = min(columns, n)
    q, r = divmod(n, columns)
    sizes = np.full(columns, q, dtype=np.int64)
    sizes[:r] += 1  # array_split gives the first n % columns slices one frame more
    edges = np.concatenate([[0], np.cumsum(sizes)])
    lo = np.empty(columns, dtype=np.float32)
    hi = np.empty(columns, dtype=np.float32)
    step = max(1, _BLOCK_FRAMES // (q + 1))
    for c in range(0, columns, step):
        d = min(columns, c + step)
        x = _mono_range(pcm, int(edges[c]), int(edges[d]))
        starts = edges[c:d] - edges[c]
        lo[c:d] = np.minimum.reduceat(x, starts)
        hi[c:d] = np.maximum.reduceat(x, starts)
    return lo, hi


def is_silent(segment: AudioSegment, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """True when no 20 ms window is louder than ``threshold_dbfs``."""
    return bool(np.all(_window_dbfs(segment) < threshold_dbfs))


def speech_bounds(segment: AudioSegment, threshold_dbfs: float = SILENCE_DBFS) -> tuple[float, float]:
    """(start_s, end_s) of the part between leading and trailing silence, with padding."""
    db = _window_dbfs(segment)
    loud = np.flatnonzero(db >= threshold_dbfs)
    duration = len(segment) / 1000.0
    if loud.size == 0:
        return 0.0, 0.0
    start = max(0.0, loud[0] * SILENCE_WINDOW_S - TRIM_PADDING_S)
    end = min(duration, (loud[-1] + 1) * SILENCE_WINDOW_S + TRIM_PADDING_S)
    return start, end


def trim_silence(segment: AudioSegment) -> tuple[AudioSegment, float]:
    """Cut leading and trailing silence; returns (trimmed, seconds removed)."""
    start, end = speech_bounds(segment)
    duration = len(segment) / 1000.0
    removed = start + (duration - end)
    if end <= start or removed < MIN_TRIM_S:
        return segment, 0.0
    trimmed = segment[int(round(start * 1000)) : int(round(end * 1000))]
    return trimmed, round(duration - len(trimmed) / 1000.0, 3)


def write_audio(segment: AudioSegment, dest: str | os.PathLike, fmt: Literal["mp3", "wav"], *, bit_rate: int = MP3_BITRATE) -> Path:
    """Write ``segment`` as MP3 (libmp3lame) or 16-bit WAV through PyAV."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    layout = "mono" if segment.channels == 1 else "stereo"
    rate = segment.frame_rate
    pcm = np.frombuffer(segment.raw_data, dtype=np.int16).reshape(-1, segment.channels)
    if fmt == "mp3" and rate not in _MP3_RATES:
        target = 48000 if rate > 48000 else 44100
    else:
        target = rate
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    codec = "libmp3lame" if fmt == "mp3" else "pcm_s16le"
    try:
        with av.open(str(tmp), "w", format="mp3" if fmt == "mp3" else "wav") as out:
            stream = out.add_stream(codec, rate=target, layout=layout)
            if fmt == "mp3":
                stream.bit_rate = bit_rate
            resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=target)
            step = 4096
            for i in range(0, len(pcm), step):
                block = np.ascontiguousarray(pcm[i : i + step].reshape(1, -1))
                frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
                frame.sample_rate = rate
                frame.pts = None
                for rf in resampler.resample(frame):
                    for packet in stream.encode(rf):
                        out.mux(packet)
            for rf in resampler.resample(None):
                for packet in stream.encode(rf):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def loudness_envelope(path: str | os.PathLike, fps: float) -> np.ndarray:
    """Loudness per video frame: RMS of each 1/fps slice, scaled to 0..1 (loudest frame = 1).

    Slices quieter than :data:`SILENCE_DBFS` are 0, so the mouth stays closed in pauses.
    Length is ceil(duration * fps). A silent file gives all zeros.
    """
    if fps <= 0:
        raise ValueError("fps must be positive")
    seg = decode(path, sample_rate=16000, mono=True, max_s=LONGEST_ALLOWED_S + MAX_TRIMMABLE_S)
    x = mono_samples(seg)
    n_frames = max(1, math.ceil(len(x) / 16000 * fps - 1e-9))
    edges = np.minimum(np.round(np.arange(n_frames + 1) * 16000 / fps).astype(np.int64), len(x))
    env = np.zeros(n_frames, dtype=np.float32)
    sq = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    counts = np.maximum(1, edges[1:] - edges[:-1])
    env[:] = np.sqrt((sq[edges[1:]] - sq[edges[:-1]]) / counts)
    floor = 10 ** (SILENCE_DBFS / 20)
    env[env < floor] = 0.0
    peak = float(env.max())
    if peak > 0:
        env /= peak
    return np.clip(env, 0.0, 1.0)
