"""Files an attacker sends to exhaust memory, built with PyAV and the standard library.

    lying_webm(path, hold_s=3600, claim_s=5)   # Opus in WebM: header says 5 s, holds an hour
    tiny_huge_png(path, 8000, 8000)             # a real, decodable PNG of 64 MP in ~100 KB

The WebM is real: every packet decodes. Ten seconds of speech-like Opus are encoded once
and their packets muxed again and again with later timestamps (encoding an hour would take
a minute), then the Segment's Duration element is rewritten to ``claim_s``.
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

RATE = 48_000
_DURATION_ID = b"\x44\x89"  # Matroska Segment Info > Duration (float, in TimestampScale units = ms)


def _opus_packets(seconds: float, bit_rate: int) -> list[tuple[int, bytes]]:
    """(pts in samples, payload) of ``seconds`` of a modulated tone, as Opus packets."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pcm = (0.4 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 32767).astype(np.int16)
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format = RATE, "mono", "s16"
    ctx.bit_rate = bit_rate
    ctx.time_base = Fraction(1, RATE)
    ctx.open()
    out: list[tuple[int, bytes]] = []
    step = 960
    for i in range(0, n - step + 1, step):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + step].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i, Fraction(1, RATE)
        out += [(i, bytes(p)) for p in ctx.encode(frame)]
    out += [(n, bytes(p)) for p in ctx.encode(None)]
    return [(pts, data) for pts, data in out if data], ctx.extradata


def lying_webm(path: str | Path, *, hold_s: float = 3600.0, claim_s: float = 5.0, bit_rate: int = 6000) -> Path:
    """A WebM whose header says ``claim_s`` seconds while it holds ``hold_s`` seconds of Opus."""
    path = Path(path)
    block_s = 10.0
    packets, extradata = _opus_packets(block_s, bit_rate)
    block = int(block_s * RATE)
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=RATE, layout="mono")
        stream.codec_context.extradata = extradata
        stream.time_base = Fraction(1, RATE)
        repeats = int(np.ceil(hold_s / block_s))
        for r in range(repeats):
            for pts, data in packets:
                packet = av.Packet(data)
                packet.stream = stream
                packet.pts = packet.dts = r * block + pts
                packet.time_base = Fraction(1, RATE)
                packet.duration = 960
                out.mux(packet)
    raw = bytearray(path.read_bytes())
    at = raw.find(_DURATION_ID)
    assert at > 0, "the muxer wrote no Duration element"
    size_byte = raw[at + 2]
    assert size_byte in (0x84, 0x88), f"unexpected Duration size {size_byte:#x}"
    if size_byte == 0x88:
        raw[at + 3 : at + 11] = struct.pack(">d", claim_s * 1000.0)
    else:
        raw[at + 3 : at + 7] = struct.pack(">f", claim_s * 1000.0)
    path.write_bytes(bytes(raw))
    return path


def tiny_huge_png(path: str | Path, width: int = 8000, height: int = 8000) -> Path:
    """A valid, fully decodable grey PNG of ``width`` x ``height`` that weighs a few hundred KB."""
    row = b"\x00" + b"\x80" * (width * 3)  # filter byte 0, mid-grey RGB
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return Path(path)
