"""A realistic input corpus, made on the spot: real photos in every format users send, and
real speech (espeak-ng) in every container and codec users record.

Nothing is downloaded. The faces are photographs scikit-image ships: the astronaut (Eileen
Collins, public domain) and the Labeled Faces in the Wild subset; the cat (``chelsea``) is
a real photo without a human face. Speech is synthesised once per session by Debian's
espeak-ng from a long text, then cut to each length and encoded with PyAV.

``IMAGE_CLASSES`` and ``AUDIO_FORMATS`` name the classes; :class:`Corpus` builds each file
on first use and caches it (tests get it through the ``corpus`` fixture in conftest.py).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

# -------------------------------------------------------------------------- speech

# About 130 distinct words a paragraph; repeated until the recording is long enough.
SPEECH_TEXT = """
Hello, and thank you for watching. My name is Alex, and today I want to tell you about
our new community garden. Last spring a group of neighbours cleared the empty lot behind
the library. We planted tomatoes, beans, lettuce and a row of sunflowers along the fence.
Every Saturday morning somebody brings coffee, and we work for two or three hours.

The children learn where food comes from. They water the beds, they count the bees, and
they argue about whose pumpkin is the biggest. Older neighbours teach us how to save
seeds and how to keep slugs away without poison. Nobody needs any experience to join.

If you would like to help, come by on any Saturday from nine o'clock. Bring gloves if you
have them. We also need people who can fix the water pipe, build a small shed for the
tools, and write a short newsletter once a month. Thank you, and see you in the garden.

Here is what happened this week. On Monday it rained, so the beans grew almost a hand
taller. On Wednesday we picked the first ripe tomatoes and shared them with the school.
On Friday a reporter from the local radio station visited and asked many good questions.
"""
SPEECH_WPM = 160  # espeak-ng words per minute: a calm, clear speaker
SPEECH_VOICE = "en-us"
SPEECH_MASTER_S = 305.0  # the longest clip (300 s) plus a little
ESPEAK_RATE = 22050  # what espeak-ng writes: 22.05 kHz mono 16-bit
# A phone in a quiet room: the pauses are not digital silence but a faint noise floor (-66 dBFS).
ROOM_NOISE = 0.0005

# Name -> (container, codec, sample rate, channels, muxer options): what real recordings are.
AUDIO_FORMATS: dict[str, tuple[str, str, int, int, dict]] = {
    "mp3": ("mp3", "libmp3lame", 44100, 2, {}),  # an exported podcast clip
    "m4a": ("ipod", "aac", 48000, 1, {}),  # iPhone Voice Memos (AAC in MP4)
    "ogg": ("ogg", "libopus", 48000, 1, {}),  # a messenger voice note (Opus in Ogg)
    # A browser microphone (MediaRecorder): 48 kHz Opus in WebM, written live, so the header
    # holds no duration and no cues, exactly like Chrome's and Firefox's recordings.
    "webm": ("webm", "libopus", 48000, 1, {"live": "1"}),
    "flac": ("flac", "flac", 44100, 2, {}),
    "wav8k": ("wav", "pcm_s16le", 8000, 1, {}),  # telephone quality
    "wav48k24": ("wav", "pcm_s24le", 48000, 2, {}),  # a studio recorder: 24-bit stereo
}
AUDIO_SUFFIX = {"mp3": ".mp3", "m4a": ".m4a", "ogg": ".ogg", "webm": ".webm", "flac": ".flac",
                "wav8k": ".wav", "wav48k24": ".wav"}


def espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def require_espeak() -> str:
    """espeak-ng's path; under CI (CI=true) its absence fails the test, locally it skips."""
    path = espeak_path()
    if path is None:
        message = "espeak-ng is not installed (apt-get install espeak-ng); the speech corpus needs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def synthesise_speech(dest: Path, seconds: float = SPEECH_MASTER_S) -> np.ndarray:
    """At least ``seconds`` of espeak-ng speech as int16 mono at ESPEAK_RATE; also kept at ``dest``."""
    exe = require_espeak()
    words = len(SPEECH_TEXT.split())
    repeats = int(np.ceil(seconds / (words / SPEECH_WPM * 60))) + 1
    text = dest.with_suffix(".txt")
    text.write_text(SPEECH_TEXT * repeats)
    subprocess.run([exe, "-v", SPEECH_VOICE, "-s", str(SPEECH_WPM), "-w", str(dest), "-f", str(text)],
                   check=True, capture_output=True, timeout=120)
    with av.open(str(dest)) as c:
        stream = c.streams.audio[0]
        assert stream.codec_context.sample_rate == ESPEAK_RATE and stream.codec_context.channels == 1
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(stream)]).astype(np.int16)
    if len(pcm) < seconds * ESPEAK_RATE:
        raise AssertionError(f"espeak-ng spoke only {len(pcm) / ESPEAK_RATE:.0f} s of the text")
    return pcm


