"""Previews for the UI: the portrait with its face boxes, and a waveform picture of the audio."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .audio import AudioSegment, mono_extremes
from .face import FaceBox

# The UI shows previews at most about 1000 px wide; a full 12 MP copy would only cost
# memory and transfer time in the browser.
PREVIEW_MAX_SIDE = 1024
WAVEFORM_SIZE = (1000, 200)
_BOX_COLOURS = ((0, 220, 0), (255, 160, 0), (255, 60, 60))  # first face green, others orange/red


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def draw_faces(image: Image.Image, faces: Sequence[FaceBox], *, max_side: int = PREVIEW_MAX_SIDE) -> Image.Image:
    """A copy of ``image`` (scaled to at most ``max_side``) with each face boxed and numbered."""
    scale = min(1.0, max_side / max(image.size))
    out = image.convert("RGB")
    if scale < 1.0:
        out = out.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
    else:
        out = out.copy()
    draw = ImageDraw.Draw(out)
    line = max(2, round(max(out.size) / 250))
    font = _font(max(12, round(max(out.size) / 40)))
    for i, f in enumerate(faces):
        colour = _BOX_COLOURS[min(i, len(_BOX_COLOURS) - 1)]
        box = (f.x * scale, f.y * scale, (f.x + f.w) * scale, (f.y + f.h) * scale)
        draw.rectangle(box, outline=colour, width=line)
        if len(faces) > 1:
            draw.text((box[0] + line, box[1] + line), str(i + 1), fill=colour, font=font)
    return out


def save_png(image: Image.Image, dest: str | os.PathLike) -> Path:
    """Save a preview as PNG (creating the folder)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, "PNG")
    return dest


def waveform_image(segment: AudioSegment, *, size: tuple[int, int] = WAVEFORM_SIZE, label: str | None = None) -> Image.Image:
    """Min/max waveform of ``segment`` with its duration (or ``label``) written in the corner."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 252))
    draw = ImageDraw.Draw(img)
    lows, highs = mono_extremes(segment, w)  # per column, without a float copy of the clip
    mid = h / 2
    draw.line((0, mid, w, mid), fill=(200, 200, 210))
    if len(lows):
        step = w / len(lows)
        for i, (lo, hi) in enumerate(zip(lows.tolist(), highs.tolist())):
            xx = i * step
            draw.line((xx, mid - hi * (mid - 4), xx, mid - lo * (mid - 4)), fill=(40, 90, 200))
    seconds = len(segment) / 1000.0
    text = label if label is not None else format_duration(seconds)
    font = _font(max(14, h // 8))
    draw.rectangle(draw.textbbox((8, 6), text, font=font), fill=(250, 250, 252))
    draw.text((8, 6), text, fill=(20, 20, 20), font=font)
    return img


def format_duration(seconds: float) -> str:
    """"12.3 s" below a minute, "2:05.4 (125.4 s)" above."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(seconds, 60)
    return f"{int(m)}:{s:04.1f} ({seconds:.1f} s)"


def waveform_png(segment: AudioSegment, dest: str | os.PathLike, **kw) -> Path:
    """Write :func:`waveform_image` to ``dest`` as PNG."""
    return save_png(waveform_image(segment, **kw), dest)
