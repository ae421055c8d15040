"""Result videos for emulated jobs: the makers, and a render cache shared by all emulators.

A *video maker* is ``callable(image_path, audio_path, out_path, tier) -> None`` that writes
an MP4 (H.264 + AAC) as long as the audio. The default is the project's local renderer
(:func:`render_video_maker`); :func:`tone_video_maker` is a cheap stand-in (a tiny
solid-colour picture over the audio) for benchmarks and protocol tests.

Renders are cached by (maker, image sha256, audio sha256, tier) for the life of the
process, so repeated tests with the same inputs pay once.
"""

from __future__ import annotations

import hashlib
import mimetypes
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar
from collections.abc import Callable

PathLike = str | Path
VideoMaker = Callable[[Path, Path, Path, str], None]

# Two workers for two cores: one slow real render does not hold up cheap ones.
_RENDER_WORKERS = 2

# The stand-in video: small and slow-moving, so encoding costs almost nothing.
TONE_SIZE = (64, 64)
TONE_FPS = 10
# The result's sound is at 44.1 or 48 kHz, as the hosted models deliver it; lower input
# rates are resampled to 44.1 kHz. (AAC at a voice's 8 kHz would also be a wrong stand-in
# in length: its 1024 priming samples alone decode as 0.128 s more than the voice.)
_RESULT_RATES = (44100, 48000)


def render_video_maker(image_path: Path, audio_path: Path, out_path: Path, tier: str) -> None:
    """The real local renderer (``avatar_core.render.render_video``) as a video maker."""
    from avatar_core.render import render_video

    render_video(image_path, audio_path, out_path, tier=tier)


def default_video_maker() -> VideoMaker:
    """The local renderer when it is installed in this tree, else the cheap tone video."""
    try:
        from avatar_core.render import render_video  # noqa: F401
    except ImportError:
        return tone_video_maker
    return render_video_maker


def _image_colour(image_path: Path) -> tuple[int, int, int]:
    try:
        from PIL import Image

        with Image.open(image_path) as img:
            r, g, b = img.convert("RGB").resize((1, 1)).getpixel((0, 0))
            return int(r), int(g), int(b)
    except Exception:  # any readable-or-not input still gets a video
        return (96, 96, 96)


def tone_video_maker(image_path: PathLike, audio_path: PathLike, out_path: PathLike, tier: str = "standard") -> None:
    """A tiny H.264 + AAC MP4 exactly as long as the audio (via PyAV), index first.

    The picture is the image's average colour, so different inputs give different files,
    with a dark bar sweeping across it every 0.7 s: a result that moves, as a real one
    does, so tests can check that a downloaded video plays as a moving picture.
    """
    import av
    import numpy as np

    colour = _image_colour(Path(image_path))
    with av.open(str(audio_path)) as src:
        stream = src.streams.audio[0]
        rate = stream.rate if stream.rate in _RESULT_RATES else 44100
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        chunks = []
        for frame in src.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    pcm = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), dtype=np.float32)
    duration = pcm.shape[1] / rate

    with av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as dst:
        vstream = dst.add_stream("libx264", rate=TONE_FPS, options={"preset": "ultrafast"})
        vstream.width, vstream.height = TONE_SIZE
        vstream.pix_fmt = "yuv420p"
        astream = dst.add_stream("aac", rate=rate, layout="mono")
        still = np.empty((TONE_SIZE[1], TONE_SIZE[0], 3), dtype=np.uint8)
        still[:] = colour
        sweep = 7  # frames per sweep: not a whole second, so frames 1 s apart differ
        bar = max(1, TONE_SIZE[0] // sweep)
        n_frames = max(1, round(duration * TONE_FPS))
        for i in range(n_frames):
            picture = still.copy()
            x = (i % sweep) * bar
            picture[:, x : x + bar] = picture[:, x : x + bar] // 3
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, TONE_FPS)
            for packet in vstream.encode(frame):
                dst.mux(packet)
        for packet in vstream.encode(None):
            dst.mux(packet)
        step = 1024 * 8
        for start in range(0, pcm.shape[1], step):
            block = np.ascontiguousarray(pcm[:, start : start + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in astream.encode(frame):
                dst.mux(packet)
        for packet in astream.encode(None):
            dst.mux(packet)


def _suffix(mime: str, default: str) -> str:
    return mimetypes.guess_extension(mime or "") or default


class VideoCache:
    """Renders result videos in the background, once per distinct input.

    The store is process-wide (class attributes), so separate emulators in one test run
    share renders; each instance is only a handle on it.
    """

    _lock = threading.Lock()
    _futures: ClassVar[dict[Any, Future]] = {}
    _executor: ThreadPoolExecutor | None = None
    _dir: Path | None = None

    @classmethod
    def _workdir(cls) -> Path:
        if cls._dir is None:
            cls._dir = Path(tempfile.mkdtemp(prefix="avatar-emulator-"))
        return cls._dir

    def request(self, maker: VideoMaker, image: tuple[bytes, str], audio: tuple[bytes, str], tier: str) -> Any:
        """Start (or reuse) the render of these inputs; returns the key to :meth:`wait` on."""
        image_sha = hashlib.sha256(image[0]).hexdigest()
        audio_sha = hashlib.sha256(audio[0]).hexdigest()
        key = (maker, image_sha, audio_sha, tier)
        with self._lock:
            future = self._futures.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                return key
            workdir = self._workdir()
            image_path = workdir / f"in-{image_sha[:20]}{_suffix(image[1], '.img')}"
            audio_path = workdir / f"in-{audio_sha[:20]}{_suffix(audio[1], '.audio')}"
            for path, data in ((image_path, image[0]), (audio_path, audio[0])):
                if not path.exists():
                    path.write_bytes(data)
            out_path = workdir / f"out-{id(maker):x}-{image_sha[:12]}-{audio_sha[:12]}-{tier}.mp4"
            if VideoCache._executor is None:
                VideoCache._executor = ThreadPoolExecutor(_RENDER_WORKERS, thread_name_prefix="emulator-render")
            self._futures[key] = VideoCache._executor.submit(_render, maker, image_path, audio_path, out_path, tier)
        return key

    def wait(self, key: Any, timeout: float) -> Path:
        """The rendered file; raises TimeoutError, or the renderer's own exception."""
        with self._lock:
            future = self._futures[key]
        return future.result(timeout=timeout)  # concurrent.futures.TimeoutError is TimeoutError


def _render(maker: VideoMaker, image_path: Path, audio_path: Path, out_path: Path, tier: str) -> Path:
    tmp = out_path.with_suffix(".part.mp4")
    maker(image_path, audio_path, tmp, tier)
    tmp.replace(out_path)
    return out_path
