"""Regenerate the bundled examples: a drawn portrait and a synthesised voice clip.

Both are made here, by the project, so they carry no third-party rights:

* ``examples/portrait.jpg`` - a shaded face drawn with Pillow. It is drawn with the light
  and dark regions a face detector looks for (dark eye sockets and brows, a lit nose
  bridge, darker lips) so the app's face check finds it.
* ``examples/voice.mp3`` - a short sentence spoken by ``espeak-ng`` (needed only to
  regenerate; the committed file is used at runtime), encoded with PyAV as small mono MP3.

Run ``python scripts/make_examples.py``; it prints what it wrote and whether a face was
found. The output is deterministic for a given Pillow/espeak-ng version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# 3:4 portrait, 720 px wide: above every provider's minimum side (300 px) and small
# enough (~60 kB as JPEG) to keep in git.
WIDTH, HEIGHT = 720, 960
SENTENCE = "Hello! This short clip was made for the avatar demo. Upload your own voice to try it."
# Mono 22.05 kHz at 48 kbit/s is plenty for speech and keeps the clip near 30 kB.
AUDIO_RATE = 22050
AUDIO_BITRATE = 48_000


def _radial(w: int, h: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """1 at (cx, cy) falling to 0 at the ellipse (rx, ry); used for soft shading."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip(1.0 - d, 0.0, 1.0)


def _blend(base: Image.Image, colour: tuple[int, int, int], mask: Image.Image) -> Image.Image:
    return Image.composite(Image.new("RGB", base.size, colour), base, mask)


