"""Small helpers many tests share: collecting job events, checking an MP4, a free port,
launching the app on 127.0.0.1."""

from __future__ import annotations

import socket
from pathlib import Path

import av


async def collect(gen) -> list:
    """Every event an async generator yields, in order."""
    return [e async for e in gen]


def check_mp4(path: Path, seconds: float) -> None:
    """An H.264 + AAC MP4 as long as the voice clip (within 0.1 s)."""
    with av.open(str(path)) as c:
        assert c.streams.video and c.streams.audio, "video and audio streams expected"
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"
        assert abs(c.duration / 1e6 - seconds) <= 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(gen, kind: type):
    """Consume job events up to the first of type ``kind`` and return it (the job goes on)."""
    async for event in gen:
        if isinstance(event, kind):
            return event
    raise AssertionError(f"the job ended without a {kind.__name__} event")
