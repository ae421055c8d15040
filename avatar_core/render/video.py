"""``render_video``: a still portrait plus a voice track in, a browser-playable MP4 out.

This is the offline "local" preview: no model, no network. It moves the jaw with the
voice's loudness, blinks, and sways the head a little, so a user can check framing, audio
and timing before paying for a hosted Kling AI Avatar render.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from collections.abc import Callable

import av
import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import AvatarError, InputError, JobCancelled
from ..media.face import FaceBox, detect_eyes, detect_faces
from ..media.image import to_rgb
from .motion import FaceAnimator, IdleAnimator, blink_track, mouth_openness
from .soundtrack import AAC_BITRATE, AUDIO_RATE, aac_packets, measure_loudness, open_audio, output_layout

# Output size limits per tier (long side x short side), matching what the hosted models
# deliver: standard about 720p, pro about 1080p.
TIER_BOX = {"standard": (1280, 720), "pro": (1920, 1080)}
# Small pictures are enlarged until their short side reaches this, never further: enough
# for a watchable preview without inventing detail the source does not have.
MIN_SHORT_SIDE = 480
# x264 speed/quality: "superfast" at CRF 23 needs about 20% less CPU than "veryfast" (the
# encoder is half of a frame's cost) for files about 2.5x larger, still well under 1 Mbit/s
# at 720p; that headroom keeps a 720p render above 2x real time on two cores (see
# bench/bench_media.py). Slower presets buy nothing a preview needs.
X264_PRESET = "superfast"
X264_CRF = 23
# One render per core is the provider's default concurrency, so each encoder gets the cores
# it can use; x264's own threads overlap encoding with our Python-side drawing.
X264_THREADS = max(1, os.cpu_count() or 1)
MAX_FPS = 60
# Frames drawn ahead of the encoder: enough to keep both busy, few enough to stop fast on cancel.
DRAW_AHEAD = 2
# Report progress at most this often (fraction of the frames), so callbacks stay cheap.
PROGRESS_STEP = 0.01
# Share of the progress bar spent measuring the voice's loudness before the first frame.
AUDIO_PROGRESS = 0.05

NO_FACE_NOTE = (
    "No face was found in the portrait, so the mouth does not move: the picture was animated with a slow "
    "zoom and a pulse with the voice instead. For lip movement, choose a photo where one face looks at the camera."
)
FACE_NOTE = ""  # nothing to tell the user when a face was found


@dataclass(frozen=True)
class RenderResult:
    """What :func:`render_video` wrote."""

    path: Path
    duration_s: float
    width: int
    height: int
    fps: int
    frames: int
    face_found: bool
    note: str  # anything the user should know about this render ("" when nothing)


def output_size(width: int, height: int, tier: str = "standard") -> tuple[int, int]:
    """The video size for a ``width`` x ``height`` picture: fits the tier's box, keeps the
    aspect ratio, enlarges only small pictures (to ``MIN_SHORT_SIDE``), and is even."""
    if tier not in TIER_BOX:
        raise InputError(f"Unknown tier {tier!r}. Choose 'standard' or 'pro'.")
    if width < 2 or height < 2:
        raise InputError(f"The image is {width}x{height} pixels; it is too small to animate.")
    long_max, short_max = TIER_BOX[tier]
    box_w, box_h = (long_max, short_max) if width >= height else (short_max, long_max)
    fit = min(box_w / width, box_h / height)
    enlarge = max(1.0, MIN_SHORT_SIDE / min(width, height))
    scale = min(fit, enlarge)
    # Nearest even size, never past the box (x264's 4:2:0 needs even sides).
    w = min(box_w // 2 * 2, max(2, 2 * round(width * scale / 2)))
    h = min(box_h // 2 * 2, max(2, 2 * round(height * scale / 2)))
    return w, h


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB copy of ``image`` (a path or a PIL image), EXIF rotation applied, transparency
    flattened onto white, 16-bit greyscale scaled to 8 bits (see :func:`~avatar_core.media.image.to_rgb`)."""
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            with Image.open(image) as opened:
                opened.load()
                img = opened.copy()
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(
                f"Could not read the image {Path(image).name!r} ({type(exc).__name__}). Use a JPEG or PNG file."
            ) from exc
    return to_rgb(ImageOps.exif_transpose(img) or img)


def _scale_box(b: FaceBox, sx: float, sy: float) -> FaceBox:
    return FaceBox(round(b.x * sx), round(b.y * sy), max(1, round(b.w * sx)), max(1, round(b.h * sy)))