def _soft_shape(size: tuple[int, int], draw_fn, blur: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw_fn(_Filled(ImageDraw.Draw(mask)))
    return mask.filter(ImageFilter.GaussianBlur(blur))


class _Filled:
    """An ImageDraw whose shapes are filled white (a mask) unless told otherwise."""

    def __init__(self, draw: ImageDraw.ImageDraw) -> None:
        self._draw = draw

    def __getattr__(self, name: str):
        method = getattr(self._draw, name)
        key = "fill"

        def filled(*args, **kw):
            kw.setdefault(key, 255)
            return method(*args, **kw)

        return filled

# The face's centre and half-width / half-height, as fractions of the picture's size.
FACE_CENTRE = (0.5, 0.42)
FACE_HALF_SIZE = (0.25, 0.25)
# The mouth, in face half-sizes: a third of the way from the nostrils to the chin, about as
# wide as the distance between the pupils' inner edges. The upper lip's red is thinner than
# the lower lip's (about 2:3), as in most faces.
MOUTH_Y = 0.55
MOUTH_HALF_WIDTH = 0.36
UPPER_LIP = 0.080  # heights at the centre, as fractions of the face half-height
LOWER_LIP = 0.110
UPPER_LIP_RGB = (156, 74, 76)  # the upper lip faces down, so it is in shade
LOWER_LIP_RGB = (182, 92, 88)
LIP_HIGHLIGHT_RGB = (212, 134, 124)


def _lip_outline(cx: float, seam_y: float, half: float, fh: float, n: int = 48):
    """Points of the upper and the lower lip: a Cupid's bow on top, a full curve below,
    meeting along a gently curved seam at the corners."""
    u = np.linspace(-1.0, 1.0, n)
    xs = cx + half * u
    seam = seam_y + 0.012 * fh * (1 - u**2)
    bow = (1 - u**2) ** 0.55 * (1 - 0.28 * np.exp(-((u / 0.13) ** 2)))  # a dip at the philtrum
    top = seam - UPPER_LIP * fh * bow
    bottom = seam + LOWER_LIP * fh * (1 - u**2) ** 0.6
    # The upper lip reaches a little under the seam so that no skin shows between the two
    # soft-edged shapes (that would draw a light line; a gap of shade, a dark one).
    upper = list(zip(xs, top)) + list(zip(xs[::-1], seam[::-1] + 0.012 * fh))
    lower = list(zip(xs, seam)) + list(zip(xs[::-1], bottom[::-1]))
    return upper, lower


def _draw_lips(img: Image.Image, cx: float, seam_y: float, half: float, fh: float) -> Image.Image:
    """Closed lips: a shaded upper lip, a fuller and lighter lower lip with a soft highlight,
    small shadows at the corners and under the lower lip; no line between them."""
    size = img.size
    upper, lower = _lip_outline(cx, seam_y, half, fh)
    # The shade under the lower lip, on the skin above the chin.
    img = _blend(img, (168, 112, 92), _soft_shape(size, lambda d: d.ellipse(
        (cx - half * 0.6, seam_y + fh * 0.08, cx + half * 0.6, seam_y + fh * 0.16)), 7))
    img = _blend(img, UPPER_LIP_RGB, _soft_shape(size, lambda d: d.polygon(upper), 1.6))
    img = _blend(img, LOWER_LIP_RGB, _soft_shape(size, lambda d: d.polygon(lower), 1.6))
    img = _blend(img, LIP_HIGHLIGHT_RGB, _soft_shape(size, lambda d: d.ellipse(
        (cx - half * 0.35, seam_y + fh * 0.035, cx + half * 0.35, seam_y + fh * 0.07)), 5))
    for side in (-1, 1):  # the corners, where the lips fold in
        x = cx + side * half * 0.97
        img = _blend(img, (132, 74, 66), _soft_shape(size, lambda d, x=x: d.ellipse(
            (x - half * 0.06, seam_y - fh * 0.012, x + half * 0.06, seam_y + fh * 0.014)), 2))
    return img


def draw_portrait() -> Image.Image:
    """A front-facing, evenly lit head and shoulders."""
    w, h = WIDTH, HEIGHT
    # Background: a cool studio gradient.
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    bg = np.stack(
        [np.full((h, w), 70) + 40 * yy, np.full((h, w), 90) + 40 * yy, np.full((h, w), 115) + 35 * yy], axis=-1
    )
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")

    cx, cy = w * FACE_CENTRE[0], h * FACE_CENTRE[1]
    fw, fh = w * FACE_HALF_SIZE[0], h * FACE_HALF_SIZE[1]

    # Shoulders and shirt, then the neck.
    img = _blend(img, (48, 62, 92), _soft_shape((w, h), lambda d: d.ellipse(
        (cx - w * 0.48, h * 0.78, cx + w * 0.48, h * 1.35)), 4))
    img = _blend(img, (196, 146, 118), _soft_shape((w, h), lambda d: d.rectangle(
        (cx - fw * 0.45, cy + fh * 0.6, cx + fw * 0.45, h * 0.84)), 6))
    img = _blend(img, (150, 105, 85), _soft_shape((w, h), lambda d: d.ellipse(
        (cx - fw * 0.5, cy + fh * 0.85, cx + fw * 0.5, cy + fh * 1.15)), 14))

    # Hair behind the head.
    img = _blend(img, (52, 36, 28), _soft_shape((w, h), lambda d: d.ellipse(
        (cx - fw * 1.18, cy - fh * 1.28, cx + fw * 1.18, cy + fh * 0.55)), 6))

    # Face: skin tone with a radial light so the centre is brighter than the edges.
    face_mask = _soft_shape((w, h), lambda d: d.ellipse((cx - fw, cy - fh, cx + fw, cy + fh)), 3)
    light = _radial(w, h, cx - fw * 0.1, cy - fh * 0.1, fw * 1.25, fh * 1.2)
    skin = np.stack([150 + 85 * light, 100 + 75 * light, 80 + 60 * light], axis=-1)
    img = Image.composite(Image.fromarray(skin.clip(0, 255).astype(np.uint8), "RGB"), img, face_mask)

    # Ears.
    for side in (-1, 1):
        ex = cx + side * fw * 0.98
        img = _blend(img, (186, 132, 108), _soft_shape((w, h), lambda d, ex=ex: d.ellipse(
            (ex - fw * 0.12, cy - fh * 0.12, ex + fw * 0.12, cy + fh * 0.28)), 3))

    # Fringe over the forehead.
    img = _blend(img, (52, 36, 28), _soft_shape((w, h), lambda d: d.chord(
        (cx - fw * 1.05, cy - fh * 1.15, cx + fw * 1.05, cy - fh * 0.2), 180, 360), 5))

    eye_y = cy - fh * 0.12
    eye_dx = fw * 0.40
    # Eye sockets: the dark band across the eyes that face detectors key on.
    for side in (-1, 1):
        ex = cx + side * eye_dx
        img = _blend(img, (125, 82, 66), _soft_shape((w, h), lambda d, ex=ex: d.ellipse(
            (ex - fw * 0.30, eye_y - fh * 0.16, ex + fw * 0.30, eye_y + fh * 0.13)), 12))
    # Brows.
    for side in (-1, 1):
        ex = cx + side * eye_dx
        img = _blend(img, (45, 30, 24), _soft_shape((w, h), lambda d, ex=ex: d.chord(
            (ex - fw * 0.28, eye_y - fh * 0.30, ex + fw * 0.28, eye_y - fh * 0.10), 190, 350), 2))
    # Eyes: white, iris, pupil, highlight.
    for side in (-1, 1):
        ex = cx + side * eye_dx
        ew, eh = fw * 0.20, fh * 0.065
        img = _blend(img, (235, 230, 225), _soft_shape((w, h), lambda d, ex=ex, ew=ew, eh=eh: d.ellipse(
            (ex - ew, eye_y - eh, ex + ew, eye_y + eh)), 1.2))
        r = eh * 1.05
        img = _blend(img, (70, 48, 30), _soft_shape((w, h), lambda d, ex=ex, r=r: d.ellipse(
            (ex - r, eye_y - r, ex + r, eye_y + r)), 1))
        img = _blend(img, (15, 10, 8), _soft_shape((w, h), lambda d, ex=ex, r=r: d.ellipse(
            (ex - r * 0.45, eye_y - r * 0.45, ex + r * 0.45, eye_y + r * 0.45)), 0.8))
        img = _blend(img, (250, 250, 250), _soft_shape((w, h), lambda d, ex=ex, r=r: d.ellipse(
            (ex + r * 0.2, eye_y - r * 0.5, ex + r * 0.45, eye_y - r * 0.25)), 0.5))

    # Nose: a lit bridge, a shadow on one side and two nostrils.
    img = _blend(img, (238, 188, 160), _soft_shape((w, h), lambda d: d.rectangle(
        (cx - fw * 0.06, eye_y, cx + fw * 0.06, cy + fh * 0.22)), 6))
    img = _blend(img, (160, 108, 88), _soft_shape((w, h), lambda d: d.polygon(
        [(cx + fw * 0.08, eye_y + fh * 0.1), (cx + fw * 0.16, cy + fh * 0.28), (cx + fw * 0.05, cy + fh * 0.3)]), 5))
    for side in (-1, 1):
        nx = cx + side * fw * 0.09
        img = _blend(img, (95, 58, 48), _soft_shape((w, h), lambda d, nx=nx: d.ellipse(
            (nx - fw * 0.05, cy + fh * 0.27, nx + fw * 0.05, cy + fh * 0.33)), 2))

    img = _draw_lips(img, cx, cy + fh * MOUTH_Y, fw * MOUTH_HALF_WIDTH, fh)

    # A little even grain so it compresses and detects like a photo, not a flat drawing.
    rng = np.random.default_rng(7)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 3.0, (h, w, 1)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(0.6))


