"""A whole-CLI render of a 5-minute speech clip through the Local preview, at 720p.

    python bench/bench_render_long.py              # one run, about 1.5-2 minutes on 2 cores
    python bench/bench_render_long.py --runs 2     # repeat (figures of every run, best counts)
    python bench/bench_render_long.py --quick      # 30 s of speech, a smoke test

What a user runs, end to end: ``python -m avatar_core generate --provider local`` in a
fresh process, with a 1920x1080 JPEG portrait and a 300 s MP3 of real speech (espeak-ng,
repeated to length; a syllable-like buzz where espeak-ng is missing). The time includes
start-up, the input checks (decoding and re-encoding the MP3, the face check), the render
and the move to the output folder. Peak memory and CPU are the child's own
(``os.wait4``), so this process does not count. The MP4 is opened afterwards to check it
is 1280x720 and lasts as long as the speech.

Target: at least 3x real time (300 s of video in at most 100 s) on 2 cores. Other
processes slow the wall clock: the load average before and after is printed, and
"CPU-s per video-s" (core-seconds spent per second of video) barely depends on them: at or
below 2/3 means 3x real time is reachable on two free cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _support import machine_line, print_table, verdict, write_figures  # noqa: E402
from bench_media import make_portrait, voice_pcm  # noqa: E402

SECONDS = 300.0
QUICK_SECONDS = 30.0
TARGET = 3.0  # seconds of video per second of wall time
PORTRAIT_SIZE = (1920, 1080)  # fits the standard tier's 1280x720 box exactly
TEXT = ("The quarterly figures are in, and the team has done well. Sales rose in every region, "
        "costs fell a little, and the new product is ahead of plan. ")


def speech_pcm(tmp: Path) -> tuple[np.ndarray, int, str]:
    """(mono int16 samples, rate, what it is): espeak-ng speech, or the bench buzz."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        rate = 22_050
        return voice_pcm(60.0, rate), rate, "syllable-like buzz (espeak-ng missing)"
    once = tmp / "once.wav"
    subprocess.run([espeak, "-w", str(once), TEXT * 3], check=True, capture_output=True)
    with av.open(str(once)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    return pcm.astype(np.int16), rate, "espeak-ng speech"


def write_mp3(dest: Path, pcm: np.ndarray, rate: int, seconds: float) -> Path:
    """``seconds`` of ``pcm`` (repeated to length) as a 128 kbit/s mono MP3, as a phone saves it."""
    need = int(seconds * rate)
    pcm = np.resize(pcm, need)
    with av.open(str(dest), "w", format="mp3") as out:
        s = out.add_stream("libmp3lame", rate=rate, layout="mono")
        s.bit_rate = 128_000
        for i in range(0, need, rate):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, i:i + rate]), format="s16p", layout="mono")
            f.sample_rate, f.pts = rate, i
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return dest


def run_cli(image: Path, audio: Path, out: Path, work: Path) -> dict:
    """One ``python -m avatar_core generate --provider local`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"AVATAR_OUTPUT_DIR": str(work / "output"), "AVATAR_DB_PATH": str(work / "jobs.sqlite3"),
                "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "avatar_core", "generate", "--provider", "local", "--tier", "standard",
           "--image", str(image), "--audio", str(audio), "--out", str(out)]
    load_before = os.getloadavg()[0]
    log_out, log_err = work / "cli.out", work / "cli.err"
    with log_out.open("w") as fo, log_err.open("w") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=fo, stderr=fe)
        # wait4 (not Popen.wait) so the kernel hands over the child's own peak RSS and CPU.
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = log_out.read_text(), log_err.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"the CLI failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        width, height = v.codec_context.width, v.codec_context.height
        duration = c.duration / 1_000_000
    return {
        "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
        "width": width, "height": height, "duration": duration, "mb": out.stat().st_size / 1e6,
        "load_before": load_before, "load_after": os.getloadavg()[0], "stdout": stdout,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:g} s of speech instead of {SECONDS:g} s")
    parser.add_argument("--runs", type=int, default=1, help="how many renders (each in a fresh process)")
    parser.add_argument("--seconds", type=float, default=None, help="length of the speech clip")
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    print(machine_line())
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench_long_") as tmp_name:
        tmp = Path(tmp_name)
        image = make_portrait(tmp / "portrait.jpg", PORTRAIT_SIZE)
        pcm, rate, what = speech_pcm(tmp)
        audio = write_mp3(tmp / f"speech_{seconds:.0f}s.mp3", pcm, rate, seconds)
        print(f"inputs: {PORTRAIT_SIZE[0]}x{PORTRAIT_SIZE[1]} JPEG, {seconds:.0f} s MP3 of {what} "
              f"({audio.stat().st_size / 1e6:.1f} MB)", flush=True)
        for run in range(1, max(1, args.runs) + 1):
            # A fresh output folder per run, so the input checks really convert the MP3 again.
            work = tmp / f"run{run}"
            work.mkdir()
            r = run_cli(image, audio, work / "out.mp4", work)
            speed = r["duration"] / r["wall"]
            results.append(r | {"speed": speed})
            rows.append([run, f"{r['wall']:.1f} s", f"{speed:.2f}x", f"{r['cpu'] / r['duration']:.2f}",
                         f"{r['peak_mb']:.0f} MB", f"{r['width']}x{r['height']}, {r['duration']:.1f} s, {r['mb']:.1f} MB",
                         f"{r['load_before']:.2f} / {r['load_after']:.2f}"])
            print(f"run {run}: {r['wall']:.1f} s wall, {speed:.2f}x real time", flush=True)
    print_table(f"CLI render, Local preview, standard 720p, {seconds:.0f} s of speech",
                ["run", "wall clock", "real time", "CPU-s per video-s", "peak RSS", "video", "load before / after"],
                rows)
    best = max(results, key=lambda r: r["speed"])
    met = best["speed"] >= TARGET
    print(f"\nbest {best['speed']:.2f}x real time (target >= {TARGET:g}x: {verdict(met)}); "
          f"last CLI output:\n{best['stdout'].strip()}")
    if args.json:
        write_figures(args.json, [
            ("renderer", f"CLI local preview, {seconds:.0f} s speech at 720p (wall clock)",
             f"{best['wall']:.0f} s = {best['speed']:.2f}x real time", f">= {TARGET:g}x", met),
            ("renderer", f"CLI local preview, {seconds:.0f} s speech: peak memory (RSS)",
             f"{max(r['peak_mb'] for r in results):.0f} MB", "(none set)", None),
        ])
    return 0  # like the other scripts: a missed target is reported in the figures, run_all.py counts it


if __name__ == "__main__":
    raise SystemExit(main())
