"""Many jobs in one process: 200 WaveSpeed jobs polling the emulator at once.

    python bench/bench_many_jobs.py            # about 90 s
    python bench/bench_many_jobs.py --quick    # about 15 s (20 jobs)

Real time, real sockets. The emulator runs in a child process, so its CPU and memory are
not counted; what is measured is this process: the job loop (``jobs.run_job``), the
WaveSpeed client, the heartbeats, and the download and duration probe of finished videos.

Steady state, the way a busy server sees it: each of the 200 jobs is dropped at a random
point of its life (age uniform in [0, duration), durations log-normal sigma 0.25 around
460 s standard / 730 s pro), polling from that age on with the default adaptive plan
(``PollSchedule.for_job`` shifted by the age). The emulator is told when each job ends.
When a job finishes, a new one (age 0) takes its place, so 200 are always in flight.

Figures, over a measurement window that starts once all 200 are submitted:
- CPU: user+system seconds of this process / wall seconds (share of one core), and per
  job-minute;
- memory: peak resident set size of the whole process (Python, httpx, PyAV included);
- notice delay: from the moment the emulator's job ended to the moment the job loop
  reported "downloading" (the status read that saw it, plus the video request's headers);
- event-loop lag: how late a 100 ms timer fires while all of this runs.
Targets (issue 8): under 5% of one core and under 300 MB for all 200.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    EmulatorProcess,
    bench_settings,
    current_rss_mb,
    machine_line,
    make_png,
    make_wav,
    peak_rss_mb,
    percentile,
    print_table,
    verdict,
    write_figures,
)

TYPICAL = {"standard": 460.0, "pro": 730.0}
SIGMA = 0.25
PRO_SHARE = 0.4
CPU_TARGET = 0.05  # share of one core, for all jobs together
RSS_TARGET_MB = 300.0
SETTLE_S = 3.0  # after the last submit, before the window opens (the start-up burst passes)


class AgedSchedule:
    """The job loop's own polling plan, for a job that is already ``age`` seconds old."""

    def __init__(self, inner, age: float) -> None:
        self.inner, self.age = inner, age
        self.typical_s = inner.typical_s
        self.fast_interval_s = inner.fast_interval_s

    def interval(self, elapsed: float) -> float:
        return self.inner.interval(elapsed + self.age)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Swarm:
    """Keeps ``n`` jobs in flight until told to stop; records when each finished job was noticed."""

    def __init__(self, emu: EmulatorProcess, settings, image: str, audio: str, seed: int) -> None:
        self.emu, self.settings, self.image, self.audio = emu, settings, image, audio
        self.rng = random.Random(seed)
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()
        self.submitted = 0
        self.noticed: list[dict] = []  # {"ends_at", "noticed_at"}
        self.failures: list[str] = []
        self.control = None
        self.control_lock = asyncio.Lock()

    def start(self, aged: bool) -> asyncio.Task:
        tier = "pro" if self.rng.random() < PRO_SHARE else "standard"
        duration = TYPICAL[tier] * math.exp(self.rng.gauss(0.0, SIGMA))
        age = self.rng.uniform(0.0, duration) if aged else 0.0
        task = asyncio.create_task(self.one_job(tier, age, duration - age))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def one_job(self, tier: str, age: float, remaining: float) -> None:
        from avatar_core import jobs
        from avatar_core.events import Done, Downloading, FailedEvent, Submitted
        from avatar_core.polling import PollSchedule

        schedule = AgedSchedule(PollSchedule.for_job("wavespeed", tier), age)
        ends_at = None
        async for event in jobs.run_job("wavespeed", self.image, self.audio, tier=tier, settings=self.settings,
                                        schedule=schedule):
            if isinstance(event, Submitted):
                ends_at = time.monotonic() + remaining  # the emulator's clock is ours (CLOCK_MONOTONIC)
                async with self.control_lock:  # one connection: the bench's own traffic stays small
                    await self.control.post(self.emu.url + "/bench/complete",
                                            json={"id": event.request_id, "at": ends_at})
                self.submitted += 1
            elif isinstance(event, Downloading) and event.received == 0:
                self.noticed.append({"ends_at": ends_at, "noticed_at": time.monotonic()})
            elif isinstance(event, FailedEvent):
                self.failures.append(event.message)
            elif isinstance(event, Done):
                event.path.unlink(missing_ok=True)
        if not self.stopping:
            self.start(aged=False)  # a new job takes the finished one's place


