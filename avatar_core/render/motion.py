"""The preview's animation: a jaw that follows loudness, blinks, and a slightly moving head.

All geometry is in pixels of the output frame. The per-frame work is kept to small
regions (the lower face, the two eyes) plus one full-frame ``cv2.warpAffine`` for the head
pose, so a 720p frame costs a few milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..media.face import FaceBox

# Where features sit inside an OpenCV Haar face box (measured on frontal portraits: the box
# runs from the brows to just under the lower lip).
LIP_SEARCH = (0.74, 0.98)  # the lips lie between these fractions of the height (below the nostrils)
LIP_DEFAULT = 0.85
LIP_MIN_REDNESS = 0.3  # mean Cr excess per searched row below which redness is no guide (grey images)
CHIN = 1.12  # the chin tip, as a fraction of the box height below its top
NECK = 1.40  # where the jaw's pull fades out, and the pivot of the head's sway
MOUTH_HALF_WIDTH = 0.22  # half the mouth's width, as a fraction of the box width
JAW_HALF_WIDTH = 0.36  # half the jaw's width
# How far the mouth opens at full loudness, as a fraction of the face height: about what a
# speaker's jaw drops on an open vowel. The upper lip takes a quarter of the opening.
MOUTH_OPEN_MAX = 0.10
UPPER_LIP_SHARE = 0.25
# Colours of the open mouth (RGB): a dark interior with a hint of upper teeth.
MOUTH_DARK = np.array([48, 20, 24], dtype=np.float32)
TEETH = np.array([205, 198, 190], dtype=np.float32)

# Loudness to mouth opening: the loudest speech (95th percentile) opens fully, anything this
# many dB below it is a closed mouth, and true silence never opens it.
DYNAMIC_RANGE_DB = 30.0
SILENCE_DBFS = -50.0
# Mouths open fast and close a little slower; per-frame smoothing factors at 25 fps.
ATTACK = 0.75
RELEASE = 0.45
# A steady sound (a held note, a test tone) should not freeze the mouth open: a gentle
# syllable-rate flutter keeps it moving without hiding real speech rhythm.
FLUTTER_HZ = 3.7
FLUTTER_DEPTH = 0.3

# People blink every 2-6 s for about 0.2 s.
BLINK_GAP_S = (2.2, 5.5)
BLINK_SHAPE = (0.35, 0.85, 1.0, 0.7, 0.3)  # eyelid closure per frame at 25 fps

# Head pose amplitudes: small enough to read as a living person, not a shaking camera.
SWAY_DEG = 1.1
NOD_FRACTION = 0.012  # of the face height
DRIFT_FRACTION = 0.010  # of the face width
SPEECH_LIFT_FRACTION = 0.010  # the head lifts a little while speaking loudly
# The frame is zoomed in this much so the moving edges never show; a reflected border
# covers any pixel that would still be exposed.
CROP_ZOOM = 1.035
BREATH_ZOOM = 0.004
# Without a face: a slow breathing zoom and a loudness pulse.
IDLE_BREATH_ZOOM = 0.012
IDLE_PULSE_ZOOM = 0.015
IDLE_SWAY_DEG = 0.35


def mouth_openness(rms: np.ndarray, fps: int) -> np.ndarray:
    """Map per-frame RMS to mouth opening 0..1 (0 for silence), smoothed like a real jaw."""
    db = 20.0 * np.log10(np.maximum(rms.astype(np.float64), 1e-9))
    voiced = db[db > SILENCE_DBFS]
    if voiced.size == 0:
        return np.zeros_like(db, dtype=np.float32)
    ref = float(np.percentile(voiced, 95))
    floor = max(ref - DYNAMIC_RANGE_DB, SILENCE_DBFS)
    raw = np.clip((db - floor) / max(ref - floor, 1e-6), 0.0, 1.0)
    raw[db <= SILENCE_DBFS] = 0.0
    t = np.arange(raw.shape[0]) / fps
    raw = raw * (1.0 - FLUTTER_DEPTH * np.abs(np.sin(math.pi * FLUTTER_HZ * t)))
    scale = 25.0 / fps  # keep the time constants when fps differs
    attack = 1.0 - (1.0 - ATTACK) ** scale
    release = 1.0 - (1.0 - RELEASE) ** scale
    out = np.empty_like(raw)
    level = 0.0
    for i, target in enumerate(raw):
        level += (attack if target > level else release) * (target - level)
        out[i] = level
    return out.astype(np.float32)


def blink_track(n_frames: int, fps: int, seed: int = 7) -> np.ndarray:
    """Eyelid closure 0..1 per frame; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n_frames, dtype=np.float32)
    shape = np.interp(
        np.linspace(0, len(BLINK_SHAPE) - 1, max(3, round(len(BLINK_SHAPE) * fps / 25))),
        np.arange(len(BLINK_SHAPE)),
        BLINK_SHAPE,
    )
    t = rng.uniform(0.8, BLINK_GAP_S[0])  # the first blink comes early
    while True:
        start = int(t * fps)
        if start >= n_frames:
            break
        end = min(n_frames, start + shape.shape[0])
        out[start:end] = shape[: end - start]
        t += rng.uniform(*BLINK_GAP_S)
    return out


