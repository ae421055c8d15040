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
# runs from the brows to just under the lower lip; on drawn faces it is looser and the lips
# sit higher, about 0.72).
LIP_SEARCH = (0.66, 1.02)  # the lips lie between these fractions of the height (below the nostrils)
LIP_SEARCH_HALF_WIDTH = 0.30  # and within this much of the box width either side of its centre
LIP_DEFAULT = 0.85
LIP_MIN_REDNESS = 0.3  # mean Cr excess per searched row below which redness is no guide (grey images)
LIP_EDGE = 0.3  # a row or column is lip while its redness is above this share of the peak's
LIP_GAP = 0.06  # red bands this close (fraction of the box height) are one mouth (teeth between)
# The upper lip's red is about 2:3 of the lower lip's, so closed lips meet at about this
# fraction of their height; used when no darker seam (or gap between teeth) shows.
LIP_SEAM_SHARE = 0.42
LIP_SEAM_CONTRAST = 10.0  # grey levels a seam must be darker than the lips above and below it
# Half the mouth's width when its corners cannot be measured, and the range a measurement
# is trusted in (fractions of the box width).
MOUTH_HALF_WIDTH = 0.20
MOUTH_HALF_WIDTH_RANGE = (0.08, 0.30)
CHIN = 1.12  # the chin tip, as a fraction of the box height below its top
NECK = 1.40  # where the jaw's pull fades out, and the pivot of the head's sway
JAW_HALF_WIDTH = 0.36  # half the jaw's width
# How far the mouth opens at full loudness, as a fraction of the face height: about what a
# speaker's jaw drops on an open vowel, but never taller than this share of the mouth's
# width (an "ah" is wider than tall). The upper lip takes a third of the opening.
MOUTH_OPEN_MAX = 0.10
MOUTH_OPEN_ASPECT = 0.45
UPPER_LIP_SHARE = 0.33
# Colours of the open mouth (RGB): a dark interior, a reddish tongue low at the back, and a
# hint of upper teeth when the source shows none already.
MOUTH_DARK = np.array([38, 14, 18], dtype=np.float32)
MOUTH_INNER_LIP = np.array([96, 36, 40], dtype=np.float32)  # the wet inner side of the lips
TONGUE = np.array([120, 52, 58], dtype=np.float32)
TEETH = np.array([200, 192, 184], dtype=np.float32)

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

    def _find_lips(self) -> tuple[int, float, float]:
        """The row between the lips and the mouth's centre and half-width (pixels).

        Lips are redder than skin (YCrCb's Cr): the red band under the nose gives the lips'
        rows and, across those rows, the corners. Between the lips the line is a darker seam
        (or the gap between teeth) when one shows, else where a thinner upper lip meets the
        fuller lower one. Grey pictures fall back to the darkest row and typical proportions."""
        f = self.face
        cx = f.x + f.w / 2.0
        default = (min(self.h - 1, f.y + int(LIP_DEFAULT * f.h)), cx, MOUTH_HALF_WIDTH * f.w)
        y0 = min(self.h - 2, f.y + int(LIP_SEARCH[0] * f.h))
        y1 = min(self.h - 1, f.y + int(LIP_SEARCH[1] * f.h))
        x0 = max(0, int(cx - LIP_SEARCH_HALF_WIDTH * f.w))
        x1 = min(self.w, int(cx + LIP_SEARCH_HALF_WIDTH * f.w) + 1)
        if y1 - y0 < 5 or x1 - x0 < 8:
            return default
        ycc = cv2.cvtColor(np.ascontiguousarray(self.base[y0:y1, x0:x1]), cv2.COLOR_RGB2YCrCb).astype(np.float32)
        luma, cr = ycc[:, :, 0], ycc[:, :, 1]
        mid = slice(int((cx - x0) - 0.12 * f.w), int((cx - x0) + 0.12 * f.w) + 1)
        mid = slice(max(0, mid.start), max(mid.start + 1, mid.stop))
        excess = np.maximum(cr - np.median(cr) - 1.0, 0.0)
        rows = cv2.GaussianBlur(excess[:, mid].mean(axis=1).reshape(-1, 1), (1, 5), 0).ravel()
        if rows.sum() < LIP_MIN_REDNESS * rows.shape[0]:
            prof = cv2.GaussianBlur(luma[:, mid].mean(axis=1).reshape(-1, 1), (1, 5), 0).ravel()
            lo = max(0, int((LIP_SEARCH[0] + 0.08) * f.h) - (y0 - f.y))
            return y0 + lo + int(np.argmin(prof[lo:])), cx, MOUTH_HALF_WIDTH * f.w
        # The lips' rows: the red band around the reddest row, bridging a gap of teeth.
        red = rows > LIP_EDGE * rows.max()
        peak = int(np.argmax(rows))
        gap = max(1, int(LIP_GAP * f.h))
        top = bottom = peak
        while top > 0 and red[max(0, top - gap):top].any():
            top -= 1 + int(np.argmax(red[max(0, top - gap):top][::-1]))
        while bottom < red.shape[0] - 1 and red[bottom + 1:bottom + 1 + gap].any():
            bottom += 1 + int(np.argmax(red[bottom + 1:bottom + 1 + gap]))
        height = bottom - top + 1
        line = top + LIP_SEAM_SHARE * height
        between = np.flatnonzero(~red[top:bottom + 1])
        if between.size:  # parted lips (teeth or a gap between them): the line is in its middle
            line = top + float(between.mean())
        elif height >= 6:  # a seam is a narrow row darker than the lip just above and below it
            prof = cv2.GaussianBlur(luma[top:bottom + 1, mid].mean(axis=1).reshape(-1, 1), (1, 3), 0).ravel()
            inner = np.arange(int(0.2 * height), int(0.8 * height) + 1)
            reach = max(2, int(0.015 * f.h))
            contrast = [min(prof[max(0, i - reach):i].max(initial=0), prof[i + 1:i + 1 + reach].max(initial=0)) - prof[i]
                        for i in inner]
            best = int(np.argmax(contrast))
            if contrast[best] >= LIP_SEAM_CONTRAST:
                line = top + float(inner[best])
        # The corners: across the lips' rows, where the redness fades on either side.
        cols = cv2.GaussianBlur(excess[top:bottom + 1].mean(axis=0).reshape(1, -1), (5, 1), 0).ravel()
        c = int(round(cx - x0))
        edge = LIP_EDGE * cols[max(0, c - 3):c + 4].max()
        left = c
        while left > 0 and cols[left - 1] > edge:
            left -= 1
        right = c
        while right < cols.shape[0] - 1 and cols[right + 1] > edge:
            right += 1
        half = (right - left) / 2.0
        lo_w, hi_w = MOUTH_HALF_WIDTH_RANGE
        if not lo_w * f.w <= half <= hi_w * f.w or edge <= 0:
            return y0 + int(round(line)), cx, MOUTH_HALF_WIDTH * f.w
        return y0 + int(round(line)), x0 + (left + right) / 2.0, half

    def _setup_mouth(self) -> None:
        f = self.face
        self.lip_y, self.mouth_cx, self.mouth_half = self._find_lips()
        cx = f.x + f.w / 2.0
        jaw_half = max(JAW_HALF_WIDTH * f.w, 1.5 * self.mouth_half)
        x0 = max(0, int(min(cx - 0.45 * f.w, self.mouth_cx - jaw_half)))
        x1 = min(self.w, int(max(cx + 0.45 * f.w, self.mouth_cx + jaw_half)) + 1)
        y0 = max(0, int(self.lip_y - 0.24 * f.h))
        y1 = min(self.h, int(f.y + NECK * f.h) + 1)
        self._mouth = _Region(y0, y1, x0, x1)
        self._chin = min(float(y1 - 2), f.y + CHIN * f.h)
        xs = np.arange(x0, x1, dtype=np.float32)
        self._u = (xs - self.mouth_cx) / self.mouth_half  # -1 and 1 at the mouth's corners
        u_m = np.abs(self._u)
        u_j = np.abs(xs - self.mouth_cx) / jaw_half
        # The lips part between the corners, most at the centre, meeting the corners at an
        # angle (an ellipse's outline, slightly pointed); the jaw drops a raised-cosine bell.
        self._gap_profile = np.clip(1.0 - u_m**2, 0.0, 1.0) ** 0.75
        self._jaw_profile = np.where(u_j < 1, 0.5 + 0.5 * np.cos(np.pi * np.minimum(u_j, 1)), 0.0)
        self._jaw_profile = np.maximum(self._jaw_profile, self._gap_profile)
        self._map_x = np.tile(xs, (y1 - y0, 1))
        self._rows = np.arange(y0, y1, dtype=np.float32)[:, None]
        self._mouth_src = self.base[y0:y1, x0:x1]
        # Paint teeth only where the source shows none: rows just above the line that are
        # brighter than the skin above the lips are teeth already (a smile).
        ly = int(self.lip_y)
        band = slice(max(0, int(self.mouth_cx - 0.5 * self.mouth_half)), int(self.mouth_cx + 0.5 * self.mouth_half) + 1)
        above = self.base[max(0, ly - max(2, int(0.03 * f.h))):ly, band].astype(np.float32).mean()
        skin = self.base[max(0, ly - int(0.16 * f.h)):max(1, ly - int(0.10 * f.h)), band].astype(np.float32).mean()
        self._paint_teeth = not above > skin + 10.0
        self._feather = max(0.8, 0.006 * f.h)  # px of soft edge at the lips, more on big faces

    def mouth_patch(self, openness: float) -> tuple[_Region, np.ndarray]:
        """The lower face with the mouth opened by ``openness`` (0..1)."""
        r = self._mouth
        f = self.face
        if openness <= 1e-3:
            return r, self._mouth_src
        amp = min(MOUTH_OPEN_MAX * f.h, MOUTH_OPEN_ASPECT * 2 * self.mouth_half) * float(openness)
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
        # Paint the opening between the parted lips: soft-edged, darkest at the back, the
        # inner lips' red along its rim, a tongue low down and upper teeth when it is tall.
        gap_top, gap_bot = (ly - up)[None, :], (ly + down)[None, :]
        height = np.maximum(gap_bot - gap_top, 1e-3)
        edge = np.minimum(y - gap_top, gap_bot - y)  # px inside the opening
        inside = _smoothstep(edge / self._feather)  # 0 where the lips still touch
        depth = (y - gap_top) / height  # 0 at the upper lip, 1 at the lower lip
        rim = np.clip(1.0 - edge / (self._feather * 2.5), 0.0, 1.0)
        centre = np.clip(1.0 - np.abs(self._u) / 0.7, 0.0, 1.0)[None, :]  # teeth and tongue recede at the corners
        tall = np.clip((height - 4.0) / 8.0, 0.0, 1.0)
        colour = MOUTH_DARK + (TONGUE - MOUTH_DARK) * (_smoothstep((depth - 0.6) / 0.4) * tall * centre)[..., None]
        if self._paint_teeth:
            teeth = np.clip((0.3 - depth) / 0.12, 0.0, 1.0) * tall * 0.7 * centre
            colour = colour + (TEETH - colour) * teeth[..., None]
        colour = colour + (MOUTH_INNER_LIP - colour) * (rim * 0.6)[..., None]
        alpha = inside[..., None]
        blended = patch.astype(np.float32) * (1 - alpha) + colour * alpha
        return r, np.clip(blended, 0, 255).astype(np.uint8)

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