async def run(n_jobs: int, window_s: float, seed: int = 2) -> dict:
    import httpx

    from avatar_core.providers.wavespeed import WaveSpeedProvider

    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(queue_s=0.0, processing_s=1e6) as emu:
        tmp = Path(tmp)
        async with WaveSpeedProvider("bench-key", base_url=emu.url) as uploader:
            image = await uploader.upload(make_png(tmp / "face.png"), "image/png")
            audio = await uploader.upload(make_wav(tmp / "voice.wav", seconds=2.0), "audio/wav")
        settings = bench_settings(emu.url, tmp / "out")
        swarm = Swarm(emu, settings, image, audio, seed)
        async with httpx.AsyncClient(timeout=30) as control:
            swarm.control = control
            for _ in range(n_jobs):
                swarm.start(aged=True)
            while swarm.submitted < n_jobs and not swarm.failures:
                await asyncio.sleep(0.05)
            await asyncio.sleep(SETTLE_S)
            # The window.
            lags: list[float] = []
            reads_before = _status_reads(emu)
            cpu0, wall0, t_open = cpu_seconds(), time.perf_counter(), time.monotonic()
            while time.perf_counter() - wall0 < window_s:
                tick = time.perf_counter()
                await asyncio.sleep(0.1)
                lags.append(time.perf_counter() - tick - 0.1)
            cpu, wall, t_close = cpu_seconds() - cpu0, time.perf_counter() - wall0, time.monotonic()
            reads = _status_reads(emu) - reads_before
            in_flight = len(swarm.tasks)
            swarm.stopping = True
            for task in list(swarm.tasks):
                task.cancel()
            await asyncio.gather(*swarm.tasks, return_exceptions=True)
        delays = [n["noticed_at"] - n["ends_at"] for n in swarm.noticed
                  if n["ends_at"] is not None and t_open <= n["ends_at"] <= t_close]
        return {
            "jobs": n_jobs, "in_flight": in_flight, "window_s": wall, "cpu_s": cpu, "reads": reads,
            "peak_rss_mb": peak_rss_mb(), "rss_end_mb": current_rss_mb(), "delays": delays,
            "lags": lags, "failures": swarm.failures, "emulator_cpu_s": emu.cpu_seconds(),
        }


def _status_reads(emu: EmulatorProcess) -> int:
    return emu.get("/bench/count?path=/result$")["count"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 jobs, a short window (smoke test)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--window", type=float, default=75.0, help="seconds of measurement")
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    parser.add_argument("--httpx-reads", action="store_true",
                        help="status reads through httpx, as when a proxy is configured (the before-figure)")
    args = parser.parse_args(argv)
    if args.httpx_reads:
        from avatar_core.providers import base

        base.proxy_configured = lambda: True  # what HttpProvider checks before taking the lean path
    if args.quick:
        args.jobs, args.window = 20, 8.0
    reads_via = "httpx" if args.httpx_reads else "the lean keep-alive path (providers/keepalive.py)"
    print(f"# {args.jobs} jobs in one process (real time), status reads through {reads_via}\n\n{machine_line()}")
    r = asyncio.run(run(args.jobs, args.window))
    core_share = r["cpu_s"] / r["window_s"]
    job_minutes = r["jobs"] * r["window_s"] / 60
    per_job_minute = r["cpu_s"] / job_minutes
    delays = r["delays"]
    rows = [
        ["jobs in flight", f"{r['jobs']} (at the end: {r['in_flight']})", ""],
        ["window", f"{r['window_s']:.0f} s", f"{r['reads']} status reads ({r['reads'] / r['window_s']:.0f}/s)"],
        ["CPU, share of one core", f"{core_share:.1%}", f"target < {CPU_TARGET:.0%}: {verdict(core_share < CPU_TARGET)}"],
        ["CPU per job-minute", f"{per_job_minute * 1000:.1f} ms", f"{r['cpu_s']:.2f} CPU-s over {job_minutes:.0f} job-minutes"],
        ["CPU per status read", f"{r['cpu_s'] / max(1, r['reads']) * 1000:.2f} ms", "everything this process did, / reads"],
        ["peak memory (RSS)", f"{r['peak_rss_mb']:.0f} MB",
         f"target < {RSS_TARGET_MB:.0f} MB: {verdict(r['peak_rss_mb'] < RSS_TARGET_MB)}; at the end {r['rss_end_mb']:.0f} MB"],
        ["notice delay, median", f"{percentile(delays, 50):.2f} s", f"{len(delays)} jobs finished in the window"],
        ["notice delay, p95", f"{percentile(delays, 95):.2f} s", f"max {max(delays, default=float('nan')):.2f} s"],
        ["event-loop lag, p95", f"{percentile(r['lags'], 95) * 1000:.1f} ms",
         f"max {max(r['lags'], default=float('nan')) * 1000:.1f} ms"],
        ["emulator CPU (not counted)", f"{r['emulator_cpu_s']:.1f} s", "its own process"],
    ]
    if r["failures"]:
        rows.append(["jobs that failed", str(len(r["failures"])), r["failures"][0][:80]])
    print_table(f"{r['jobs']} concurrent jobs, {r['window_s']:.0f} s window", ["figure", "value", "notes"], rows)
    if args.json:
        write_figures(args.json, [
            ("200 jobs", "CPU, share of one core", f"{core_share:.1%}", f"< {CPU_TARGET:.0%}", core_share < CPU_TARGET),
            ("200 jobs", "CPU per job-minute", f"{per_job_minute * 1000:.1f} ms", "", None),
            ("200 jobs", "peak memory (RSS)", f"{r['peak_rss_mb']:.0f} MB", f"< {RSS_TARGET_MB:.0f} MB",
             r["peak_rss_mb"] < RSS_TARGET_MB),
            ("200 jobs", "notice delay median / p95 under load",
             f"{percentile(delays, 50):.2f} / {percentile(delays, 95):.2f} s", "<= 1 / 2 s",
             (percentile(delays, 50) <= 1.0 and percentile(delays, 95) <= 2.0) if delays else None),  # none: not measured
        ])
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
