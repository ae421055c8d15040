"""How soon the job loop notices a finished job, and how many status reads that costs.

    python bench/bench_polling.py            # 90 jobs x 3 schedules, about 90 s on 2 idle cores
    python bench/bench_polling.py --quick    # 5 jobs, about 15 s (smoke test)

Runs WaveSpeed jobs through the real job loop (``jobs.run_job``) against the real
emulator over loopback HTTP, in *virtual time*: the emulator (a child process per worker)
and the job loop share one clock (8 bytes of shared memory, ``_support.SharedClock``), and
the loop's ``sleep`` moves that clock instead of waiting. Jobs run one at a time per
worker, so the virtual clock is exact, and real-scale durations (460 s standard, 730 s
pro) cost only the HTTP requests. Request latency is zero in virtual time: the delays
below are what the polling plan costs; bench_many_jobs.py measures them in real time.

Durations are log-normal (sigma 0.25) around the published averages; "early" jobs end
at 5-50% of the usual time. The same durations (same seed) are run with each schedule:

- adaptive: the loop's own default plan (``PollSchedule.for_job``, no override);
- fixed 1.0 s: WaveSpeed's SDK polls every second;
- fixed 2.0 s: Segmind's example polls every two seconds.

Delay = virtual time of the first status read that saw "completed" minus the job's
completion time (both read from the emulator). Reads = status requests the emulator got.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    EmulatorProcess,
    SharedClock,
    bench_settings,
    machine_line,
    make_png,
    make_wav,
    percentile,
    print_table,
    verdict,
    write_figures,
)

TYPICAL = {"standard": 460.0, "pro": 730.0}  # the published averages polling.py uses
SIGMA = 0.25  # spread of real job durations (log-normal)
EARLY_RANGE = (0.05, 0.5)  # "much earlier than usual": this fraction of the typical time
SCHEDULES = ("adaptive", "fixed 1.0 s", "fixed 2.0 s")
BASELINE = "fixed 1.0 s"

# Targets (issue 8).
MEDIAN_TARGET_S = 1.0
P95_TARGET_S = 2.0
READS_TARGET_RATIO = 0.40  # of fixed 1.0 s polling
EARLY_MAX_TARGET_S = 15.0


class FixedSchedule:
    """A constant polling interval, shaped like ``PollSchedule`` for the job loop."""

    def __init__(self, every_s: float, typical_s: float) -> None:
        self.every_s, self.typical_s = every_s, typical_s

    def interval(self, elapsed: float) -> float:
        return self.every_s


def make_tasks(n_standard: int, n_pro: int, n_early: int, seed: int = 8) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for group, tier, n in (("standard", "standard", n_standard), ("pro", "pro", n_pro)):
        for _ in range(n):
            jobs.append({"group": group, "tier": tier, "duration": TYPICAL[tier] * math.exp(rng.gauss(0, SIGMA))})
    for i in range(n_early):
        tier = "standard" if i % 2 == 0 else "pro"
        jobs.append({"group": "early", "tier": tier, "duration": TYPICAL[tier] * rng.uniform(*EARLY_RANGE)})
    for job in jobs:
        # A little of the time is spent queued; the status word changes, the polling does not.
        job["queue_s"] = min(20.0, job["duration"] * rng.uniform(0.0, 0.05))
    return [dict(job, schedule=s) for s in SCHEDULES for job in jobs]


def run_tasks(tasks: list[dict]) -> list[dict]:
    """Run these jobs one after another against one emulator process on a shared virtual clock."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clock = SharedClock(tmp / "clock", start=10_000.0)
        try:
            with EmulatorProcess(clock_file=clock.path) as emu:
                return asyncio.run(_run_tasks(tasks, emu, clock, tmp))
        finally:
            clock.close()


async def _run_tasks(tasks: list[dict], emu: EmulatorProcess, clock: SharedClock, tmp: Path) -> list[dict]:
    from avatar_core import jobs
    from avatar_core.events import Done
    from avatar_core.providers.wavespeed import WaveSpeedProvider

    async def virtual_sleep(seconds: float) -> None:
        clock.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # let the loop breathe, as a real sleep would

    # Inputs go up once (the real upload path); every job passes their URLs, so a job
    # costs only its submit, its polls and its download.
    async with WaveSpeedProvider("bench-key", base_url=emu.url) as uploader:
        image = await uploader.upload(make_png(tmp / "face.png"), "image/png")
        audio = await uploader.upload(make_wav(tmp / "voice.wav"), "audio/wav")
    settings = bench_settings(emu.url, tmp / "out", deadline_s=3 * 3600.0)
    results = []
    for task in tasks:
        emu.post("/bench/plans", [{"queue_s": task["queue_s"], "processing_s": task["duration"] - task["queue_s"]}])
        schedule = None
        if task["schedule"].startswith("fixed"):
            schedule = FixedSchedule(float(task["schedule"].split()[1]), TYPICAL[task["tier"]])
        last = None
        async for event in jobs.run_job("wavespeed", image, audio, tier=task["tier"], settings=settings,
                                        clock=clock, sleep=virtual_sleep, schedule=schedule):
            last = event
        if not isinstance(last, Done):
            raise RuntimeError(f"a benchmark job did not finish: {last}")
        job = emu.get(f"/bench/job/{last.request_id}")
        first_seen = min(t for t in job["reads"] if t >= job["ends_at"])
        results.append(dict(task, delay=first_seen - job["ends_at"], reads=len(job["reads"])))
        last.path.unlink(missing_ok=True)
        emu.post("/bench/forget", {"jobs": [job["id"]]})
    return results


