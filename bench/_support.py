"""Shared pieces of the benchmarks: tables, tiny inputs, and an emulator in its own process.

Not a benchmark itself. ``python bench/_support.py serve`` runs the loopback emulator
(cheap tone videos) plus a few ``/bench/`` control routes, and prints its URL on the
first line; the benchmarks start it as a child process so its CPU and memory are not
counted as the client's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import wave
import zlib
from pathlib import Path
from collections.abc import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import stop_process  # noqa: E402  (shared with the tests)

# An MP4 starts with a box whose type is "ftyp"; the job loop checks exactly this.
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


# ---------------------------------------------------------------------------- output


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A Markdown table (pasteable into bench/README.md as is)."""
    rows = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between neighbours; NaN for no values."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**MISSED**"


def write_figures(path: Path, figures: Iterable[Sequence[object]]) -> None:
    """The headline figures for run_all.py: (area, figure, value, target, met: bool or None)."""
    rows = [{"area": a, "figure": f, "value": v, "target": t, "met": m} for a, f, v, t, m in figures]
    Path(path).write_text(json.dumps(rows, indent=1))


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, load average {load:.2f} at start"


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------- inputs


def make_png(path: Path, size: tuple[int, int] = (64, 80), colour=(180, 140, 120)) -> Path:
    """A tiny solid PNG written with the standard library."""
    w, h = size
    raw = b"".join(b"\x00" + bytes(colour) * w for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def make_wav(path: Path, seconds: float = 1.0, rate: int = 16_000) -> Path:
    """A quiet 220 Hz tone as 16-bit mono WAV."""
    n = int(seconds * rate)
    samples = (int(3000 * math.sin(2 * math.pi * 220 * i / rate)) for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return path


def bench_settings(base_url: str, output_dir: Path, **overrides):
    """Settings pointing WaveSpeed and Segmind at the emulator, with a dummy key."""
    from dataclasses import replace

    from avatar_core.config import Secret, load_settings

    base = load_settings(env={}, dotenv_path=None)
    return replace(
        base,
        wavespeed_api_key=Secret("bench-key"),
        segmind_api_key=Secret("bench-key"),
        wavespeed_base_url=base_url,
        segmind_base_url=base_url,
        segmind_upload_url=base_url + "/upload-asset",
        output_dir=output_dir,
        **overrides,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- emulator process


class SharedClock:
    """A virtual clock two processes share through an 8-byte file mapped into memory.

    The benchmark's job loop moves it (``advance``) instead of sleeping; the emulator in
    its own process reads it (``SharedClock(path)()``) for every request it times. Reading
    is a memory access, so virtual time costs no HTTP round trips.
    """

    def __init__(self, path: Path, start: float | None = None) -> None:
        import mmap

        self.path = Path(path)
        if start is not None:
            self.path.write_bytes(struct.pack("<d", start))
        self._fh = self.path.open("r+b")
        self._map = mmap.mmap(self._fh.fileno(), 8)

    def __call__(self) -> float:
        return struct.unpack_from("<d", self._map, 0)[0]

    def set(self, when: float) -> None:
        struct.pack_into("<d", self._map, 0, when)

    def advance(self, seconds: float) -> float:
        now = self() + seconds
        self.set(now)
        return now

    def close(self) -> None:
        self._map.close()
        self._fh.close()


class EmulatorProcess:
    """The emulator in a child process; ``with EmulatorProcess() as emu: emu.url``.

    ``clock_file``: a :class:`SharedClock` file the emulator reads its time from (virtual
    time); without it the emulator uses ``time.monotonic`` (the same clock as ours on Linux).
    """

    def __init__(self, queue_s: float = 0.2, processing_s: float = 0.5, clock_file: Path | None = None) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "serve",
                     "--queue-s", str(queue_s), "--processing-s", str(processing_s)]
        if clock_file is not None:
            self.args += ["--clock-file", str(clock_file)]
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> EmulatorProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the emulator did not start (said {line!r})")
        self.url = line
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def cpu_seconds(self) -> float:
        """User+system CPU of the emulator process so far (from /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    # The control routes (see BenchControl below), through one plain httpx client.
    def post(self, path: str, payload) -> dict:
        return self._control().post(self.url + path, json=payload).json()

    def get(self, path: str) -> dict:
        return self._control().get(self.url + path).json()

    def _control(self):
        import httpx

        if getattr(self, "_client", None) is None:
            self._client = httpx.Client(timeout=60)
        return self._client


def _control_protocol():
    from avatar_core.emulator import Fault, JobPlan
    from avatar_core.emulator.server import Protocol, Response, json_response

    class BenchControl(Protocol):
        """Control routes for a benchmark driving this emulator from another process."""

        name = "bench"
        prefixes = ("/bench/",)

        def routes(self):
            return [
                ("POST", r"/bench/plans", self.plans),
                ("POST", r"/bench/fault", self.fault),
                ("POST", r"/bench/complete", self.complete),
                ("POST", r"/bench/forget", self.forget),
                ("GET", r"/bench/job/(?P<id>[^/]+)", self.job),
                ("GET", r"/bench/report", self.report),
                ("GET", r"/bench/count", self.count),
                ("GET", r"/bench/files", self.files),
                ("GET", r"/bench/big\.mp4", self.big),
            ]

        def plans(self, ctx):
            self.emu.plan_jobs(*(JobPlan(**p) for p in ctx.request.json))
            return json_response(200, {"ok": True})

        def fault(self, ctx):
            self.emu.faults.add(Fault(**ctx.request.json))
            return json_response(200, {"ok": True})

        def complete(self, ctx):
            """``{"id", "at"}``: that job finishes at ``at`` (the emulator's clock)."""
            self.emu.complete_job_at(ctx.request.json["id"], float(ctx.request.json["at"]))
            return json_response(200, {"ok": True})

        def job(self, ctx):
            """One WaveSpeed job: when it ended and the times of its status reads."""
            job = self.emu.job(ctx.match["id"])
            pattern = rf"^/api/v3/predictions/{job.id}/result$"
            reads = [r.at for r in self.emu.requests.to("GET", pattern)]
            return json_response(200, {"id": job.id, "ends_at": job.ends_at, "reads": reads})

        def forget(self, ctx):
            """Drop the request log and the finished jobs (keeps a long run's memory flat)."""
            self.emu.requests.clear()
            for job_id in ctx.request.json.get("jobs", []):
                self.emu.jobs.pop(job_id, None)
            return json_response(200, {"ok": True})

        def count(self, ctx):
            """How many requests so far had a path matching ``?path=`` (a regex)."""
            return json_response(200, {"count": len(self.emu.requests.to(None, ctx.request.param("path") or ".*"))})

        def report(self, ctx):
            """Per job: when it ended, when a status read first saw it ended, how many reads."""
            reads: dict[str, list[float]] = {}
            for r in self.emu.requests.to("GET", r"^/api/v3/predictions/[^/]+/result$"):
                reads.setdefault(r.path.split("/")[4], []).append(r.at)
            jobs = []
            for job in list(self.emu.jobs.values()):
                at = reads.get(job.id, [])
                seen = [t for t in at if t >= job.ends_at]
                jobs.append({"id": job.id, "submitted_at": job.submitted_at, "ends_at": job.ends_at,
                             "first_seen": min(seen) if seen else None, "reads": len(at)})
            return json_response(200, {"jobs": jobs, "requests": len(self.emu.requests)})

        def files(self, ctx):
            return json_response(200, {"files": [
                {"id": f.id, "size": len(f.data or b""), "sha256": hashlib.sha256(f.data or b"").hexdigest()}
                for f in list(self.emu.files.values())]})

        def big(self, ctx):
            """An MP4 head followed by zeros, ``?size=`` bytes in all, streamed."""
            size = int(ctx.request.param("size") or 0)

            def body():
                yield MP4_HEAD
                left, block = size - len(MP4_HEAD), b"\0" * (256 * 1024)
                while left > 0:
                    yield block if left >= len(block) else block[:left]
                    left -= len(block)

            return Response(200, body(), "video/mp4", length=size)

    return BenchControl


def serve_main(argv: Sequence[str]) -> None:
    import argparse

    from avatar_core.emulator import Emulator, tone_video_maker
    from avatar_core.emulator.segmind import SegmindProtocol
    from avatar_core.emulator.wavespeed import WaveSpeedProtocol

    parser = argparse.ArgumentParser()
    parser.add_argument("--queue-s", type=float, default=0.2)
    parser.add_argument("--processing-s", type=float, default=0.5)
    parser.add_argument("--clock-file", type=Path, default=None)
    args = parser.parse_args(argv)
    clock = SharedClock(args.clock_file) if args.clock_file else time.monotonic
    emu = Emulator(queue_s=args.queue_s, processing_s=args.processing_s, video_maker=tone_video_maker,
                   clock=clock, protocols=(WaveSpeedProtocol, SegmindProtocol, _control_protocol()))
    emu.start()
    print(emu.url, flush=True)
    try:
        emu.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_main(sys.argv[2:])
    else:
        print(__doc__)
