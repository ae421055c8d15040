"""The one entry point the app and the CLI call to check and prepare inputs.

* :func:`check_image` — a portrait -> :class:`ImageCheck`
* :func:`check_audio` — a voice track (also a video's sound) -> :class:`AudioCheck`
* :func:`prepare_inputs` — both, plus the cost estimate -> :class:`PreparedInputs`

What a source is decides how it is read, by its type, never by what its text looks like:

* a :class:`Link` is text a visitor typed or pasted (the page's link fields, the API's
  ``image_url``/``audio_url``): it is only ever fetched over http(s); anything else
  (a server path, ``~``, ``file:``, ``data:``, ``ftp:``) gets the one fixed message
  :data:`LINK_ONLY_WEB`, whatever exists on the server;
* a :class:`~pathlib.Path` (any ``os.PathLike``) is a local file: an upload Gradio saved
  in its own cache, or a file named on the command line by the local user;
* a plain ``str`` is for trusted local callers (the command line, scripts): an http(s)
  URL is fetched, anything else is a local path.

A link's download lives in a private temporary folder (not the output folder, not any
folder the app serves) only while it is checked, and is deleted afterwards, pass or
fail. Only what the checks write themselves goes to ``settings.output_dir / "inputs"``:
re-encoded JPEG/PNG portraits, MP3/WAV voice tracks (re-encoded for links; an uploaded
file that already fits is copied as it is) and PNG waveforms, named by a hash of their
content so repeating a check reuses the same file. Problems a user must fix raise
:class:`~avatar_core.errors.InputError`; things worth knowing (no face, several faces,
the sound of a video used) are returned as ``warnings``.

A URL that passes the checks is kept as ``source_url``; when ``passthrough_ok`` is True
what the URL serves needed no rotation, conversion, trimming or downscaling (the file
we wrote holds the same picture or sound), so a hosted provider can be given the
original URL instead of an upload.

A portrait with no face is refused by :func:`prepare_inputs` for every hosted provider
(before anything is uploaded or submitted); the Local preview takes it and says so when done.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from ..config import Settings
from ..errors import InputError
from ..providers.base import default_version, model_id
from . import audio as _audio
from . import image as _image
from .face import FaceBox, detect_faces
from .fetch import Resolver, fetch, is_url, system_resolver
from .preview import draw_faces, format_duration, waveform_png
from .pricing import CostEstimate, estimate_cost, saving

# Download caps for URL inputs. Images above 10 MB are scaled down rather than refused,
# so allow the largest phone photos (a 50 MP JPEG is ~25 MB).
FETCH_MAX_IMAGE_BYTES = 30 * 1024 * 1024
# 300 s of 48 kHz stereo 24-bit WAV (the largest sensible voice file) is 86 MB.
FETCH_MAX_AUDIO_BYTES = 100 * 1024 * 1024
# A face smaller than this share of the picture is likely too small to animate well.
SMALL_FACE_SHARE = 0.02
# Silence this long at the ends is worth pointing out when trimming is off.
SUGGEST_TRIM_S = 1.0
# Encoders add a little silence to a recording (AAC priming: 1024 samples and more, MP3
# padding: up to 1152 samples, about 25 ms each), so a clip recorded to exactly the limit
# decodes a few hundredths of a second longer. Up to this much over the limit is cut off
# rather than refused with a confusing "300.0 s is too long, at most 300 s".
CODEC_PADDING_S = 0.1

INPUTS_DIRNAME = "inputs"
# The one answer to link text that is not an http(s) link: the same words whatever it
# names on the server (a file, a folder, nothing), so a link field tells nothing about it.
LINK_ONLY_WEB = "A link must start with http:// or https://. To use a file on your computer, upload it instead."
WEB_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Link:
    """Link text from a visitor (a link field of the page or the API). Only ever fetched
    over http(s); never opened as a local path, whatever it says."""

    text: str


Source = Link | str | os.PathLike


@dataclass(frozen=True)
class ImageCheck:
    """A checked portrait, normalised to JPEG or PNG (RGB) at ``path``."""

    path: Path
    width: int
    height: int
    format: str  # "JPEG" or "PNG": the file at ``path``
    original_format: str  # as uploaded: "JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"
    faces: list[FaceBox]  # largest first, in ``path`` pixel coordinates
    warnings: list[str]
    preview: Image.Image = field(repr=False, compare=False)  # at most 1024 px, faces boxed
    source_url: str | None = None
    passthrough_ok: bool = False  # what the URL serves is fit to send as it is


@dataclass(frozen=True)
class AudioCheck:
    """A checked voice track, normalised to MP3 or WAV at ``path``.

    ``duration_s``, ``codec``, ``sample_rate``, ``channels`` describe the file at ``path``
    (what will be sent); ``original_*`` describe what was given.
    """

    path: Path
    duration_s: float
    codec: str  # "mp3" or "pcm_s16le"
    sample_rate: int
    channels: int
    trimmed_s: float
    warnings: list[str]
    waveform_png: Path
    format: str = "mp3"  # "mp3" or "wav"
    format_reason: str = ""
    original_codec: str = ""
    original_duration_s: float = 0.0
    money_saved_usd: float | None = None  # by trimming, for the provider/tier asked about
    source_url: str | None = None
    passthrough_ok: bool = False


@dataclass(frozen=True)
class PreparedInputs:
    """Both checked inputs and the estimated cost of the job."""

    image: ImageCheck
    audio: AudioCheck
    cost: CostEstimate
    warnings: list[str]


def _work_dir(settings: Settings) -> Path:
    d = Path(settings.output_dir) / INPUTS_DIRNAME
    d.mkdir(parents=True, exist_ok=True)
    return d


def _touch(path: Path) -> None:
    """Mark a reused work file as used now, so the retention sweep (by age) leaves it be."""
    try:
        os.utime(path)
    except OSError:
        pass


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _scheme(text: str) -> str:
    return text.split(":", 1)[0].lower() if ":" in text else ""


def _download_name(filename: str, what: str) -> str:
    """A safe file name for a download: the link's own name (so messages name what the
    visitor gave), reduced to plain characters; never a path."""
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", filename).strip(" .")[:80]
    return name or f"linked-{what}"


@contextmanager
def _materialised(
    source: Source,
    *,
    settings: Settings,
    what: str,
    max_bytes: int,
    resolver: Resolver | None,
    transport: httpx.BaseTransport | None,
) -> Iterator[tuple[Path, str | None]]:
    """A local file for ``source`` while the block runs -> (path, link or None).

    Links are downloaded into a private temporary folder that is deleted when the block
    ends, whether the check passed or not.
    """
    if isinstance(source, Link):
        text = (source.text or "").strip()
        if not text:
            raise InputError(f"No {what} was given. Choose a file or paste a link.")
        if _scheme(text) not in WEB_SCHEMES:
            raise InputError(LINK_ONLY_WEB)
    elif isinstance(source, str) and is_url(source):  # a trusted caller's URL (CLI, scripts)
        text = source.strip()
    else:
        if source is None or (isinstance(source, str) and not source.strip()):
            raise InputError(f"No {what} was given. Choose a file or paste a link.")
        path = Path(source).expanduser()
        if path.is_dir():
            raise InputError(f"{path} is a folder, not a {what} file. Choose the file itself.")
        yield path, None
        return
    got = fetch(
        text,
        max_bytes=max_bytes,
        allow_private=settings.allow_private_urls,
        resolver=resolver or system_resolver,
        transport=transport,
        what=what,
    )
    with tempfile.TemporaryDirectory(prefix="avatar-link-") as private:  # mode 0700, outside anything served
        dest = Path(private) / _download_name(got.filename, what)
        dest.write_bytes(got.data)
        yield dest, text


# ------------------------------------------------------------------------------ image


def check_image(
    source: Source,
    *,
    settings: Settings,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> ImageCheck:
    """Check a portrait and write the provider-ready JPEG/PNG; see :class:`ImageCheck`.

    Raises InputError for unreadable, empty, damaged, too small, too wide/tall or
    impossibly large images. ``resolver``/``transport`` are for tests of URL inputs.
    """
    with _materialised(
        source, settings=settings, what="image", max_bytes=FETCH_MAX_IMAGE_BYTES, resolver=resolver, transport=transport
    ) as (path, url):
        return _check_image_file(path, url, settings)


def _check_image_file(path: Path, url: str | None, settings: Settings) -> ImageCheck:
    loaded = _image.load_image(path)
    img = loaded.image
    _image.check_geometry(img.width, img.height)
    warnings = list(loaded.warnings)

    faces = detect_faces(img)
    warnings.extend(face_warnings(faces, img.size))

    encoded = _image.encode_for_providers(img, loaded.original_format)
    warnings.extend(encoded.warnings)
    ext = ".png" if encoded.format == "PNG" else ".jpg"
    dest = _work_dir(settings) / f"image-{_digest(encoded.data)}{ext}"
    if not dest.exists():
        _image.write_atomic(dest, encoded.data)
    else:
        _touch(dest)  # reused: its retention age starts again

    if encoded.downscaled:
        sx = encoded.size[0] / img.width
        faces = [FaceBox(round(f.x * sx), round(f.y * sx), round(f.w * sx), round(f.h * sx)) for f in faces]
        img = img.resize(encoded.size)
    if loaded.rotated:
        warnings.append("The photo was turned upright using its camera orientation tag.")
    passthrough = (
        url is not None
        and loaded.original_format in ("JPEG", "PNG")
        and loaded.original_mode in ("RGB", "L")
        and not loaded.rotated
        and not loaded.reduced
        and not encoded.downscaled
        and loaded.original_bytes <= _image.MAX_OUTPUT_BYTES
    )
    return ImageCheck(
        path=dest,
        width=encoded.size[0],
        height=encoded.size[1],
        format=encoded.format,
        original_format=loaded.original_format,
        faces=faces,
        warnings=warnings,
        preview=draw_faces(img, faces),
        source_url=url,
        passthrough_ok=passthrough,
    )


def no_face_refusal(provider: str) -> str:
    """Why a hosted job was refused for a portrait without a face, and what to do."""
    return (
        f"No face was found in the portrait, so nothing was sent to {_provider_name(provider)} and nothing was paid. "
        "The avatar needs one clear face: choose a well-lit photo where one face looks at the camera "
        "(not covered, turned away or too small). The Local preview can still animate this picture, for free."
    )


def face_warnings(faces: list[FaceBox], size: tuple[int, int]) -> list[str]:
    """User-facing warnings about the faces found (none, several, very small)."""
    if not faces:
        return [
            "No face was found in the image. The avatar needs one clear face looking at the camera: "
            "use a well-lit portrait where the face is not covered or turned away. "
            "Hosted providers are not sent a picture without a face; the Local preview animates it "
            "without moving the mouth."
        ]
    out: list[str] = []
    if len(faces) > 1:
        where = "; ".join(f"{i + 1}: at x={f.x}, y={f.y}, {f.w}x{f.h} px" for i, f in enumerate(faces[:5]))
        out.append(
            f"{len(faces)} faces were found ({where}). The provider may animate the wrong one or refuse the image: "
            "crop the photo so only one face remains (face 1 is the largest)."
        )
    if faces[0].area / (size[0] * size[1]) < SMALL_FACE_SHARE:
        out.append("The face is small in the picture; cropping closer to the head and shoulders gives a better avatar.")
    return out


# ------------------------------------------------------------------------------ audio


def check_audio(
    source: Source,
    *,
    provider: str = "local",
    settings: Settings,
    trim_silence: bool = False,
    tier: str = "standard",
    version: str | None = None,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> AudioCheck:
    """Check a voice track for ``provider`` and write the provider-ready MP3/WAV; see :class:`AudioCheck`.

    ``trim_silence`` cuts leading/trailing silence; the seconds and money saved (for
    ``tier``/``version``) are reported. Raises InputError for empty, silent, damaged,
    non-audio, too short or too long audio.
    """
    limits = _audio.limits_for(provider)
    version = version or default_version(provider)
    with _materialised(
        source, settings=settings, what="audio", max_bytes=FETCH_MAX_AUDIO_BYTES, resolver=resolver, transport=transport
    ) as (path, url):
        return _check_audio_file(path, url, limits, provider, settings, trim_silence, tier, version)


def _check_audio_file(path: Path, url: str | None, limits: _audio.AudioLimits, provider: str, settings: Settings,
                      trim_silence: bool, tier: str, version: str) -> AudioCheck:
    info = _audio.probe(path)
    if not trim_silence and info.duration_s is not None and info.duration_s > limits.max_s * 1.05:
        raise _too_long(info.duration_s, limits, provider, trim_silence)

    # The header's duration is only a claim: decoding itself stops just past what could pass.
    decode_max_s = limits.max_s + (_audio.MAX_TRIMMABLE_S if trim_silence else CODEC_PADDING_S)
    try:
        segment = _audio.decode(path, max_s=decode_max_s)
    except _audio.AudioTooLong:
        raise _longer_than(limits, provider, trim_silence) from None
    original_s = len(segment) / 1000.0
    if _audio.is_silent(segment):
        raise InputError(
            "The audio is silent: no voice could be heard in it. Check the microphone or choose another recording."
        )
    warnings: list[str] = []
    if info.has_video:
        warnings.append("The sound track of the video file is used; its picture is ignored.")

    trimmed_s = 0.0
    money_saved = None
    if trim_silence:
        segment, trimmed_s = _audio.trim_silence(segment)
        if trimmed_s > 0:
            money_saved = saving(provider, tier, version, original_s, original_s - trimmed_s)
    else:
        start, end = _audio.speech_bounds(segment)
        removable = start + (original_s - end)
        if removable >= SUGGEST_TRIM_S:
            could = saving(provider, tier, version, original_s, original_s - removable)
            money = f" and about ${could:.2f}" if could else ""
            warnings.append(
                f"The recording has {removable:.1f} s of silence at its start/end; trimming it would save "
                f"{removable:.1f} s{money}."
            )
    duration = len(segment) / 1000.0
    padding_cut = limits.max_s < duration <= limits.max_s + CODEC_PADDING_S
    if padding_cut:
        segment = segment[: int(limits.max_s * 1000)]
        duration = len(segment) / 1000.0
    if duration < limits.min_s:
        after = " after trimming silence" if trimmed_s else ""
        raise InputError(
            f"The audio is too short ({duration:.1f} s{after}). It must last at least {limits.min_s:g} s: "
            "record a longer sentence."
        )
    if duration > limits.max_s:
        raise _too_long(duration, limits, provider, trim_silence)

    work = _work_dir(settings)
    # A link's bytes are never kept as they came: its file is always written by us.
    key = _digest(_file_digest(path), provider, str(trim_silence), "link" if url is not None else "file")
    fmt = limits.output
    dest = work / f"audio-{key}.{fmt}"
    if dest.exists():
        _touch(dest)  # reused: its retention age starts again
    same_codec = (fmt == "mp3" and info.codec == "mp3" and info.container == "mp3") or (
        fmt == "wav" and info.codec == "pcm_s16le" and info.container == "wav"
    )
    size_ok = limits.max_bytes is None or path.stat().st_size <= limits.max_bytes
    # A file faster than 48 kHz or with more than two channels is written again from the
    # decoded (resampled, mixed-down) sound, so what is kept is bounded by its length.
    fits_as_is = (same_codec and trimmed_s == 0 and not padding_cut and size_ok
                  and info.channels <= _audio.MAX_CHANNELS and info.sample_rate <= _audio.MAX_SAMPLE_RATE)
    # The provider may fetch the link itself: what it serves is already what it accepts.
    passthrough = fits_as_is and url is not None
    if fits_as_is and url is None:  # an upload that already fits is kept as it is (no re-encoding loss)
        if not dest.exists():
            shutil.copyfile(path, dest)
    elif not dest.exists():
        _audio.write_audio(segment, dest, fmt)
        if limits.max_bytes is not None and dest.stat().st_size > limits.max_bytes and fmt == "mp3":
            _audio.write_audio(segment, dest, fmt, bit_rate=_audio.MP3_BITRATE_SMALL)
    if limits.max_bytes is not None and dest.stat().st_size > limits.max_bytes:
        raise InputError(
            f"The audio is still {dest.stat().st_size / 1e6:.1f} MB after compression; {provider} accepts at most "
            f"{limits.max_bytes / 1e6:.0f} MB. Use a shorter recording."
        )
    out = _audio.probe(dest)
    wave = waveform_png(segment, work / f"wave-{key}.png", label=_wave_label(duration, trimmed_s))
    return AudioCheck(
        path=dest,
        duration_s=round(duration, 3),
        codec=out.codec,
        sample_rate=out.sample_rate,
        channels=out.channels,
        trimmed_s=trimmed_s,
        warnings=warnings,
        waveform_png=wave,
        format=fmt,
        format_reason=limits.why,
        original_codec=info.codec,
        original_duration_s=round(original_s, 3),
        money_saved_usd=money_saved,
        source_url=url,
        passthrough_ok=passthrough,
    )


def _wave_label(duration: float, trimmed_s: float) -> str:
    label = format_duration(duration)
    return f"{label} (trimmed {trimmed_s:.1f} s of silence)" if trimmed_s else label


def _provider_name(provider: str) -> str:
    from ..providers import LABELS

    return "The local preview" if provider == "local" else LABELS.get(provider, provider)


def _longer_than(limits: _audio.AudioLimits, provider: str, trimming: bool) -> InputError:
    """The sound went on past the longest that could pass (its length is not known: decoding stopped)."""
    if trimming:
        return InputError(
            f"The audio is longer than {limits.max_s + _audio.MAX_TRIMMABLE_S:g} s before trimming silence. "
            f"{_provider_name(provider)} accepts at most {limits.max_s:g} s: cut it into shorter parts."
        )
    return InputError(
        f"The audio is longer than {limits.max_s:g} s. {_provider_name(provider)} accepts at most "
        f"{limits.max_s:g} s: cut it into shorter parts (or switch on silence trimming if it has long pauses at the ends)."
    )


def _too_long(seconds: float, limits: _audio.AudioLimits, provider: str, trimming: bool) -> InputError:
    hint = "" if trimming else " (or switch on silence trimming if it has long pauses at the ends)"
    return InputError(
        f"The audio is too long ({seconds:.1f} s). {_provider_name(provider)} accepts at most {limits.max_s:g} s: "
        f"cut it into shorter parts{hint}."
    )


# ------------------------------------------------------------------------------ both


def prepare_inputs(
    image_source: Source,
    audio_source: Source,
    *,
    provider: str,
    tier: str,
    version: str | None = None,
    settings: Settings,
    trim_silence: bool = False,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
) -> PreparedInputs:
    """Check both inputs for one provider/tier/version and estimate the cost."""
    version = version or default_version(provider)
    model_id(provider, tier, version)  # InputError for an unknown provider/tier/version
    img = check_image(image_source, settings=settings, resolver=resolver, transport=transport)
    if not img.faces and provider != "local":
        # Before the audio is even looked at: nothing is uploaded or paid for a picture a
        # hosted model would refuse or animate badly. The Local preview animates it anyway.
        raise InputError(no_face_refusal(provider))
    aud = check_audio(
        audio_source,
        provider=provider,
        settings=settings,
        trim_silence=trim_silence,
        tier=tier,
        version=version,
        resolver=resolver,
        transport=transport,
    )
    cost = estimate_cost(provider, tier, version, aud.duration_s)
    warnings = [*img.warnings, *aud.warnings]
    if cost.usd is None:
        warnings.append(f"The price of this job is not known ({cost.basis}).")
    return PreparedInputs(image=img, audio=aud, cost=cost, warnings=warnings)
