"""Image and audio checks, conversion, face check, previews, safe URL fetching and prices.

The app and the CLI call :func:`check_image`, :func:`check_audio` and
:func:`prepare_inputs` (in :mod:`avatar_core.media.inputs`); the local renderer uses
:func:`loudness_envelope`. Submodules are imported lazily, so ``import avatar_core.media``
stays cheap and ``avatar_core.media.face`` can be used on its own.

Importing this package teaches Pillow to open HEIC/HEIF photos (what iPhones save) through
pillow-heif, so every loader that goes through Pillow (the input checks and the local
renderer alike) reads them.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    from pillow_heif import register_heif_opener
except ImportError:  # pragma: no cover - an install without pillow-heif refuses HEIC with a clear message
    pass
else:
    register_heif_opener()

_EXPORTS = {
    "check_image": "inputs",
    "check_audio": "inputs",
    "prepare_inputs": "inputs",
    "ImageCheck": "inputs",
    "AudioCheck": "inputs",
    "PreparedInputs": "inputs",
    "estimate_cost": "pricing",
    "CostEstimate": "pricing",
    "PRICE_TABLE": "pricing",
    "loudness_envelope": "audio",
    "AUDIO_LIMITS": "audio",
    "FaceBox": "face",
    "detect_faces": "face",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the names of the lazy exports below


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'avatar_core.media' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