def _affine(pivot: tuple[float, float], angle_deg: float, zoom: float, shift: tuple[float, float],
            center: tuple[float, float]) -> np.ndarray:
    """Rotate about ``pivot``, then zoom about ``center``, then shift; a 2x3 matrix."""
    rot = np.vstack([cv2.getRotationMatrix2D(pivot, angle_deg, 1.0), [0, 0, 1]])
    cx, cy = center
    zm = np.array([[zoom, 0, cx - zoom * cx + shift[0]], [0, zoom, cy - zoom * cy + shift[1]], [0, 0, 1]])
    return (zm @ rot)[:2].astype(np.float64)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True)
class _Region:
    y0: int
    y1: int
    x0: int
    x1: int


class FaceAnimator:
    """Draws one talking-head frame at a time from a still portrait.

    ``base`` is the portrait at output size (RGB uint8); ``face`` and ``eyes`` are boxes in
    its pixels (``eyes`` may be empty: they are then estimated from the face box).
    """

    def __init__(self, base: np.ndarray, face: FaceBox, eyes: list[FaceBox], fps: int) -> None:
        self.base = base
        self.fps = fps
        self.h, self.w = base.shape[:2]
        self.face = face
        self._work = base.copy()
        self._dirty: list[_Region] = []
        self._setup_mouth()
        self._eyes = [self._setup_eye(e) for e in (eyes if self._plausible(eyes) else self._estimated_eyes())]
        self._eyes = [e for e in self._eyes if e is not None]

    # ---------------------------------------------------------------- mouth

    def _lip_line(self) -> int:
        """The row between the lips: the centre of the reddest rows under the nose (lips are
        redder than skin, in YCrCb's Cr), else the darkest row there, else a typical position."""
        f = self.face
        y0 = min(self.h - 2, f.y + int(LIP_SEARCH[0] * f.h))
        y1 = min(self.h - 1, f.y + int(LIP_SEARCH[1] * f.h))
        cx = f.x + f.w // 2
        half = max(2, int(0.14 * f.w))
        band = self.base[y0:y1, max(0, cx - half): min(self.w, cx + half)]
        if band.shape[0] < 5 or band.shape[1] < 2:
            return min(self.h - 1, f.y + int(LIP_DEFAULT * f.h))
        ycc = cv2.cvtColor(np.ascontiguousarray(band), cv2.COLOR_RGB2YCrCb).astype(np.float32)
        red = ycc[:, :, 1].mean(axis=1)
        excess = np.maximum(red - np.median(red) - 1.0, 0.0)
        if excess.sum() >= LIP_MIN_REDNESS * band.shape[0]:
            return y0 + int(round(float((excess * np.arange(excess.shape[0])).sum() / excess.sum())))
        luma = cv2.GaussianBlur(ycc[:, :, 0].mean(axis=1).reshape(-1, 1), (1, 5), 0).ravel()
        return y0 + int(np.argmin(luma))

    def _setup_mouth(self) -> None:
        f = self.face
        self.lip_y = self._lip_line()
        cx = f.x + f.w / 2.0
        x0 = max(0, int(cx - 0.45 * f.w))
        x1 = min(self.w, int(cx + 0.45 * f.w) + 1)
        y0 = max(0, int(self.lip_y - 0.24 * f.h))
        y1 = min(self.h, int(f.y + NECK * f.h) + 1)
        self._mouth = _Region(y0, y1, x0, x1)
        self._chin = min(float(y1 - 2), f.y + CHIN * f.h)
        xs = np.arange(x0, x1, dtype=np.float32)
        u_m = np.abs(xs - cx) / (MOUTH_HALF_WIDTH * f.w)
        u_j = np.abs(xs - cx) / (JAW_HALF_WIDTH * f.w)
        # Raised-cosine profiles: 1 at the centre line, 0 at the mouth corners / jaw edges.
        self._gap_profile = np.where(u_m < 1, 0.5 + 0.5 * np.cos(np.pi * np.minimum(u_m, 1)), 0.0)
        self._gap_profile = self._gap_profile ** 0.7  # a rounder opening
        self._jaw_profile = np.where(u_j < 1, 0.5 + 0.5 * np.cos(np.pi * np.minimum(u_j, 1)), 0.0)
        self._jaw_profile = np.maximum(self._jaw_profile, self._gap_profile)
        self._map_x = np.tile(xs, (y1 - y0, 1))
        self._rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        self._mouth_src = self.base[y0:y1, x0:x1]

    def mouth_patch(self, openness: float) -> tuple[_Region, np.ndarray]:
        """The lower face with the mouth opened by ``openness`` (0..1)."""
        r = self._mouth
        f = self.face
        if openness <= 1e-3:
            return r, self._mouth_src
        amp = MOUTH_OPEN_MAX * f.h * float(openness)
        up = UPPER_LIP_SHARE * amp * self._gap_profile  # per column
        down = (1 - UPPER_LIP_SHARE) * amp * self._gap_profile
        jaw = (1 - UPPER_LIP_SHARE) * amp * self._jaw_profile
        ly, chin, top, bottom = float(self.lip_y), self._chin, float(r.y0), float(r.y1 - 1)
        # Per column, output-row knots and the source rows they show (piecewise linear):
        # the upper lip rises, the gap shows the lip line, the jaw drops rigidly, the neck stretches.
        out_k = [np.full_like(up, top), ly - up, ly + down, np.minimum(chin + jaw, bottom - 1), np.full_like(up, bottom)]
        src_k = [top, ly, ly, chin, bottom]
        y = self._rows
        map_y = np.empty((r.y1 - r.y0, r.x1 - r.x0), dtype=np.float32)
        for k in range(4):
            o0, o1 = out_k[k][None, :], out_k[k + 1][None, :]
            span = np.maximum(o1 - o0, 1e-3)
            t = np.clip((y - o0) / span, 0.0, 1.0)
            seg = src_k[k] + t * (src_k[k + 1] - src_k[k])
            mask = (y >= o0) if k else np.ones_like(map_y, dtype=bool)
            map_y = np.where(mask, seg, map_y)
        src = self._mouth_src
        patch = cv2.remap(src, self._map_x - r.x0, map_y - r.y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # Paint the opening: dark inside, a band of upper teeth when it is wide enough.
        gap_top, gap_bot = (ly - up)[None, :], (ly + down)[None, :]
        height = np.maximum(gap_bot - gap_top, 1e-3)
        inside = np.clip(np.minimum(y - gap_top, gap_bot - y) / 1.2, 0.0, 1.0)
        depth = (y - gap_top) / height  # 0 at the upper lip, 1 at the lower lip
        teeth = np.clip((0.35 - depth) / 0.1, 0.0, 1.0) * np.clip((height - 4.0) / 6.0, 0.0, 0.75)
        colour = MOUTH_DARK + (TEETH - MOUTH_DARK) * teeth[..., None]
        alpha = (inside * 0.92)[..., None]
        blended = patch.astype(np.float32) * (1 - alpha) + colour * alpha
        return r, blended.astype(np.uint8)

    # ---------------------------------------------------------------- eyes

    def _plausible(self, eyes: list[FaceBox]) -> bool:
        """Two detections side by side in the upper face (Haar also "finds" brows and nostrils)."""
        if len(eyes) != 2:
            return False
        f = self.face
        (ax, ay), (bx, by) = ((e.x + e.w / 2, e.y + e.h / 2) for e in eyes)
        return (abs(ax - bx) > 0.25 * f.w and abs(ay - by) < 0.15 * f.h
                and all(f.y + 0.15 * f.h < y < f.y + 0.6 * f.h for y in (ay, by)))

    def _estimated_eyes(self) -> list[FaceBox]:
        f = self.face
        side = max(4, int(0.29 * f.w))
        y = f.y + int(0.37 * f.h) - side // 2
        return [FaceBox(f.x + int(cx * f.w) - side // 2, y, side, side) for cx in (0.3, 0.7)]

    def _setup_eye(self, e: FaceBox):
        cx, cy = e.x + e.w / 2.0, e.y + 0.52 * e.h
        rx, ry = 0.42 * e.w, 0.19 * e.h
        pad_y = 1.9 * ry
        x0, x1 = max(0, int(cx - rx - 2)), min(self.w, int(cx + rx + 3))
        y0, y1 = max(0, int(cy - pad_y - 1)), min(self.h, int(cy + pad_y + 2))
        if x1 - x0 < 4 or y1 - y0 < 4:
            return None
        src = self.base[y0:y1, x0:x1].astype(np.float32)
        # The closed lid: skin interpolated between the rows just above and below the eye.
        top_row = cv2.GaussianBlur(src[:2].mean(axis=0, keepdims=True), (5, 1), 0)
        bot_row = cv2.GaussianBlur(src[-2:].mean(axis=0, keepdims=True), (5, 1), 0)
        w = np.linspace(0.0, 1.0, y1 - y0, dtype=np.float32)[:, None, None]
        lid = top_row * (1 - w) + bot_row * w
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        ell = ((xs - cx) / (rx * 1.1)) ** 2 + ((ys - cy) / (ry * 1.25)) ** 2
        mask = _smoothstep((1.0 - ell) / 0.35)  # soft-edged eye shape
        top_of_eye = cy - ry * 1.25 * np.sqrt(np.clip(1 - ((xs - cx) / (rx * 1.1)) ** 2, 0, 1))
        bottom_of_eye = cy + ry * 1.25 * np.sqrt(np.clip(1 - ((xs - cx) / (rx * 1.1)) ** 2, 0, 1))
        return dict(region=_Region(y0, y1, x0, x1), src=src, lid=lid, mask=mask, ys=ys,
                    top=top_of_eye, bottom=bottom_of_eye, lash=np.clip(src.mean(axis=(0, 1)) * 0.35, 0, 255),
                    thick=max(1.0, 0.12 * ry))

    def eye_patches(self, closure: float) -> list[tuple[_Region, np.ndarray]]:
        """Both eyes with the upper lids lowered by ``closure`` (0 open .. 1 shut)."""
        if closure <= 1e-3:
            return []
        out = []
        for e in self._eyes:
            edge = e["top"] + closure * 0.92 * (e["bottom"] - e["top"])  # where the lid margin is now
            covered = np.clip((edge - e["ys"]) / 1.5 + 0.5, 0.0, 1.0) * e["mask"]
            lash = np.clip(1.0 - np.abs(e["ys"] - edge) / e["thick"], 0.0, 1.0) * e["mask"] * min(1.0, closure * 1.5)
            img = e["src"] * (1 - covered[..., None]) + e["lid"] * covered[..., None]
            img = img * (1 - lash[..., None]) + e["lash"] * lash[..., None]
            out.append((e["region"], img.astype(np.uint8)))
        return out

    # ---------------------------------------------------------------- head and frame

    def pose(self, t: float, speech: float) -> np.ndarray:
        """The head's small sway, nod and drift at time ``t`` as a 2x3 affine matrix."""
        f = self.face
        angle = SWAY_DEG * (0.6 * math.sin(2 * math.pi * 0.21 * t + 0.4) + 0.4 * math.sin(2 * math.pi * 0.47 * t + 2.1))
        nod = NOD_FRACTION * f.h * math.sin(2 * math.pi * 0.33 * t + 1.0) - SPEECH_LIFT_FRACTION * f.h * speech
        drift = DRIFT_FRACTION * f.w * math.sin(2 * math.pi * 0.17 * t)
        zoom = CROP_ZOOM + BREATH_ZOOM * math.sin(2 * math.pi * 0.25 * t)
        pivot = (f.x + f.w / 2.0, min(self.h - 1.0, f.y + NECK * f.h))
        return _affine(pivot, angle, zoom, (drift, nod), (self.w / 2.0, self.h / 2.0))

    def frame(self, t: float, openness: float, closure: float, speech: float, out: np.ndarray) -> np.ndarray:
        """Render the frame at time ``t`` into ``out`` (H x W x 3 uint8) and return it."""
        work = self._work
        for r in self._dirty:  # undo last frame's patches
            work[r.y0:r.y1, r.x0:r.x1] = self.base[r.y0:r.y1, r.x0:r.x1]
        self._dirty = []
        patches = [self.mouth_patch(openness)] + self.eye_patches(closure)
        for r, patch in patches:
            work[r.y0:r.y1, r.x0:r.x1] = patch
            self._dirty.append(r)
        cv2.warpAffine(work, self.pose(t, speech), (self.w, self.h), dst=out,
                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        return out


class IdleAnimator:
    """For pictures without a detectable face: breathing zoom, a loudness pulse, a slight sway."""

    def __init__(self, base: np.ndarray, fps: int) -> None:
        self.base = base
        self.fps = fps
        self.h, self.w = base.shape[:2]

    def frame(self, t: float, openness: float, closure: float, speech: float, out: np.ndarray) -> np.ndarray:
        zoom = CROP_ZOOM + IDLE_BREATH_ZOOM * 0.5 * (1 - math.cos(2 * math.pi * t / 5.0)) + IDLE_PULSE_ZOOM * speech
        angle = IDLE_SWAY_DEG * math.sin(2 * math.pi * 0.13 * t)
        centre = (self.w / 2.0, self.h / 2.0)
        m = _affine(centre, angle, zoom, (0.0, -0.004 * self.h * speech), centre)
        cv2.warpAffine(self.base, m, (self.w, self.h), dst=out, flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT101)
        return out