def cut(pcm: np.ndarray, seconds: float) -> np.ndarray:
    """The first ``seconds`` of ``pcm`` with a 20 ms fade-out and the room's noise floor added."""
    n = int(round(seconds * ESPEAK_RATE))
    x = pcm[:n].astype(np.float64) / 32768.0
    fade = int(0.02 * ESPEAK_RATE)
    x[-fade:] *= np.linspace(1.0, 0.0, fade)
    x += np.random.default_rng(int(seconds)).normal(0.0, ROOM_NOISE, n)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def encode_audio(dest: Path, fmt: str, pcm: np.ndarray, rate: int = ESPEAK_RATE) -> Path:
    """Encode int16 mono ``pcm`` as ``fmt`` (a key of AUDIO_FORMATS) with PyAV."""
    container_fmt, codec, out_rate, channels, options = AUDIO_FORMATS[fmt]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(dest), "w", format=container_fmt, options=options) as out:
        stream = out.add_stream(codec, rate=out_rate, layout=layout)
        if codec == "libmp3lame":
            stream.bit_rate = 128_000
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=out_rate)
        for i in range(0, len(pcm), 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, i : i + 4096]), format="s16", layout="mono")
            frame.sample_rate = rate
            for rf in resampler.resample(frame):
                for p in stream.encode(rf):
                    out.mux(p)
        for rf in resampler.resample(None):
            for p in stream.encode(rf):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return dest


# -------------------------------------------------------------------------- images


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def astronaut_portrait() -> Image.Image:
    """A 600 x 800 portrait crop of the astronaut (not square, so a rotation shows in the size)."""
    big = astronaut().resize((800, 800), Image.Resampling.LANCZOS)
    return big.crop((50, 0, 650, 800))


def lfw_face(index: int, side: int) -> Image.Image:
    """One of the LFW subset's real faces (25 x 25 px, gray), enlarged to ``side`` px."""
    from skimage import data

    face = (data.lfw_subset()[index] * 255).round().astype(np.uint8)
    return Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)


# EXIF orientation -> how the stored pixels are turned from upright (exif_transpose undoes it).
_STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def exif_rotated_jpeg(dest: Path, orientation: int) -> Path:
    """The upright portrait stored turned, with the EXIF tag that turns it back (as cameras do)."""
    upright = astronaut_portrait()
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(_STORED_TURN[orientation]).save(dest, "JPEG", quality=92, exif=exif.tobytes())
    with Image.open(dest) as check:  # the builder proves its own file: upright once the tag is applied
        shown = np.asarray(ImageOps.exif_transpose(check), dtype=np.float32)
    assert shown.shape == np.asarray(upright).shape
    assert np.abs(shown - np.asarray(upright, dtype=np.float32)).mean() < 6
    return dest


def png_with_alpha(dest: Path) -> Path:
    """A cut-out portrait: the astronaut inside an opaque ellipse, transparent around it."""
    im = astronaut().convert("RGBA")
    mask = Image.new("L", im.size, 0)
    ImageDraw.Draw(mask).ellipse((60, 10, 400, 500), fill=255)
    im.putalpha(mask)
    im.save(dest, "PNG")
    return dest


def png_rgb48(dest: Path, image: Image.Image) -> Path:
    """A 16-bit-per-channel RGB PNG (what Lightroom or a RAW converter exports); Pillow cannot
    write these, so the chunks are written by hand."""
    arr = (np.asarray(image.convert("RGB"), dtype=np.uint16) * 257).astype(">u2")  # 0..255 -> 0..65535
    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    dest.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 6))
                     + chunk(b"IEND", b""))
    return dest


def png_gray16(dest: Path) -> Path:
    """A 16-bit grayscale PNG of a real face (a scanned black-and-white photo)."""
    face = np.asarray(lfw_face(0, 400), dtype=np.uint16) * 257
    Image.fromarray(face.astype(np.uint16)).save(dest, "PNG")  # mode I;16
    return dest


def group_photo(dest: Path) -> Path:
    """Three real faces side by side (a group photo)."""
    canvas = Image.new("L", (900, 420), 120)
    for i, index in enumerate((0, 5, 10)):
        canvas.paste(lfw_face(index, 260), (30 + i * 290, 80))
    canvas.convert("RGB").save(dest, "JPEG", quality=90)
    return dest


