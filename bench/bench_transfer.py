"""Uploads and downloads: peak memory growth while moving big files.

    python bench/bench_transfer.py            # about 40 s
    python bench/bench_transfer.py --quick    # 5 MB / 20 MB instead of 50 MB / 200 MB

Each transfer runs in a fresh child process against the emulator (itself another process,
so the bytes it holds are not counted). The child imports everything, makes its client,
sends one tiny file to warm up, and then measures: growth = peak resident set size after
the transfer minus the peak before it. The emulator checks what arrived (size, SHA-256).

- WaveSpeed, presigned PUT (the current SDK's two-step upload): ``provider.upload``;
- WaveSpeed, ``/media/upload/binary`` (multipart), the fallback when the two-step route is missing;
- Segmind, ``upload-asset`` (JSON with the file as a base64 data URL): ``provider.upload``;
- the finished video download: ``jobs.run_job`` with a stand-in provider whose job is
  already done and whose video URL is a 200 MB MP4-looking stream from the emulator.

The "whole file" rows do what the code did before it streamed (read the file, base64 it
into a JSON string), side by side for the ratio. Target (issue 8): growth under 32 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import EmulatorProcess, machine_line, peak_rss_mb, print_table, verdict, write_figures

GROWTH_TARGET_MB = 32.0
UPLOAD_BYTES = 50 * 1000 * 1000  # 50 MB: WaveSpeed's audio limit is 50 MiB, so this fits
DOWNLOAD_BYTES = 200 * 1000 * 1000

CASES = {
    # name: (what, streamed?)
    "wavespeed-put": ("WaveSpeed upload, presigned PUT", True),
    "wavespeed-binary": ("WaveSpeed upload, multipart /upload/binary", True),
    "segmind": ("Segmind upload, JSON data URL", True),
    "segmind-whole": ("Segmind upload, whole file in memory (before)", False),
    "download": ("video download (jobs.run_job)", True),
}


# ---------------------------------------------------------------------------- the child


async def _child(case: str, url: str, path: Path, tmp: Path) -> dict:
    import base64

    import httpx

    from _support import bench_settings, make_wav
    from avatar_core import jobs
    from avatar_core.events import Done, FailedEvent
    from avatar_core.providers.base import Completed, JobHandle, Processing
    from avatar_core.providers.segmind import SegmindProvider
    from avatar_core.providers.wavespeed import WaveSpeedProvider

    warm = make_wav(tmp / f"warm-{case}.wav", seconds=0.2)
    if case.startswith("wavespeed"):
        provider = WaveSpeedProvider("bench-key", base_url=url)
        if case == "wavespeed-binary":
            # The two-step route answers 404, so the client falls back to multipart (twice: warm-up, then the file).
            _post(url, "/bench/fault", {"kind": "status", "path": "/api/v3/media/uploads$", "status": 404, "count": 2})
        await provider.upload(warm, "audio/wav")
        before = peak_rss_mb()
        t0 = time.perf_counter()
        await provider.upload(path, "audio/mpeg")
    elif case == "segmind":
        provider = SegmindProvider("bench-key", base_url=url, upload_url=url + "/upload-asset")
        await provider.upload(warm, "audio/wav")
        before = peak_rss_mb()
        t0 = time.perf_counter()
        await provider.upload(path, "audio/mpeg")
    elif case == "segmind-whole":
        provider = SegmindProvider("bench-key", base_url=url, upload_url=url + "/upload-asset")
        await provider.upload(warm, "audio/wav")
        before = peak_rss_mb()
        t0 = time.perf_counter()
        # What segmind.py did before streaming: the file, its base64, the JSON, all in memory.
        raw = path.read_bytes()
        data_url = f"data:audio/mpeg;base64,{base64.b64encode(raw).decode('ascii')}"
        await provider.request("POST", provider.upload_url, json={"data_urls": [data_url]})
        del raw, data_url
    elif case == "download":
        video_url = f"{url}/bench/big.mp4?size={path.stat().st_size}"

        class Finished:
            """A stand-in provider: the job is already done; only the download is real."""

            name, supports_cancel = "wavespeed", False

            def __init__(self, video: str) -> None:
                self.video = video

            async def upload(self, p, content_type, progress=None):
                return "https://example.invalid/input"

            async def submit(self, request):
                return JobHandle("wavespeed", "bench-download", None)

            async def status(self, handle):
                return Completed(self.video) if self.video else Processing()

            async def result(self, handle):
                return Completed(self.video)

            async def cancel(self, handle):
                return False

            async def aclose(self):
                return None

        settings = bench_settings(url, tmp / f"out-{case}", max_video_bytes=2 * DOWNLOAD_BYTES)

        async def run(video: str) -> Path:
            last = None
            async for event in jobs.run_job("wavespeed", "https://example.invalid/a.png",
                                            "https://example.invalid/a.wav", settings=settings,
                                            client=Finished(video)):
                last = event
            if isinstance(last, FailedEvent) or not isinstance(last, Done):
                raise RuntimeError(f"the download failed: {last}")
            return last.path

        small = await run(f"{url}/bench/big.mp4?size=65536")  # warm-up
        small.unlink()
        before = peak_rss_mb()
        t0 = time.perf_counter()
        got = await run(video_url)
        seconds = time.perf_counter() - t0
        digest = hashlib.sha256()
        with got.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        expected = _expected_big_sha(path.stat().st_size)
        return {"before": before, "after": peak_rss_mb(), "seconds": seconds, "size": got.stat().st_size,
                "intact": digest.hexdigest() == expected}
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - t0
    after = peak_rss_mb()
    await provider.aclose()
    files = httpx.get(url + "/bench/files", timeout=60).json()["files"]
    want = _sha256(path)
    return {"before": before, "after": after, "seconds": seconds, "size": path.stat().st_size,
            "intact": any(f["sha256"] == want for f in files)}


def _post(url: str, path: str, payload) -> None:
    import httpx

    httpx.post(url + path, json=payload, timeout=30).raise_for_status()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_big_sha(size: int) -> str:
    from _support import MP4_HEAD

    digest = hashlib.sha256(MP4_HEAD)
    left, block = size - len(MP4_HEAD), b"\0" * (1 << 20)
    while left > 0:
        digest.update(block[:min(left, len(block))])
        left -= len(block)
    return digest.hexdigest()


def child_main(case: str, url: str, path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(_child(case, url, Path(path), Path(tmp)))))


# ---------------------------------------------------------------------------- the parent


def run_case(case: str, url: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", case, url, str(path)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_noise(path: Path, size: int) -> Path:
    """``size`` bytes that do not compress (as real MP3 data does not)."""
    with path.open("wb") as fh:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            fh.write(os.urandom(n))
            left -= n
    return path


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        child_main(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 MB and 20 MB (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    args = parser.parse_args(argv)
    up, down = (UPLOAD_BYTES // 10, DOWNLOAD_BYTES // 10) if args.quick else (UPLOAD_BYTES, DOWNLOAD_BYTES)
    print(f"# Uploads and downloads: memory\n\n{machine_line()}")
    rows, figures, results = [], [], {}
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess() as emu:
        audio = write_noise(Path(tmp) / "voice.mp3", up)
        video_size = Path(tmp) / "video.size"
        video_size.write_bytes(b"")
        os.truncate(video_size, down)  # a sparse file: only its size is used (the stream's length)
        for case, (what, streamed) in CASES.items():
            path = video_size if case == "download" else audio
            r = run_case(case, emu.url, path)
            results[case] = r
            growth = r["after"] - r["before"]
            mb = r["size"] / 1e6
            met = growth < GROWTH_TARGET_MB
            rows.append([what, f"{mb:.0f} MB", f"{growth:.1f} MB", f"{mb / r['seconds']:.0f} MB/s",
                         "yes" if r["intact"] else "**NO**",
                         verdict(met) if streamed else "(reference)"])
            if streamed:
                figures.append(("transfers", f"{what}: memory growth", f"{growth:.1f} MB ({mb:.0f} MB file)",
                                f"< {GROWTH_TARGET_MB:.0f} MB", met and r["intact"]))
    whole = results["segmind-whole"]["after"] - results["segmind-whole"]["before"]
    streamed = results["segmind"]["after"] - results["segmind"]["before"]
    print_table("Peak memory growth during one transfer",
                ["transfer", "size", "peak growth", "speed", "arrived intact", f"< {GROWTH_TARGET_MB:.0f} MB"], rows)
    print(f"\nSegmind streamed vs whole-file: {streamed:.1f} MB vs {whole:.1f} MB "
          f"({streamed / whole:.1%} of the memory).")
    if args.json:
        write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
