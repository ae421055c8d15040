"""The preview's mouth as a viewer sees it: closed lips without a dark line across them, and
an opening that stays between the lips' corners, under the nose, at the line between the lips.

Where the lips are is known independently of the renderer: for the bundled drawing from the
constants it was drawn with (and its red pixels), for the astronaut photo from a hand
measurement of its 512x512 pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from avatar_core.media.face import detect_eyes, detect_faces
from avatar_core.render.motion import FaceAnimator
from avatar_core.render.video import _resize, _scale_box, load_image, output_size

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_examples as drawing  # noqa: E402

PORTRAIT = ROOT / "examples" / "portrait.jpg"


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)


def animator(image) -> FaceAnimator:
    """The animator exactly as render_video builds it for this picture."""
    img = load_image(image)
    width, height = output_size(img.width, img.height)
    faces = detect_faces(img)
    assert faces, "no face found"
    sx, sy = width / img.width, height / img.height
    eyes = [_scale_box(e, sx, sy) for e in detect_eyes(img, faces[0])]
    return FaceAnimator(_resize(img, (width, height)), _scale_box(faces[0], sx, sy), eyes, 25)


def frame_at(anim: FaceAnimator, openness: float) -> np.ndarray:
    out = anim.base.copy()
    region, patch = anim.mouth_patch(openness)
    out[region.y0:region.y1, region.x0:region.x1] = patch
    return out


def opening(anim: FaceAnimator, openness: float) -> np.ndarray:
    """The pixels the open mouth turned dark (the largest such blob), as a boolean mask."""
    before, after = luma(anim.base), luma(frame_at(anim, openness))
    dark = ((after < 80) & (before - after > 25)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    assert n > 1, "the mouth did not open"
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


class Lips:
    """Where the lips really are: corners (x), centre x, the line between them (y), top, bottom."""

    def __init__(self, left: float, right: float, line: float, top: float, bottom: float) -> None:
        self.left, self.right, self.line, self.top, self.bottom = left, right, line, top, bottom
        self.cx = (left + right) / 2
        self.width = right - left


def drawn_lips() -> Lips:
    """The example's lips from the constants they were drawn with (the file is 720x960 and
    renders at that size)."""
    w, h = drawing.WIDTH, drawing.HEIGHT
    cx, cy = w * drawing.FACE_CENTRE[0], h * drawing.FACE_CENTRE[1]
    fw, fh = w * drawing.FACE_HALF_SIZE[0], h * drawing.FACE_HALF_SIZE[1]
    seam = cy + fh * drawing.MOUTH_Y
    half = fw * drawing.MOUTH_HALF_WIDTH
    return Lips(cx - half, cx + half, seam, seam - fh * drawing.UPPER_LIP, seam + fh * drawing.LOWER_LIP)


# Measured by eye on skimage's astronaut at 10x: mouth corners at x 203 and 243, the upper
# lip from y 139, the gap between the upper and lower teeth at y 147, the lower lip to y 153.
ASTRONAUT_LIPS = Lips(203, 243, 147, 139, 153)


@pytest.fixture(scope="module")
def example() -> tuple[FaceAnimator, Lips]:
    return animator(PORTRAIT), drawn_lips()


@pytest.fixture(scope="module")
def astronaut() -> tuple[FaceAnimator, Lips]:
    return animator(Image.fromarray(data.astronaut())), ASTRONAUT_LIPS


def test_the_example_is_drawn_with_the_lips_where_the_drawing_says(example):
    anim, lips = example
    assert anim.base.shape[:2] == (drawing.HEIGHT, drawing.WIDTH)  # rendered at the drawing's own size
    ycc = cv2.cvtColor(anim.base, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    skin_cr = float(np.median(ycc[int(lips.top) - 40:int(lips.top) - 10, int(lips.left):int(lips.right), 1]))
    red = ycc[:, :, 1] > skin_cr + 6
    rows = np.flatnonzero(red[:, int(lips.left):int(lips.right)].any(axis=1))
    rows = rows[(rows > lips.top - 30) & (rows < lips.bottom + 30)]
    cols = np.flatnonzero(red[int(lips.line)])
    cols = cols[(cols > lips.left - 30) & (cols < lips.right + 30)]
    # The red of the lips spans the drawn width and height (soft edges: a few pixels either way).
    assert abs(cols.min() - lips.left) <= 6 and abs(cols.max() - lips.right) <= 6, (cols.min(), cols.max())
    assert abs(rows.min() - lips.top) <= 8 and abs(rows.max() - lips.bottom) <= 6, (rows.min(), rows.max())


def test_closed_example_lips_have_no_dark_line_across_them(example):
    anim, lips = example
    closed = luma(frame_at(anim, 0.0))
    band = closed[:, int(lips.cx - 0.6 * lips.width / 2):int(lips.cx + 0.6 * lips.width / 2)].mean(axis=1)
    # Across the red of both lips (their soft outer edges left out), no row is a dark seam:
    # none is darker than the lip within a few pixels above and below it by more than a trace.
    ys = np.arange(int(lips.top) + 4, int(lips.bottom) - 3)
    reach = 6
    seam = [min(band[y - reach:y].max(), band[y + 1:y + 1 + reach].max()) - band[y] for y in ys]
    assert max(seam) < 8.0, (int(ys[int(np.argmax(seam))]), max(seam))
    # Lips, not skin: clearly darker and redder than the skin between the nose and the mouth.
    skin = closed[int(lips.top) - 30:int(lips.top) - 15, int(lips.left):int(lips.right)].mean()
    assert band[int(lips.line)] < skin - 15


@pytest.mark.parametrize("face", ["example", "astronaut"])
def test_the_opening_starts_at_the_line_between_the_lips(face, request):
    anim, lips = request.getfixturevalue(face)
    tolerance = max(3.0, 0.015 * anim.face.h)
    assert abs(anim.lip_y - lips.line) <= tolerance, (anim.lip_y, lips.line)
    mask = opening(anim, 0.3)
    ys = np.flatnonzero(mask.any(axis=1))
    assert ys.min() - 1 <= lips.line <= ys.max() + 1, (ys.min(), ys.max(), lips.line)


@pytest.mark.parametrize("face", ["example", "astronaut"])
@pytest.mark.parametrize("openness", [0.6, 1.0])
def test_the_open_mouth_stays_between_the_lips_corners_under_the_nose(face, openness, request):
    anim, lips = request.getfixturevalue(face)
    mask = opening(anim, openness)
    xs = np.flatnonzero(mask.any(axis=0))
    width = xs.max() - xs.min() + 1
    assert width <= lips.width, (width, lips.width)  # not a crescent wider than the lips
    assert width >= 0.6 * lips.width, (width, lips.width)  # but open across the mouth
    centre = (xs.min() + xs.max()) / 2
    assert abs(centre - lips.cx) <= 0.08 * lips.width, (centre, lips.cx)
    f = anim.face
    assert abs(centre - (f.x + f.w / 2)) <= 0.05 * f.w  # under the nose: the face's centre line
    ys = np.flatnonzero(mask.any(axis=1))
    assert ys.min() >= lips.top - 0.02 * f.h  # the upper lip lifts a little, not to the nose


@pytest.mark.parametrize("face", ["example", "astronaut"])
def test_the_open_mouth_is_rounded_and_widest_open_in_the_middle(face, request):
    anim, lips = request.getfixturevalue(face)
    mask = opening(anim, 1.0)
    xs = np.flatnonzero(mask.any(axis=0))
    cx, half = (xs.min() + xs.max()) // 2, (xs.max() - xs.min()) / 2

    def height(x: float) -> int:
        return int(mask[:, int(round(x))].sum())

    middle = height(cx)
    assert middle >= 0.04 * anim.face.h  # a visibly open mouth at full loudness
    for side in (-1, 1):
        assert height(cx + side * 0.7 * half) < 0.85 * middle  # narrowing towards the corners
    # The lower lip drops furthest in the middle (a slot would be flat).
    bottoms = [int(np.flatnonzero(mask[:, int(round(x))]).max()) for x in (cx - 0.7 * half, cx, cx + 0.7 * half)]
    assert bottoms[1] > max(bottoms[0], bottoms[2]), bottoms


def test_the_example_opening_has_soft_edges(example):
    anim, lips = example
    column = luma(frame_at(anim, 1.0))[:, int(lips.cx)]
    top, bottom = int(lips.line) - 40, int(lips.line) + 60
    steps = np.abs(np.diff(column[top:bottom]))
    contrast = column[top:bottom].max() - column[top:bottom].min()
    # From lip to dark interior over a few pixels, not in one hard step.
    assert steps.max() < 0.5 * contrast, (steps.max(), contrast)
