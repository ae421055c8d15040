"""Face detection with OpenCV's bundled Haar cascades (no model download needed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Haar cascades are tuned for faces of roughly 24..500 px; detecting on a copy whose long
# side is at most this keeps a 12 MP photo check well under a second on 2 cores.
DETECT_MAX_SIDE = 800


@dataclass(frozen=True)
class FaceBox:
    """A face in image pixel coordinates of the image that was passed in."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


@functools.cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    clf = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if clf.empty():  # pragma: no cover - a broken OpenCV install
        raise RuntimeError(f"OpenCV cascade {name} could not be loaded")
    return clf


def _gray(image: Image.Image) -> tuple[np.ndarray, float]:
    scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
    small = image
    if scale < 1.0:
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    gray = np.asarray(small.convert("L"))
    return cv2.equalizeHist(gray), scale


def detect_faces(image: Image.Image) -> list[FaceBox]:
    """Faces found, largest first. Frontal faces first; profile faces if none are frontal."""
    gray, scale = _gray(image)
    min_side = max(24, int(min(gray.shape) * 0.08))
    found = []
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"):
        rects = _cascade(name).detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
        found = [tuple(int(v) for v in r) for r in rects] if len(rects) else []
        if found:
            break
    if not found:
        rects = _cascade("haarcascade_profileface.xml").detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
        )
        found = [tuple(int(v) for v in r) for r in rects] if len(rects) else []
    boxes = [
        FaceBox(round(x / scale), round(y / scale), round(w / scale), round(h / scale)) for (x, y, w, h) in found
    ]
    return sorted(boxes, key=lambda b: b.area, reverse=True)


def detect_eyes(image: Image.Image, face: FaceBox) -> list[FaceBox]:
    """Eyes inside the upper half of a face box, in image coordinates (may be empty)."""
    top = image.crop((face.x, face.y, face.x + face.w, face.y + face.h // 2 + face.h // 10))
    gray = cv2.equalizeHist(np.asarray(top.convert("L")))
    min_side = max(8, face.w // 10)
    rects = _cascade("haarcascade_eye.xml").detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side))
    eyes = [FaceBox(int(x) + face.x, int(y) + face.y, int(w), int(h)) for (x, y, w, h) in (rects if len(rects) else [])]
    return sorted(eyes, key=lambda b: b.area, reverse=True)[:2]
