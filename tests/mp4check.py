"""What a browser will make of an MP4 we wrote: decode it and check what a viewer would notice.

:func:`inspect_mp4` reads every packet and decodes every video frame (small and fast: a
5-minute 720p preview decodes in a few seconds) and returns a :class:`Mp4Report`;
:func:`check_mp4` asserts on it:

* the index comes first (``moov`` before ``mdat``: faststart, so playback starts at once);
* H.264 in yuv420p and AAC: what every browser plays;
* video timestamps rise strictly, one frame duration (1/fps) apart, from 0 — the bug
  that made every preview a frozen picture stamped all frames after the first at 0;
* video and audio each last as long as the voice, within 0.1 s;
* the picture moves: frames a second or so apart differ, through the whole clip.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# How far apart (in seconds) the frames compared for movement are, and how much (mean
# absolute difference of a 64-px-wide grey thumbnail, 0..255) counts as "moved".
MOTION_SPACING_S = 1.0
MOTION_MIN_DIFF = 0.15
# Share of those comparisons that must show movement: a talking head moves nearly all the
# time; a frozen picture never does.
MOTION_MIN_SHARE = 0.6


@dataclass
class Mp4Report:
    """What one MP4 holds, as read back from the file."""

    top_atoms: list[str]
    video_codec: str
    pix_fmt: str
    audio_codec: str
    fps: Fraction
    video_pts: list[int]  # presentation times of the video packets, in ``video_time_base``, sorted
    video_dts: list[int]  # decode times in file order
    video_time_base: Fraction
    video_s: float  # last frame's time plus one frame
    audio_s: float  # decoded samples / sample rate
    width: int
    height: int
    thumbnails: list[tuple[float, np.ndarray]] = field(repr=False, default_factory=list)

    def motion_share(self, spacing_s: float = MOTION_SPACING_S, min_diff: float = MOTION_MIN_DIFF) -> float:
        """Share of frame pairs ``spacing_s`` apart whose thumbnails differ by more than ``min_diff``."""
        picked: list[np.ndarray] = []
        next_t = 0.0
        for t, thumb in self.thumbnails:
            if t + 1e-9 >= next_t:
                picked.append(thumb)
                next_t = t + spacing_s
        if len(picked) < 2:
            return 0.0
        diffs = [float(np.abs(a - b).mean()) for a, b in itertools.pairwise(picked)]
        return sum(d > min_diff for d in diffs) / len(diffs)


def _top_atoms(path: Path) -> list[str]:
    atoms = []
    with open(path, "rb") as fh:
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return atoms
            size, kind = struct.unpack(">I4s", head)
            if size == 1:
                size = struct.unpack(">Q", fh.read(8))[0]
                fh.seek(size - 16, 1)
            elif size == 0:
                atoms.append(kind.decode("latin-1"))
                return atoms
            else:
                fh.seek(size - 8, 1)
            atoms.append(kind.decode("latin-1"))


def inspect_mp4(path: Path | str) -> Mp4Report:
    """Read every packet and decode every frame of the MP4 at ``path``."""
    path = Path(path)
    with av.open(str(path)) as c:
        assert c.streams.video, f"{path.name}: no video stream"
        assert c.streams.audio, f"{path.name}: no audio stream"
        v, a = c.streams.video[0], c.streams.audio[0]
        v.thread_type = "AUTO"
        pts: list[int] = []
        dts: list[int] = []
        thumbs: list[tuple[float, np.ndarray]] = []
        samples = 0
        for packet in c.demux(v, a):
            if packet.stream is v:
                if packet.size:
                    assert packet.pts is not None, f"{path.name}: a video packet has no timestamp"
                    pts.append(packet.pts)
                    dts.append(packet.dts)
                frames = v.decode(packet)
                for frame in frames:
                    grey = frame.to_ndarray(format="gray", width=64, height=max(2, round(64 * v.height / v.width)))
                    thumbs.append((float(frame.pts * v.time_base), grey.astype(np.float32)))
            else:
                for frame in a.decode(packet):
                    samples += frame.samples
        thumbs.sort(key=lambda item: item[0])
        pts.sort()
        fps = v.average_rate or v.guessed_rate or Fraction(0)
        frame_ticks = (1 / fps / v.time_base) if fps else 0
        video_s = float((pts[-1] + frame_ticks) * v.time_base) if pts else 0.0
        return Mp4Report(
            top_atoms=_top_atoms(path),
            video_codec=v.codec_context.name,
            pix_fmt=v.codec_context.pix_fmt or "",
            audio_codec=a.codec_context.name,
            fps=Fraction(fps),
            video_pts=pts,
            video_dts=dts,
            video_time_base=v.time_base,
            video_s=video_s,
            audio_s=samples / (a.codec_context.sample_rate or 1),
            width=v.width,
            height=v.height,
            thumbnails=thumbs,
        )


def check_mp4(path: Path | str, seconds: float, *, moving: bool = True, faststart: bool = True) -> Mp4Report:
    """Assert that the MP4 at ``path`` plays in a browser as a ``seconds``-long moving video."""
    r = inspect_mp4(path)
    name = Path(path).name
    assert r.video_codec == "h264", f"{name}: video is {r.video_codec}, not H.264"
    assert r.pix_fmt == "yuv420p", f"{name}: pixel format {r.pix_fmt} (browsers need yuv420p)"
    assert r.audio_codec == "aac", f"{name}: audio is {r.audio_codec}, not AAC"
    if faststart:
        assert "moov" in r.top_atoms and "mdat" in r.top_atoms, f"{name}: atoms {r.top_atoms}"
        assert r.top_atoms.index("moov") < r.top_atoms.index("mdat"), f"{name}: index after the data (no faststart)"
    assert r.fps > 0, f"{name}: no frame rate"
    step = Fraction(1) / r.fps / r.video_time_base
    assert step.denominator == 1, f"{name}: a frame is {step} ticks of {r.video_time_base}"
    assert r.video_pts[0] == 0, f"{name}: the first frame is at {r.video_pts[0]}"
    gaps = set(np.diff(np.asarray(r.video_pts, dtype=np.int64)).tolist())
    assert gaps == {int(step)}, f"{name}: video timestamps step by {sorted(gaps)[:5]}, not {int(step)} (1/{r.fps} s)"
    assert all(b > a for a, b in zip(r.video_dts, r.video_dts[1:])), f"{name}: decode times do not rise"
    assert len(r.thumbnails) == len(r.video_pts), f"{name}: {len(r.thumbnails)} of {len(r.video_pts)} frames decoded"
    assert abs(r.video_s - seconds) <= 0.1, f"{name}: video lasts {r.video_s:.3f} s, the voice {seconds:.3f} s"
    assert abs(r.audio_s - seconds) <= 0.1, f"{name}: audio lasts {r.audio_s:.3f} s, the voice {seconds:.3f} s"
    if moving:
        share = r.motion_share()
        assert share >= MOTION_MIN_SHARE, f"{name}: the picture moved in only {share:.0%} of 1-s steps"
    return r
