"""The voice track of a render: its loudness per video frame, then its AAC packets, streamed.

Everything goes through PyAV (there is no ffmpeg binary on the machines we target). The
track is read twice, each time in one streaming pass: :func:`measure_loudness` keeps one
float per video frame (the animation needs the whole clip's loudness before the first
frame, to scale the mouth to the loudest speech), and :func:`aac_packets` encodes AAC
lazily while the caller muxes video, so no packet is held longer than it takes to reach
the file. A 5-minute clip costs the same memory as a 5-second one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from collections.abc import Iterator

import av
import numpy as np

from ..errors import InputError, JobCancelled
from ..media.audio import AUDIO_LIMITS

# AAC at 48 kHz plays in every browser, and 48000 is a whole multiple of 24, 25, 30 and 48
# frames per second, so video frames fall on whole audio samples.
AUDIO_RATE = 48_000
# Speech stays clean well below this; about 1 MB per minute of video.
AAC_BITRATE = 128_000
# The native AAC encoder takes exactly this many samples per frame (except the last).
AAC_FRAME_SAMPLES = 1024
# Loudness is measured on a mono mix at this rate: plenty for a jaw's envelope, and a
# third of the work of measuring at 48 kHz.
MEASURE_RATE = 16_000

_UNREADABLE = "Use an MP3, WAV, M4A or AAC file."
# The longest voice a render reads: the longest any provider accepts, plus encoder padding.
# Reading stops here whatever the file's header claims (a header may say 5 s of an hour).
MAX_RENDER_S = AUDIO_LIMITS["local"].max_s
_MAX_RENDER_SLACK_S = 0.5


@dataclass(frozen=True)
class Loudness:
    """What the animation needs from the voice: its length and RMS per video frame."""

    duration_s: float
    rms: np.ndarray  # linear RMS (full scale = 1.0) of the mono mix, one value per video frame

    @property
    def frames(self) -> int:
        return int(self.rms.shape[0])


def open_audio(path: str | Path) -> tuple[av.container.InputContainer, av.audio.stream.AudioStream]:
    """Open an audio (or video-with-audio) file; InputError if PyAV cannot read it."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(
            f"Could not read the audio file {Path(path).name!r} ({type(exc).__name__}). {_UNREADABLE}"
        ) from exc
    streams = [s for s in container.streams if s.type == "audio"]
    if not streams:
        container.close()
        raise InputError(f"{Path(path).name!r} has no audio track. {_UNREADABLE}")
    return container, streams[0]


def output_layout(stream: av.audio.stream.AudioStream) -> str:
    """Mono stays mono; anything with two or more channels becomes stereo."""
    channels = stream.codec_context.channels or 1
    return "mono" if channels == 1 else "stereo"


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("The local preview was cancelled.")


def _decoded(source: av.container.InputContainer, stream: av.audio.stream.AudioStream,
             resampler: av.AudioResampler, cancel: threading.Event | None) -> Iterator[av.AudioFrame]:
    """Every frame of ``stream`` through ``resampler``, flushed at the end."""
    try:
        for frame in source.decode(stream):
            _check(cancel)
            frame.pts = None  # the resampler re-times everything from zero
            yield from resampler.resample(frame)
        yield from resampler.resample(None)
    except av.error.FFmpegError as exc:
        raise InputError(f"The audio file could not be decoded ({type(exc).__name__}). {_UNREADABLE}") from exc


def measure_loudness(path: str | Path, *, fps: int, cancel: threading.Event | None = None,
                     max_s: float = MAX_RENDER_S) -> Loudness:
    """One streaming pass over ``path``: its duration and the RMS of each 1/fps slice.

    The RMS of frame ``i`` covers ``[i / fps, (i + 1) / fps)``; the video has
    ``round(duration * fps)`` frames (at least one). Raises InputError when the audio
    cannot be decoded, holds no samples or goes on past ``max_s`` seconds (reading stops
    there), JobCancelled when ``cancel`` is set.
    """
    source, stream = open_audio(path)
    sums = np.zeros(4096, dtype=np.float64)  # sum of squares per video frame, grown as needed
    seen = 0
    most = int((max_s + _MAX_RENDER_SLACK_S) * MEASURE_RATE)
    try:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=MEASURE_RATE)
        for frame in _decoded(source, stream, resampler, cancel):
            mono = frame.to_ndarray().reshape(-1).astype(np.float64)
            if mono.size == 0:
                continue
            idx = (np.arange(seen, seen + mono.size, dtype=np.int64) * fps) // MEASURE_RATE
            need = int(idx[-1]) + 1
            if need > sums.shape[0]:
                sums = np.concatenate([sums, np.zeros(max(need - sums.shape[0], sums.shape[0]))])
            sums[:need] += np.bincount(idx, weights=mono * mono, minlength=need)[:need]
            seen += mono.size
            if seen > most:
                raise InputError(
                    f"The audio is longer than {max_s:g} s; the local preview renders at most {max_s:g} s. "
                    "Cut it into shorter parts."
                )
    finally:
        source.close()
    if seen == 0:
        raise InputError("The audio file holds no sound samples. Use a voice recording of at least 2 seconds.")
    duration = seen / MEASURE_RATE
    n_frames = max(1, round(duration * fps))
    per_frame = MEASURE_RATE / fps
    counts = np.full(n_frames, per_frame)
    counts[-1] = max(1.0, seen - (n_frames - 1) * per_frame)  # the last frame may be short
    padded = np.zeros(n_frames)
    m = min(n_frames, sums.shape[0])
    padded[:m] = sums[:m]
    rms = np.sqrt(np.maximum(padded, 0.0) / counts).astype(np.float32)
    return Loudness(duration_s=duration, rms=rms)


def aac_packets(path: str | Path, out_stream: av.audio.stream.AudioStream, *,
                cancel: threading.Event | None = None) -> Iterator[av.Packet]:
    """Decode ``path`` again and yield ``out_stream``'s AAC packets in order, lazily.

    Frames are re-timed from zero in samples at :data:`AUDIO_RATE`, so the packets line up
    with video frame ``i`` at ``i / fps`` whatever the source's own timestamps were.
    """
    source, stream = open_audio(path)
    fifo = av.AudioFifo()
    written = 0
    rate = Fraction(1, AUDIO_RATE)

    def drain(final: bool) -> Iterator[av.Packet]:
        nonlocal written
        while fifo.samples >= AAC_FRAME_SAMPLES or (final and fifo.samples > 0):
            chunk = fifo.read(min(AAC_FRAME_SAMPLES, fifo.samples))
            chunk.pts, chunk.time_base = written, rate
            written += chunk.samples
            yield from out_stream.encode(chunk)

    try:
        resampler = av.AudioResampler(format="fltp", layout=out_stream.layout.name, rate=AUDIO_RATE)
        for frame in _decoded(source, stream, resampler, cancel):
            fifo.write(frame)
            yield from drain(final=False)
        yield from drain(final=True)
        yield from out_stream.encode(None)
    finally:
        source.close()
