"""Synthesise test media (images, tones, silence, videos) with Pillow and PyAV only.

Every function writes one file at ``path`` and returns ``path`` as a ``Path``. They are
deliberately simple so any test can import them:

    make_image(path, "JPEG", (400, 600), exif_orientation=6)
    make_portrait(path, "PNG")                      # real face (skimage astronaut)
    make_tone(path, "mp3", 3.0)                     # 3 s of 440 Hz
    make_silence(path, "wav", 3.0)
    make_speechlike(path, "wav", lead_s=2, speech_s=3, tail_s=2)
    make_video_with_audio(path, 3.0)                # MP4, H.264 + AAC
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

# Container/codec per audio format name: (container format, codec, extra codec options).
AUDIO_FORMATS = {
    "mp3": ("mp3", "libmp3lame"),
    "wav": ("wav", "pcm_s16le"),
    "m4a": ("ipod", "aac"),  # MP4 audio (.m4a)
    "aac": ("adts", "aac"),  # raw ADTS stream (.aac)
    "ogg": ("ogg", "libopus"),
    "oga": ("ogg", "vorbis"),  # Ogg Vorbis (PyAV's native, "experimental" encoder)
    "flac": ("flac", "flac"),
    "webm": ("webm", "libopus"),
}
_OPUS_RATE = 48000  # Opus encodes only at 8/12/16/24/48 kHz


def make_image(
    path: str | os.PathLike,
    fmt: str = "JPEG",
    size: tuple[int, int] = (512, 640),
    *,
    exif_orientation: int | None = None,
    mode: str = "RGB",
    color: tuple[int, int, int] = (200, 180, 160),
    frames: int = 1,
) -> Path:
    """A flat drawing (no face) of ``size`` px stored in ``fmt`` (a Pillow format name).

    The top-left quarter is red so tests can see where it ends up after a rotation.
    ``exif_orientation`` writes that EXIF Orientation tag (JPEG/PNG/WebP/TIFF).
    ``frames`` > 1 makes an animated GIF/WebP whose later frames are blue.
    """
    path = Path(path)
    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, size[0] // 2 - 1, size[1] // 2 - 1), fill=(255, 0, 0))
    draw.ellipse((size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2), outline=(0, 0, 0), width=3)
    if mode != "RGB":
        img = img.convert(mode)
    kwargs: dict = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if frames > 1:
        others = [Image.new(img.mode, size, (0, 0, 255)) for _ in range(frames - 1)]
        kwargs.update(save_all=True, append_images=others, duration=100, loop=0)
    img.save(path, fmt, **kwargs)
    return path


def make_portrait(path: str | os.PathLike, fmt: str = "JPEG", scale: float = 1.0,
                  size: tuple[int, int] | None = None) -> Path:
    """The scikit-image astronaut photo (one real face, public domain), optionally scaled.

    With ``size`` the photo is fitted (aspect kept) onto a grey canvas of exactly that size,
    so a test that needs a picture of given dimensions still has a face in it.
    """
    from skimage import data

    img = Image.fromarray(data.astronaut())
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    if size is not None:
        fit = min(size[0] / img.width, size[1] / img.height)
        photo = img.resize((max(1, round(img.width * fit)), max(1, round(img.height * fit))), Image.Resampling.LANCZOS)
        img = Image.new("RGB", size, (128, 128, 128))
        img.paste(photo, ((size[0] - photo.width) // 2, (size[1] - photo.height) // 2))
    img.save(path, fmt)
    return Path(path)


def make_noise_image(path: str | os.PathLike, size: tuple[int, int], fmt: str = "JPEG", quality: int = 100) -> Path:
    """Random pixels: incompressible, for testing the size limit with a real photo-sized file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt, quality=quality)
    return Path(path)