def photo_24mp(dest: Path) -> Path:
    """6000 x 4000 (24 MP, a current phone's full resolution), with sensor noise as real photos
    have, saved at quality 95: a file of well over 10 MB."""
    big = astronaut().resize((6000, 6000), Image.Resampling.BICUBIC).crop((0, 0, 6000, 4000))
    arr = np.asarray(big, dtype=np.int16)
    rng = np.random.default_rng(24)
    arr = np.clip(arr + rng.normal(0, 9, arr.shape[:2])[..., None].astype(np.int16), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(dest, "JPEG", quality=95)
    return dest


def heic(dest: Path) -> Path:
    """The portrait as an iPhone saves it: HEIC (HEVC in HEIF), written by pillow-heif."""
    from pillow_heif import from_pillow

    from_pillow(astronaut_portrait()).save(str(dest), quality=80)
    return dest


@dataclass(frozen=True)
class ImageClass:
    """One kind of photo users send, and what the app must make of it."""

    name: str
    filename: str
    faces: int | None  # faces the check must find (None: the image is refused)
    upright: str = "astronaut"  # what the checked picture must look like: "astronaut", "portrait" or ""
    refused: tuple[str, ...] = ()  # words of the refusal a user reads


IMAGE_CLASSES = [
    ImageClass("jpeg", "astronaut.jpg", 1),
    ImageClass("exif3", "exif3.jpg", 1, "portrait"),
    ImageClass("exif6", "exif6.jpg", 1, "portrait"),
    ImageClass("exif8", "exif8.jpg", 1, "portrait"),
    ImageClass("png_alpha", "cutout.png", 1, ""),
    ImageClass("webp", "astronaut.webp", 1),
    ImageClass("png16_rgb", "astronaut-48bit.png", 1),
    ImageClass("png16_gray", "scan-16bit.png", 1, ""),
    ImageClass("cmyk", "astronaut-cmyk.jpg", 1),
    ImageClass("24mp", "phone-24mp.jpg", 1, ""),
    ImageClass("heic", "portrait.heic", 1, "portrait"),
    ImageClass("cat", "chelsea.jpg", 0, ""),
    ImageClass("group", "group.jpg", 3, ""),
    ImageClass("tiny_face", "lfw-25px.png", None, "", ("too small (25 x 25 px)", "use a larger photo")),
    ImageClass("panorama", "rocket-panorama.jpg", None, "", ("too wide (1800 x 450 px", "crop it closer to the face")),
]
IMAGES = {c.name: c for c in IMAGE_CLASSES}


def build_image(name: str, dest: Path) -> Path:
    """Write the image class ``name`` to ``dest``."""
    from skimage import data

    if name == "jpeg":
        astronaut().save(dest, "JPEG", quality=92)
    elif name.startswith("exif"):
        exif_rotated_jpeg(dest, int(name[4:]))
    elif name == "png_alpha":
        png_with_alpha(dest)
    elif name == "webp":
        astronaut().save(dest, "WEBP", quality=85)
    elif name == "png16_rgb":
        png_rgb48(dest, astronaut())
    elif name == "png16_gray":
        png_gray16(dest)
    elif name == "cmyk":
        astronaut().convert("CMYK").save(dest, "JPEG", quality=92)
    elif name == "24mp":
        photo_24mp(dest)
    elif name == "heic":
        heic(dest)
    elif name == "cat":
        Image.fromarray(data.chelsea()).save(dest, "JPEG", quality=90)
    elif name == "group":
        group_photo(dest)
    elif name == "tiny_face":
        Image.fromarray((data.lfw_subset()[3] * 255).astype(np.uint8)).save(dest, "PNG")
    elif name == "panorama":
        Image.fromarray(data.rocket()).resize((1800, 1200)).crop((0, 375, 1800, 825)).save(dest, "JPEG", quality=90)
    else:
        raise KeyError(name)
    return dest


# -------------------------------------------------------------------------- the cache


class Corpus:
    """Builds each corpus file on first use, in one folder for the whole test session."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._speech: np.ndarray | None = None

    def image(self, name: str) -> Path:
        dest = self.root / IMAGES[name].filename
        if not dest.exists():
            build_image(name, dest)
        return dest

    def master_speech(self) -> np.ndarray:
        if self._speech is None:
            self._speech = synthesise_speech(self.root / "espeak-master.wav")
        return self._speech

    def speech(self, seconds: float, fmt: str) -> Path:
        """``seconds`` of real speech as ``fmt`` (a key of AUDIO_FORMATS)."""
        dest = self.root / f"speech-{seconds:g}s-{fmt}{AUDIO_SUFFIX[fmt]}"
        if not dest.exists():
            tmp = dest.with_name(".tmp-" + dest.name)
            encode_audio(tmp, fmt, cut(self.master_speech(), seconds))
            os.replace(tmp, dest)
        return dest
