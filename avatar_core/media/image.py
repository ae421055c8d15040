"""Portrait image checks and conversion to what every provider accepts (JPEG or PNG, RGB).

Reads JPEG, PNG, WebP, BMP, GIF (first frame), TIFF and HEIC (through pillow-heif, registered
in :mod:`avatar_core.media`) with Pillow, applies the EXIF
orientation, and enforces the strictest published limits (see PROVIDERS.md "Input
limits"): each side at least 300 px, aspect ratio between 1:2.5 and 2.5:1, file at most
10 MB. An oversized file is re-encoded or scaled down rather than refused. Anything that
cannot be used raises :class:`~avatar_core.errors.InputError` with a message that says
what is wrong and what to do.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

# Strictest published provider limits (PROVIDERS.md "Input limits").
MIN_SIDE_PX = 300
MAX_ASPECT = 2.5  # long side / short side, i.e. 1:2.5 .. 2.5:1
MAX_OUTPUT_BYTES = 10 * 1024 * 1024

# Decompression-bomb guard, checked on the header before any pixel is decoded. A check
# costs about 10 bytes per pixel at its peak (decode, RGB copy, face search, encoding), so
# 30 MP (a 24 MP camera's 6000 x 4000 with room to spare) keeps it near 300 MB; a 200 KB
# PNG claiming 8000 x 8000 px (640 MB) is refused here. JPEGs up to 8x8 times larger (a
# 50 MP phone photo) are decoded at 1/2, 1/4 or 1/8 scale instead (see REDUCED_JPEG_MAX),
# which JPEG does cheaply while decoding. Tests may lower it.
MAX_PIXELS = 30_000_000
# JPEG scales libjpeg decodes to directly (1/2, 1/4, 1/8 of each side).
_JPEG_SCALES = (2, 4, 8)

# Formats Pillow may open. (Phones' multi-picture "MPO" JPEGs open through the JPEG plugin.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF")

# JPEG quality ladder tried in turn to get under MAX_OUTPUT_BYTES. 92 is visually lossless
# for portraits; below 80 artefacts show around eyes and hair, so we scale down instead.
JPEG_QUALITIES = (92, 85, 80)
# Each downscale step when even quality 80 is too large: 0.8 in each side ~ 64 % of the bytes.
DOWNSCALE_STEP = 0.8
# PNG zlib level: 6 (Pillow's default) costs ~3x the time of 3 for ~5 % smaller files.
PNG_COMPRESS_LEVEL = 3

_LOSSLESS_SOURCES = {"PNG", "BMP", "GIF", "TIFF"}


@dataclass(frozen=True)
class LoadedImage:
    """An image decoded, oriented upright and converted to RGB."""

    image: Image.Image
    original_format: str  # Pillow's name: "JPEG", "PNG", "WEBP", ...
    original_size: tuple[int, int]  # as stored in the file, before EXIF rotation
    original_bytes: int
    rotated: bool  # an EXIF orientation other than "normal" was applied
    original_mode: str = "RGB"  # Pillow mode in the file: "RGB", "RGBA", "CMYK", "P", ...
    warnings: list[str] = field(default_factory=list)
    reduced: bool = False  # a JPEG over MAX_PIXELS decoded at 1/2, 1/4 or 1/8 scale


@dataclass(frozen=True)
class EncodedImage:
    """Bytes ready to upload, and what was done to get them."""

    data: bytes
    format: str  # "JPEG" or "PNG"
    size: tuple[int, int]
    downscaled: bool
    warnings: list[str] = field(default_factory=list)


def _name(path: Path) -> str:
    return path.name or str(path)


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Open, validate and orient an image file; raise InputError with a clear reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"The image file {_name(path)} was not found. Choose the file again.") from None
    except OSError as exc:
        raise InputError(f"The image file {_name(path)} cannot be read ({exc.strerror}).") from exc
    if size == 0:
        raise InputError(f"The image file {_name(path)} is empty (0 bytes). Choose the photo again or export it anew.")

    notes: list[str] = []
    with warnings.catch_warnings():
        # We apply our own pixel limit below; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError:
            raise _bomb_error(path) from None
        except UnidentifiedImageError:
            raise InputError(
                f"{_name(path)} is not an image we can read. Use a JPEG, PNG, WebP, HEIC, BMP, GIF or TIFF photo."
            ) from None
        except OSError as exc:
            raise InputError(f"{_name(path)} could not be opened as an image ({exc}). Export it again as JPEG or PNG.") from exc
        with im:
            fmt = (im.format or "").upper()
            original_size = im.size
            original_mode = im.mode
            reduced = False
            if im.width * im.height > MAX_PIXELS:
                scale = _jpeg_scale(fmt, im.size)
                if scale is None:
                    raise _bomb_error(path, im.size)
                # Decode straight to a smaller size: only the reduced pixels are ever held.
                im.draft("RGB", (-(-im.width // scale), -(-im.height // scale)))
                if im.width * im.height > MAX_PIXELS:  # pragma: no cover - libjpeg always reduces
                    raise _bomb_error(path, original_size)
                reduced = True
                notes.append(
                    f"The photo is {original_size[0]} x {original_size[1]} px ({_mp(original_size)} MP); it was read at "
                    f"{im.width} x {im.height} px, above what any provider uses, to keep the check fast."
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
                if fmt in ("GIF", "WEBP", "PNG"):
                    notes.append("The image is animated; only its first frame is used.")
            try:
                im.load()
            except Image.DecompressionBombError:
                raise _bomb_error(path, im.size) from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise InputError(
                    f"The image {_name(path)} is damaged or incomplete (the file seems cut short). "
                    "Download or export it again."
                ) from exc
            orientation = im.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(im) if orientation not in (1, None) else im
            rgb = to_rgb(upright)
    if rgb.width == 0 or rgb.height == 0:
        raise InputError(f"The image {_name(path)} has no pixels. Choose another photo.")
    return LoadedImage(
        image=rgb,
        original_format="JPEG" if fmt == "MPO" else fmt,
        original_size=original_size,
        original_bytes=size,
        rotated=orientation not in (1, None),
        original_mode=original_mode,
        warnings=notes,
        reduced=reduced,
    )


def _mp(size: tuple[int, int]) -> str:
    return f"{size[0] * size[1] / 1e6:.0f}"


def _jpeg_scale(fmt: str, size: tuple[int, int]) -> int | None:
    """The smallest 1/n scale libjpeg decodes a JPEG of ``size`` to within MAX_PIXELS, or None."""
    if fmt not in ("JPEG", "MPO"):
        return None
    for scale in _JPEG_SCALES:
        if (-(-size[0] // scale)) * (-(-size[1] // scale)) <= MAX_PIXELS:
            return scale
    return None


def _bomb_error(path: Path, size: tuple[int, int] | None = None) -> InputError:
    dims = f" ({size[0]} x {size[1]} px, {_mp(size)} megapixels)" if size else ""
    return InputError(
        f"The image {_name(path)} claims to be far too large{dims} to open safely "
        f"(limit {MAX_PIXELS / 1_000_000:g} megapixels). Resize it to a few thousand pixels per side "
        "(for example 4000 x 3000) and try again."
    )


# Pillow's modes for one 16-bit grey channel ("I" is 32-bit, but is what older Pillow and
# some TIFFs give for 16-bit files).
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# Pixels converted at a time by _grey16_to_l (a few MB of 16- or 32-bit values).
_BLOCK_PIXELS = 1 << 20


def _grey16_to_l(im: Image.Image) -> Image.Image:
    """8-bit "L" from 16-bit grey: each value >> 8 ("I": clipped to 0..65535 first).

    Pillow's point() and convert() refuse I;16B, so the shift is done with numpy, a band of
    rows at a time and in the values' own width: the 8-bit result and one band are all
    that is held besides ``im``, never a wider copy of the whole picture (a 30 MP 16-bit
    file costs 30 MB here, not 8 bytes a pixel several times over).
    """
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(1, w))
    for y in range(0, h, rows):
        band = np.asarray(im.crop((0, y, w, min(h, y + rows))))
        if band.dtype.kind == "i":  # "I": 32-bit signed
            band = np.clip(band, 0, 65535)
        out[y : y + rows] = np.right_shift(band, 8).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white (providers take no alpha).

    16-bit greyscale (a scanned photo, a medical or astronomy export) is scaled to 8 bits
    (value >> 8, so 65535 is 255): Pillow's own ``convert("RGB")`` clips it at 255 instead,
    and all but the darkest pixels of such a picture turn white.
    """
    if im.mode in _SIXTEEN_BIT_GREY:
        im = _grey16_to_l(im)
    elif im.mode == "F":
        im = im.convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def check_geometry(width: int, height: int) -> None:
    """Refuse images the providers refuse: too small a side, or too long and thin."""
    if min(width, height) < MIN_SIDE_PX:
        raise InputError(
            f"The image is too small ({width} x {height} px). Each side must be at least {MIN_SIDE_PX} px: "
            "use a larger photo (a phone photo or a crop of at least 300 x 300 px)."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        shape = "wide" if width > height else "tall"
        raise InputError(
            f"The image is too {shape} ({width} x {height} px, ratio {ratio:.1f}:1). The ratio between the long "
            f"and the short side must be at most {MAX_ASPECT}:1: crop it closer to the face (for example to a square)."
        )


def choose_output_format(original_format: str) -> str:
    """PNG for lossless sources (keeps drawings and screenshots sharp), JPEG for photos."""
    return "PNG" if original_format in _LOSSLESS_SOURCES else "JPEG"


def encode_for_providers(
    image: Image.Image, original_format: str, *, max_bytes: int = MAX_OUTPUT_BYTES
) -> EncodedImage:
    """Encode as JPEG or PNG under ``max_bytes``: re-encode, then scale down, never refuse."""
    fmt = choose_output_format(original_format)
    notes: list[str] = []
    if fmt == "PNG":
        data = _encode(image, "PNG")
        if len(data) <= max_bytes:
            return EncodedImage(data, "PNG", image.size, False, notes)
        notes.append(f"As PNG the image would be {len(data) / 1e6:.1f} MB; it was saved as JPEG to stay under the limit.")
        fmt = "JPEG"
    current = image
    downscaled = False
    while True:
        for q in JPEG_QUALITIES:
            data = _encode(current, "JPEG", quality=q)
            if len(data) <= max_bytes:
                if downscaled:
                    notes.append(
                        f"The image was scaled down from {image.width} x {image.height} to "
                        f"{current.width} x {current.height} px to stay under {max_bytes / 1024 / 1024:.0f} MB."
                    )
                return EncodedImage(data, "JPEG", current.size, downscaled, notes)
        new_size = (max(1, int(current.width * DOWNSCALE_STEP)), max(1, int(current.height * DOWNSCALE_STEP)))
        if min(new_size) < MIN_SIDE_PX:  # pragma: no cover - needs > 10 MB at 300 px
            raise InputError("The image cannot be made small enough for the providers. Use a simpler photo.")
        current = image.resize(new_size, Image.Resampling.LANCZOS)
        downscaled = True


def _encode(image: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.save(buf, "JPEG", quality=quality, optimize=False, subsampling="4:2:0" if quality < 90 else "4:4:4")
    return buf.getvalue()


def write_atomic(dest: Path, data: bytes) -> Path:
    """Write bytes to ``dest`` through a temporary file, so readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