def synthesise_voice(out: Path) -> float:
    """Speak SENTENCE with espeak-ng and encode it as small mono MP3; return its duration."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed to regenerate the voice clip (apt install espeak-ng).")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "voice.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
        return _encode_mp3(wav, out)


def _encode_mp3(wav: Path, out: Path) -> float:
    samples = 0
    with av.open(str(wav)) as src, av.open(str(out), "w", format="mp3") as dst:
        stream = dst.add_stream("libmp3lame", rate=AUDIO_RATE)
        stream.layout = "mono"
        stream.bit_rate = AUDIO_BITRATE
        resampler = av.AudioResampler(format="s16p", layout="mono", rate=AUDIO_RATE)
        for frame in src.decode(audio=0):
            for rf in resampler.resample(frame):
                samples += rf.samples
                for packet in stream.encode(rf):
                    dst.mux(packet)
        for rf in resampler.resample(None):
            samples += rf.samples
            for packet in stream.encode(rf):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return samples / AUDIO_RATE


def main() -> int:
    EXAMPLES.mkdir(exist_ok=True)
    portrait = draw_portrait()
    portrait_path = EXAMPLES / "portrait.jpg"
    portrait.save(portrait_path, quality=88, optimize=True)
    sys.path.insert(0, str(ROOT))
    from avatar_core.media.face import detect_faces

    faces = detect_faces(Image.open(portrait_path))
    print(f"wrote {portrait_path.relative_to(ROOT)} ({portrait_path.stat().st_size // 1024} kB), faces found: {len(faces)}")
    voice_path = EXAMPLES / "voice.mp3"
    seconds = synthesise_voice(voice_path)
    print(f"wrote {voice_path.relative_to(ROOT)} ({voice_path.stat().st_size // 1024} kB, {seconds:.2f} s)")
    return 0 if faces else 1


if __name__ == "__main__":
    raise SystemExit(main())
