"""Decode the voice track once: AAC packets for the MP4 and a loudness value per video frame.

Everything goes through PyAV (there is no ffmpeg binary on the machines we target), and
the whole track is read in one streaming pass, so a 5-minute MP3 never sits in memory as
PCM: only its AAC packets (about 1 MB per minute) and one float per video frame are kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import InputError, JobCancelled

# AAC at 48 kHz plays in every browser, and 48000 is a whole multiple of 24, 25, 30 and 48
# frames per second, so video frames fall on whole audio samples.
AUDIO_RATE = 48_000
# Speech stays clean well below this; about 1 MB per minute of video.
AAC_BITRATE = 128_000
# The native AAC encoder takes exactly this many samples per frame (except the last).
AAC_FRAME_SAMPLES = 1024


@dataclass(frozen=True)
class Soundtrack:
    """The encoded audio of one render and what the animation needs from it."""

    packets: tuple  # av.Packet objects for the output audio stream, in decode order
    duration_s: float
    rms: np.ndarray  # linear RMS (full scale = 1.0) of the mono mix, one value per video frame


def open_audio(path: str | Path) -> tuple[av.container.InputContainer, av.audio.stream.AudioStream]:
    """Open an audio (or video-with-audio) file; InputError if PyAV cannot read it."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(
            f"Could not read the audio file {Path(path).name!r} ({type(exc).__name__}). "
            "Use an MP3, WAV, M4A or AAC file."
        ) from exc
    streams = [s for s in container.streams if s.type == "audio"]
    if not streams:
        container.close()
        raise InputError(f"{Path(path).name!r} has no audio track. Use an MP3, WAV, M4A or AAC file.")
    return container, streams[0]


def output_layout(stream: av.audio.stream.AudioStream) -> str:
    """Mono stays mono; anything with two or more channels becomes stereo."""
    channels = stream.codec_context.channels or 1
    return "mono" if channels == 1 else "stereo"


def encode_soundtrack(
    source: av.container.InputContainer,
    in_stream: av.audio.stream.AudioStream,
    out_stream: av.audio.stream.AudioStream,
    *,
    fps: int,
    cancel: threading.Event | None = None,
) -> Soundtrack:
    """Decode ``in_stream``, encode it with ``out_stream``'s AAC encoder, measure loudness.

    The RMS of frame ``i`` covers samples ``[i / fps, (i + 1) / fps)``. Raises InputError
    when the audio cannot be decoded or holds no samples, JobCancelled when ``cancel`` is set.
    """
    resampler = av.AudioResampler(format="fltp", layout=out_stream.layout.name, rate=AUDIO_RATE)
    fifo = av.AudioFifo()
    packets: list = []
    sums = np.zeros(0, dtype=np.float64)  # sum of squares per video frame
    written = 0  # samples pushed to the encoder
    seen = 0  # samples measured
    samples_per_frame = AUDIO_RATE / fps

    def measure(frame: av.AudioFrame) -> None:
        nonlocal sums, seen
        pcm = frame.to_ndarray()  # (channels, samples) float32 for planar formats
        mono = pcm.mean(axis=0, dtype=np.float64) if pcm.ndim == 2 else pcm.astype(np.float64)
        n = mono.shape[0]
        idx = (np.arange(seen, seen + n, dtype=np.int64) * fps) // AUDIO_RATE
        need = int(idx[-1]) + 1
        if need > sums.shape[0]:
            sums = np.concatenate([sums, np.zeros(need - sums.shape[0] + 256)])
        sums[: need] += np.bincount(idx, weights=mono * mono, minlength=need)[:need]
        seen += n

    def drain(final: bool) -> None:
        nonlocal written
        while fifo.samples >= AAC_FRAME_SAMPLES or (final and fifo.samples > 0):
            chunk = fifo.read(min(AAC_FRAME_SAMPLES, fifo.samples))
            chunk.pts = written
            chunk.time_base = Fraction(1, AUDIO_RATE)
            written += chunk.samples
            packets.extend(out_stream.encode(chunk))

    def push(frames) -> None:
        for frame in frames:
            frame.pts = None  # the fifo re-times everything from zero
            measure(frame)
            fifo.write(frame)
        drain(final=False)

    try:
        for frame in source.decode(in_stream):
            if cancel is not None and cancel.is_set():
                raise JobCancelled("The local preview was cancelled.")
            push(resampler.resample(frame))
        push(resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise InputError(
            f"The audio file could not be decoded ({type(exc).__name__}). Use an MP3, WAV, M4A or AAC file."
        ) from exc
    drain(final=True)
    packets.extend(out_stream.encode(None))
    if seen == 0:
        raise InputError("The audio file holds no sound samples. Use a voice recording of at least 2 seconds.")

    duration = seen / AUDIO_RATE
    n_frames = max(1, round(duration * fps))
    counts = np.full(n_frames, samples_per_frame)
    # The last frame may cover fewer samples than the others.
    counts[-1] = max(1.0, seen - (n_frames - 1) * samples_per_frame)
    padded = np.zeros(n_frames)
    m = min(n_frames, sums.shape[0])
    padded[:m] = sums[:m]
    rms = np.sqrt(np.maximum(padded, 0.0) / counts).astype(np.float32)
    return Soundtrack(packets=tuple(packets), duration_s=duration, rms=rms)
