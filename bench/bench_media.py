"""Media benchmarks: input checks and the local preview renderer's speed.

    python bench/bench_media.py            # about a minute on 2 cores

Prints one table. Inputs are synthesised in a temporary folder (a 12 MP JPEG portrait, a
5-minute MP3, 10 s voice tracks); nothing touches the network. Targets: the image check
well under 2 s, the audio probe well under 1 s, the renderer at least 2x real time at 720p.
Other processes on the machine slow every figure down: the load average is printed too,
and "CPU-s per video-s" (core-seconds spent per second of video) barely depends on them:
at or below 1.0 means 2x real time is reachable on two free cores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from avatar_core.render import render_video

RENDER_SECONDS = 10.0  # long enough to average out start-up, short enough to keep the bench quick
RENDER_TARGET = 2.0  # seconds of 720p video per second of wall time


def make_portrait(path: Path, size: tuple[int, int]) -> Path:
    """The astronaut's face on a textured background, ``size`` pixels, saved as JPEG."""
    rng = np.random.default_rng(1)
    w, h = size
    noise = rng.integers(150, 200, size=(h // 8, w // 8, 3), dtype=np.uint8)
    canvas = Image.fromarray(noise).resize((w, h), Image.BILINEAR)
    side = int(min(w, h) * 0.8)
    canvas.paste(Image.fromarray(data.astronaut()).resize((side, side), Image.LANCZOS), ((w - side) // 2, (h - side) // 2))
    canvas.save(path, quality=92)
    return path


def voice_pcm(seconds: float, rate: int) -> np.ndarray:
    """A 180 Hz buzz whose loudness rises and falls like syllables, with short pauses."""
    t = np.arange(int(seconds * rate)) / rate
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 3.3 * t)
    phrases = (np.sin(2 * np.pi * 0.25 * t) > -0.6).astype(np.float64)
    sig = 0.4 * syllables * phrases * (np.sin(2 * np.pi * 180 * t) + 0.3 * np.sin(2 * np.pi * 540 * t))
    return (np.clip(sig, -1, 1) * 32767).astype(np.int16)


def write_audio(path: Path, seconds: float, codec: str, rate: int = 44_100) -> Path:
    pcm = voice_pcm(seconds, rate)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, layout="mono")
        if codec == "libmp3lame":
            s.bit_rate = 128_000
        chunk = rate  # one second per frame keeps memory flat
        for start in range(0, len(pcm), chunk):
            part = pcm[start:start + chunk]
            fmt = "s16p" if codec == "libmp3lame" else "s16"
            frame = av.AudioFrame.from_ndarray(part[None, :], format=fmt, layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return path


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_image(tmp: Path) -> tuple[str, str, str]:
    jpeg = make_portrait(tmp / "portrait_12mp.jpg", (4000, 3000))
    try:
        from avatar_core.config import load_settings
        from avatar_core.media.inputs import check_image

        settings = dataclasses.replace(load_settings(env={}, dotenv_path=None), output_dir=tmp / "out")

        def run():
            # A fresh output folder each time, so the provider-ready copy is really re-encoded.
            s = dataclasses.replace(settings, output_dir=tmp / f"out{time.perf_counter_ns()}")
            return check_image(jpeg, settings=s)

        label = "check_image (load, checks, face check, re-encode)"
        seconds, check = timed(run, repeat=2)
        faces = len(check.faces)
    except ImportError:
        from PIL import ImageOps

        from avatar_core.media.face import detect_faces

        def run():
            with Image.open(jpeg) as im:
                return detect_faces(ImageOps.exif_transpose(im).convert("RGB"))

        label = "PIL open + exif_transpose + detect_faces (no check_image yet)"
        seconds, found = timed(run, repeat=2)
        faces = len(found)
    return (f"12 MP JPEG: {label}", f"{seconds:.2f} s", f"{faces} face(s), {jpeg.stat().st_size / 1e6:.1f} MB")


def bench_probe(tmp: Path) -> tuple[str, str, str]:
    t0 = time.perf_counter()
    mp3 = write_audio(tmp / "voice_5min.mp3", 300.0, "libmp3lame")
    made = time.perf_counter() - t0
    try:
        from avatar_core.media.audio import probe

        label = "avatar_core.media.audio.probe"
        seconds, info = timed(lambda: probe(mp3), repeat=3)
        duration = info.duration_s
    except ImportError:
        def run():
            with av.open(str(mp3)) as c:
                return c.duration / av.time_base

        label = "PyAV open + duration (no probe yet)"
        seconds, duration = timed(run, repeat=3)
    return (f"5-min MP3: {label}", f"{seconds * 1000:.1f} ms",
            f"{duration:.1f} s long, {mp3.stat().st_size / 1e6:.1f} MB (made in {made:.1f} s)")


def bench_render(tmp: Path, tier: str, size: tuple[int, int]) -> tuple[str, str, str]:
    image = make_portrait(tmp / f"portrait_{size[0]}x{size[1]}.jpg", size)
    voice = write_audio(tmp / "voice_10s.wav", RENDER_SECONDS, "pcm_s16le")
    out = tmp / f"render_{tier}.mp4"
    cpu0 = time.process_time()
    seconds, result = timed(lambda: render_video(image, voice, out, tier=tier))
    cpu = time.process_time() - cpu0
    speed = result.duration_s / seconds
    verdict = ""
    if tier == "standard":
        verdict = " (target >= 2x: " + ("met)" if speed >= RENDER_TARGET else "MISSED)")
    return (
        f"render {tier} {result.width}x{result.height} @ {result.fps} fps, {result.duration_s:.0f} s of audio",
        f"{speed:.2f}x real time",
        f"{seconds:.1f} s wall, {cpu / result.duration_s:.2f} CPU-s per video-s, "
        f"{out.stat().st_size / 1e6:.1f} MB{verdict}",
    )


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_media_") as tmp_name:
        tmp = Path(tmp_name)
        rows.append(bench_image(tmp))
        rows.append(bench_probe(tmp))
        rows.append(bench_render(tmp, "standard", (1920, 1080)))
        rows.append(bench_render(tmp, "pro", (1920, 1080)))
    widths = [max(len(r[i]) for r in rows + [("what", "time", "notes")]) for i in range(3)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format("what", "time", "notes"))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(f"total {time.perf_counter() - started:.0f} s, load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        from _support import write_figures

        image_s = float(rows[0][1].split()[0])
        probe_ms = float(rows[1][1].split()[0])
        speed = {tier: float(row[1].split("x")[0]) for tier, row in (("standard", rows[2]), ("pro", rows[3]))}
        write_figures(args.json, [
            ("inputs", "12 MP JPEG image check", rows[0][1], "< 2 s", image_s < 2.0),
            ("inputs", "5-min MP3 probe", rows[1][1], "< 1 s", probe_ms < 1000.0),
            ("renderer", "local preview, standard 720p", rows[2][1], f">= {RENDER_TARGET:g}x", speed["standard"] >= RENDER_TARGET),
            ("renderer", "local preview, pro 1080p", rows[3][1], "(none set)", None),
        ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