def summarise(results: list[dict]) -> tuple[list[list], list[str], bool]:
    groups = [("standard + pro", ("standard", "pro")), ("standard (460 s)", ("standard",)),
              ("pro (730 s)", ("pro",)), ("early (5-50% of usual)", ("early",))]
    stats = {}
    for label, members in groups:
        for sched in SCHEDULES:
            rows = [r for r in results if r["schedule"] == sched and r["group"] in members]
            if not rows:
                continue
            delays = [r["delay"] for r in rows]
            stats[label, sched] = {
                "jobs": len(rows), "median": percentile(delays, 50), "p95": percentile(delays, 95),
                "max": max(delays), "reads": sum(r["reads"] for r in rows) / len(rows),
            }
    table = []
    for label, _members in groups:
        for sched in SCHEDULES:
            s = stats.get((label, sched))
            if s is None:
                continue
            base = stats[label, BASELINE]
            table.append([label, sched, s["jobs"], s["median"], s["p95"], s["max"], s["reads"],
                          f"{s['reads'] / base['reads']:.0%}",
                          f"{s['median'] / base['median']:.2f}" if base["median"] > 0 else "-"])
    main = stats.get(("standard + pro", "adaptive"))
    early = stats.get(("early (5-50% of usual)", "adaptive"))
    checks, ok, figures = [], True, []
    if main:
        ratio = main["reads"] / stats["standard + pro", BASELINE]["reads"]
        two = stats["standard + pro", "fixed 2.0 s"]
        figures += [
            ("noticing", "median notice delay (adaptive / 1.0 s / 2.0 s)",
             f"{main['median']:.2f} / {stats['standard + pro', BASELINE]['median']:.2f} / {two['median']:.2f} s",
             f"<= {MEDIAN_TARGET_S:g} s", main["median"] <= MEDIAN_TARGET_S),
            ("noticing", "p95 notice delay (adaptive / 1.0 s / 2.0 s)",
             f"{main['p95']:.2f} / {stats['standard + pro', BASELINE]['p95']:.2f} / {two['p95']:.2f} s",
             f"<= {P95_TARGET_S:g} s", main["p95"] <= P95_TARGET_S),
            ("noticing", "status reads per job (adaptive / 1.0 s / 2.0 s)",
             f"{main['reads']:.0f} / {stats['standard + pro', BASELINE]['reads']:.0f} / {two['reads']:.0f} "
             f"({ratio:.0%} of 1.0 s)", f"<= {READS_TARGET_RATIO:.0%} of 1.0 s", ratio <= READS_TARGET_RATIO),
        ]
        for text, good in (
            (f"adaptive median delay {main['median']:.2f} s <= {MEDIAN_TARGET_S:g} s", main["median"] <= MEDIAN_TARGET_S),
            (f"adaptive p95 delay {main['p95']:.2f} s <= {P95_TARGET_S:g} s", main["p95"] <= P95_TARGET_S),
            (f"adaptive reads {ratio:.0%} of fixed 1.0 s <= {READS_TARGET_RATIO:.0%}", ratio <= READS_TARGET_RATIO),
        ):
            checks.append(f"{text}: {verdict(good)}")
            ok &= good
    if early:
        good = early["max"] <= EARLY_MAX_TARGET_S
        checks.append(f"early jobs: adaptive max delay {early['max']:.1f} s <= {EARLY_MAX_TARGET_S:g} s: {verdict(good)}")
        ok &= good
        figures.append(("noticing", "early job (5-50% of usual), max delay", f"{early['max']:.1f} s",
                        f"<= {EARLY_MAX_TARGET_S:g} s", good))
    return table, checks, ok, figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of jobs, for the smoke test")
    parser.add_argument("--standard", type=int, default=40)
    parser.add_argument("--pro", type=int, default=30)
    parser.add_argument("--early", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.standard, args.pro, args.early = 2, 1, 2
    print(f"# Noticing a finished job (virtual time)\n\n{machine_line()}")
    tasks = make_tasks(args.standard, args.pro, args.early)
    t0 = time.perf_counter()
    # Interleave so every worker gets a fair share of long and short jobs.
    chunks = [tasks[i::args.workers] for i in range(args.workers)]
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = [r for part in pool.map(run_tasks, chunks) for r in part]
    else:
        results = run_tasks(tasks)
    wall = time.perf_counter() - t0
    table, checks, _ok, figures = summarise(results)
    print_table(
        f"Notice delay and status reads per job ({len(results) // len(SCHEDULES)} jobs x {len(SCHEDULES)} "
        f"schedules, {wall:.0f} s of real time)",
        ["jobs", "schedule", "n", "median delay s", "p95 delay s", "max delay s", "reads/job",
         "reads vs 1.0 s", "median vs 1.0 s"],
        table,
    )
    print("\nTargets:")
    for line in checks:
        print(f"- {line}")
    if args.json:
        write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