def _resize(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(img)
    if (img.width, img.height) == size:
        return np.ascontiguousarray(arr)
    shrinking = size[0] < img.width
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _partial_path(out_path: Path) -> Path:
    return out_path.with_name(f".{out_path.stem}.partial{out_path.suffix or '.mp4'}")


def render_video(
    image: str | Path | Image.Image,
    audio: str | Path,
    out_path: str | Path,
    *,
    tier: str = "standard",
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    fps: int = 25,
) -> RenderResult:
    """Animate ``image`` to ``audio`` and write an H.264/AAC MP4 to ``out_path``.

    The video lasts as long as the audio (to the nearest frame), is at most 1280x720
    (standard) or 1920x1080 (pro) with the picture's aspect ratio, and starts with its index
    (faststart) so browsers play it while it downloads. ``progress`` gets 0..1; setting
    ``cancel`` stops the render within a frame, deletes the partial file and raises
    JobCancelled. Unreadable inputs raise InputError.
    """
    if not isinstance(fps, int) or not 1 <= fps <= MAX_FPS:
        raise InputError(f"Frame rate {fps!r} is not supported; use a whole number from 1 to {MAX_FPS}.")
    out_path = Path(out_path)
    img = load_image(image)
    width, height = output_size(img.width, img.height, tier)

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise JobCancelled("The local preview was cancelled.")

    def report(value: float) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, value)))

    check_cancel()
    faces = detect_faces(img)
    sx, sy = width / img.width, height / img.height
    base = _resize(img, (width, height))
    face = _scale_box(faces[0], sx, sy) if faces else None
    eyes = [_scale_box(e, sx, sy) for e in detect_eyes(img, faces[0])] if faces else []
    del img

    loudness = measure_loudness(audio, fps=fps, cancel=cancel)
    report(AUDIO_PROGRESS)
    n_frames = loudness.frames
    opening = mouth_openness(loudness.rms, fps)
    blinks = blink_track(n_frames, fps)
    # The head lifts with the *phrase*, not each syllable: a slow average of the opening.
    kernel = np.ones(max(1, fps // 2)) / max(1, fps // 2)
    speech = np.convolve(opening, kernel, mode="same")
    animator = FaceAnimator(base, face, eyes, fps) if face else IdleAnimator(base, fps)
    # Every frame is stamped in this time base, never in the stream's: the muxer changes
    # the stream's time base when it writes the header (to 1/12800 at 25 fps), and frames
    # stamped in that one would all land at time 0.
    frame_time = Fraction(1, fps)

    partial = _partial_path(out_path)
    source, in_stream = open_audio(audio)
    layout = output_layout(in_stream)
    source.close()
    container = None
    sound = None
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"})
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.time_base = frame_time
        vstream.options = {"preset": X264_PRESET, "crf": str(X264_CRF), "profile": "high"}
        ctx = vstream.codec_context
        ctx.thread_count = X264_THREADS
        # Our frames are BT.601 limited range (cv2's I420 conversion); say so, so players agree.
        ctx.color_range = 1
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 6
        astream = container.add_stream("aac", rate=AUDIO_RATE, layout=layout)
        astream.bit_rate = AAC_BITRATE
        # AAC is encoded as the video goes, so nothing is held for the whole clip.
        sound = aac_packets(audio, astream, cancel=cancel)
        pending = next(sound, None)
        step = max(1, int(n_frames * PROGRESS_STEP))

        def draw(i: int) -> np.ndarray:
            rgb = np.empty((height, width, 3), dtype=np.uint8)
            animator.frame(i / fps, float(opening[i]), float(blinks[i]), float(speech[i]), rgb)
            return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)

        # Drawing (OpenCV, which releases the GIL) runs DRAW_AHEAD frames ahead on a helper
        # thread while this thread feeds x264, so both cores stay busy.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="render-draw") as pool:
            ahead = [pool.submit(draw, i) for i in range(min(DRAW_AHEAD, n_frames))]
            for i in range(n_frames):
                check_cancel()
                yuv = ahead.pop(0).result()
                if i + DRAW_AHEAD < n_frames:
                    ahead.append(pool.submit(draw, i + DRAW_AHEAD))
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts, frame.time_base = i, frame_time
                # Interleave: audio up to the end of this frame, then the frame's packets.
                horizon = (i + 1) / fps
                while pending is not None and _packet_time(pending) < horizon:
                    container.mux(pending)
                    pending = next(sound, None)
                container.mux(vstream.encode(frame))
                if i % step == 0:
                    report(AUDIO_PROGRESS + (1 - AUDIO_PROGRESS) * i / n_frames)
        check_cancel()
        container.mux(vstream.encode(None))
        while pending is not None:
            container.mux(pending)
            pending = next(sound, None)
        container.close()
        container = None
        os.replace(partial, out_path)
    except BaseException as exc:
        if container is not None:
            try:
                container.close()
            except Exception:  # the file is deleted below anyway
                pass
        partial.unlink(missing_ok=True)
        if isinstance(exc, (AvatarError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(exc, (av.error.FFmpegError, OSError)):
            raise AvatarError(
                f"The local preview could not be written to {out_path.parent} ({exc}). "
                "Check there is free disk space, then try again."
            ) from exc
        raise
    report(1.0)
    return RenderResult(
        path=out_path,
        duration_s=loudness.duration_s,
        width=width,
        height=height,
        fps=fps,
        frames=n_frames,
        face_found=face is not None,
        note=FACE_NOTE if face else NO_FACE_NOTE,
    )


def _packet_time(packet: av.Packet) -> float:
    if packet.pts is None or packet.time_base is None:
        return 0.0
    return float(packet.pts * packet.time_base)