def make_png_bomb(path: str | os.PathLike, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return Path(path)


def _write_audio(path: Path, fmt: str, pcm: np.ndarray, sample_rate: int) -> Path:
    """Encode int16 PCM of shape (n, channels) into ``fmt`` (a key of AUDIO_FORMATS)."""
    container_fmt, codec = AUDIO_FORMATS[fmt]
    if codec == "vorbis" and pcm.shape[1] == 1:
        pcm = np.repeat(pcm, 2, axis=1)  # FFmpeg's own Vorbis encoder only does stereo
    channels = pcm.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    rate = _OPUS_RATE if codec == "libopus" else sample_rate
    with av.open(str(path), "w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.options = {"strict": "experimental"}
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        for i in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[i : i + 4096].reshape(1, -1)), format="s16", layout=layout)
            frame.sample_rate = sample_rate
            for rf in resampler.resample(frame):
                for p in stream.encode(rf):
                    out.mux(p)
        for rf in resampler.resample(None):
            for p in stream.encode(rf):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return path


def tone_pcm(seconds: float, *, freq: float = 440.0, sample_rate: int = 16000, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """int16 samples (n, channels) of a sine tone."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    x = (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype(np.int16)
    return np.repeat(x[:, None], channels, axis=1)


def make_tone(
    path: str | os.PathLike,
    fmt: str = "wav",
    seconds: float = 3.0,
    *,
    freq: float = 440.0,
    sample_rate: int = 16000,
    channels: int = 1,
    amplitude: float = 0.5,
) -> Path:
    """A sine tone in ``fmt`` (mp3, wav, m4a, aac, ogg, oga, flac, webm)."""
    pcm = tone_pcm(seconds, freq=freq, sample_rate=sample_rate, channels=channels, amplitude=amplitude)
    return _write_audio(Path(path), fmt, pcm, sample_rate)


def make_silence(path: str | os.PathLike, fmt: str = "wav", seconds: float = 3.0, *, sample_rate: int = 16000) -> Path:
    """Digital silence (all zero samples) in ``fmt``."""
    return _write_audio(Path(path), fmt, np.zeros((int(seconds * sample_rate), 1), np.int16), sample_rate)


def make_speechlike(
    path: str | os.PathLike,
    fmt: str = "wav",
    *,
    lead_s: float = 1.0,
    speech_s: float = 3.0,
    tail_s: float = 1.0,
    sample_rate: int = 16000,
) -> Path:
    """Silence, then a tone warbling in loudness 4x a second (like syllables), then silence."""
    t = np.arange(int(speech_s * sample_rate)) / sample_rate
    voice = np.sin(2 * np.pi * 220 * t) * (0.3 + 0.3 * np.abs(np.sin(2 * np.pi * 2 * t)))
    x = np.concatenate([np.zeros(int(lead_s * sample_rate)), voice, np.zeros(int(tail_s * sample_rate))])
    return _write_audio(Path(path), fmt, (x * 32767).astype(np.int16)[:, None], sample_rate)


def make_video_with_audio(
    path: str | os.PathLike, seconds: float = 3.0, *, size: tuple[int, int] = (160, 120), fps: int = 10, audio: bool = True
) -> Path:
    """An MP4 with an H.264 video track and (unless ``audio=False``) an AAC 440 Hz track."""
    path = Path(path)
    sr = 16000
    with av.open(str(path), "w", format="mp4") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        v.options = {"preset": "ultrafast"}
        a = out.add_stream("aac", rate=sr, layout="mono") if audio else None
        for i in range(int(seconds * fps)):
            arr = np.full((size[1], size[0], 3), (i * 20) % 255, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        if a is not None:
            pcm = tone_pcm(seconds, sample_rate=sr)[:, 0]
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr)
            for i in range(0, len(pcm), 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, i : i + 1024].copy(), format="s16", layout="mono")
                frame.sample_rate = sr
                for rf in resampler.resample(frame):
                    for p in a.encode(rf):
                        out.mux(p)
            for p in a.encode(None):
                out.mux(p)
    return path


# ------------------------------------------------------------------ a loopback web server

class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving ``routes``; use as a context manager.

    ``routes`` maps a path to ``(status, headers, body)`` or to a callable
    ``handler(request_handler) -> None`` that writes the whole response itself (for
    slow or endless bodies). ``url(path)`` gives the full URL; ``hits`` lists paths asked for.
    """

    def __init__(self, routes: dict):
        import http.server
        import threading

        self.routes = routes
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.hits.append(self.path)
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    route = (404, {}, b"not found")
                if callable(route):
                    try:
                        route(self)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class QuietServer(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is expected
                    super().handle_error(request, client_address)

        self._httpd = QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
