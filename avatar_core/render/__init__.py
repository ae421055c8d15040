"""The offline local preview renderer: a still portrait and a voice track to an MP4.

It animates the picture with plain image warps (jaw driven by loudness, blinks, head sway);
it is a preview of framing and timing, not a substitute for a Kling AI Avatar render.
"""

from .video import NO_FACE_NOTE, RenderResult, TIER_BOX, output_size, render_video

__all__ = ["NO_FACE_NOTE", "TIER_BOX", "RenderResult", "output_size", "render_video"]
