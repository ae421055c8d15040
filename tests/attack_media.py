"""Files an attacker sends to exhaust memory, built with PyAV and the standard library.

    lying_webm(path, hold_s=3600, claim_s=5)   # Opus in WebM: header says 5 s, holds an hour
    tiny_huge_png(path, 8000, 8000)             # a real, decodable PNG of 64 MP in ~100 KB
    high_rate_flac(path, 655350, 290.0)         # ~100 KB of FLAC: 290 s at 655350 Hz stereo, not silent
    grey16_png(path, 5470, 5470)                # ~65 KB 16-bit grey PNG, just under 30 MP

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


_OPUS_FRAME = 960  # 20 ms at 48 kHz: one Opus packet each


def _opus_packets(seconds: float, bit_rate: int) -> tuple[list[bytes], bytes]:
    """(payloads of 20 ms each, codec extradata) for ``seconds`` of a modulated tone as Opus."""
    n = int(seconds * RATE) // _OPUS_FRAME * _OPUS_FRAME
    t = np.arange(n) / RATE
    pcm = (0.4 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 32767).astype(np.int16)
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format = RATE, "mono", "s16"
    ctx.bit_rate = bit_rate
    ctx.time_base = Fraction(1, RATE)
    ctx.open()
    out: list[bytes] = []
    for i in range(0, n, _OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + _OPUS_FRAME].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i, Fraction(1, RATE)
        out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    return [data for data in out if data], ctx.extradata


def lying_webm(path: str | Path, *, hold_s: float = 3600.0, claim_s: float = 5.0, bit_rate: int = 6000) -> Path:
    """A WebM whose header says ``claim_s`` seconds while it holds ``hold_s`` seconds of Opus."""
    path = Path(path)
    packets, extradata = _opus_packets(min(10.0, hold_s), bit_rate)
    total = int(hold_s * RATE) // _OPUS_FRAME
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=RATE, layout="mono")
        stream.codec_context.extradata = extradata
        stream.time_base = Fraction(1, RATE)
        for k in range(total):  # the same 10 s again and again, each packet 20 ms after the last
            packet = av.Packet(packets[k % len(packets)])
            packet.stream = stream
            packet.pts = packet.dts = k * _OPUS_FRAME
            packet.time_base = Fraction(1, RATE)
            packet.duration = _OPUS_FRAME
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


def high_rate_flac(path: str | Path, rate: int = 655_350, seconds: float = 290.0, *, channels: int = 2,
                   level: int = 8000) -> Path:
    """A real FLAC at ``rate`` Hz (655350 is FLAC's highest): a constant level, which is not
    silence (-12 dBFS) and which FLAC stores in a few bytes per block, so 290 s weigh ~100 KB."""
    path = Path(path)
    layout = "stereo" if channels == 2 else "mono"
    block = 65536
    total = int(rate * seconds)
    pcm = np.full((1, block * channels), level, dtype=np.int16)
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout=layout)
        stream.codec_context.format = "s16"
        for pts in range(0, total, block):
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def grey16_png(path: str | Path, width: int = 5470, height: int = 5470) -> Path:
    """A valid 16-bit greyscale PNG of ``width`` x ``height`` (29.9 MP by default, under the
    30 MP cap) that weighs a few tens of KB: every pixel is 0x8000."""
    row = b"\x00" + b"\x80\x00" * width
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return Path(path)
